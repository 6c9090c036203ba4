"""The v2 training scenes' frame-averaged movers (``ghost_share``): what a video's averaged frames show."""
import numpy as np
import pytest

from m2ae_infer.data import scenes, synth


def _photos(n=3, size=96):
    return [np.random.default_rng(i).random((size, size, 3)).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize("frames,step", [(3, 4.0), (5, 3.0), (7, 2.0)])
def test_frame_averaged_render_is_the_mean_of_the_shifted_copies(frames, step):
    """A square moving along x over ``frames`` whole-pixel positions: the blurry image is the mean of those copies
    (np.roll, an independent reference), the sharp one the middle copy."""
    h = w = 48
    bg = np.zeros((h, w, 3), np.float32)
    layer = np.zeros((h, w, 4), np.float32)
    layer[20:28, 20:28] = 1.0                 # premultiplied white, alpha 1
    length = step * (frames - 1)
    u, v = np.array([length / 2, 0.0]), np.array([0.0, 0.0])     # d(t) = u t, t in [-1, 1]
    blurry, sharp, regions = synth._render_local(bg, [layer], [(u, v)], frames)
    offsets = [int(round(d)) for d in np.linspace(-length / 2, length / 2, frames)]
    expected = np.mean([np.roll(layer[..., :3], o, axis=1) for o in offsets], axis=0)
    assert np.abs(blurry - expected).max() < 1e-5
    assert np.array_equal(sharp, layer[..., :3])
    levels = np.unique(blurry[24, :, 0]) * frames    # separate copies: coverage in whole frames, not a smooth ramp
    assert np.abs(levels - levels.round()).max() < 1e-4 and levels.max() > 1
    assert (regions >= 0).sum() > 64          # the swept area, more than the square itself


def test_ghost_share_zero_renders_smooth_smears_and_one_averages_every_local_sample(monkeypatch):
    """At 0 every local sample is the smooth sub-frame sweep (``frames=None``); at 1 every one is frame-averaged,
    over one of :data:`scenes.GHOST_FRAMES` positions."""
    photos = _photos()
    calls = []
    render = synth._render_local

    def spy(bg, layers, coeffs, frames=None):
        calls.append(frames)
        return render(bg, layers, coeffs, frames)

    monkeypatch.setattr(scenes, "_render_local", spy)
    for share in (0.0, 1.0):
        calls.clear()
        for i in range(4):
            s = scenes.scene_sample(photos, np.random.default_rng([4, i]), 64, kind="local", ghost_share=share)
            assert s.kind == "local" and s.mask.any()
        assert calls
        assert all(f is None for f in calls) if share == 0 else all(f in scenes.GHOST_FRAMES for f in calls)


def test_scene_dataset_passes_the_share_and_checks_it():
    photos = _photos()
    plain = scenes.SceneDataset(photos, size=8, seed=2, crop=48)
    ghost = scenes.SceneDataset(photos, size=8, seed=2, crop=48, ghost_share=1.0)
    kinds = [plain.sample(i).kind for i in range(8)]
    differ = [not np.array_equal(plain.sample(i).blurry, ghost.sample(i).blurry) for i in range(8)]
    assert any(differ) and not any(d for d, k in zip(differ, kinds) if k == "sharp")
    with pytest.raises(ValueError, match="ghost_share"):
        scenes.SceneDataset(photos, ghost_share=1.5)


@pytest.mark.parametrize("extra,needle", [({"ghost_share": 0.5}, "needs --data"),
                                          ({"ghost_share": -0.1}, "--ghost-share must lie in [0, 1]")])
def test_run_settings_refuse_bad_ghost_options(extra, needle):
    from m2ae_infer.train_settings import RunSettings, UsageError
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        RunSettings(**extra)
