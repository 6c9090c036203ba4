"""m2ae_infer.data.video: real-motion samples from a static-camera video (frames as arrays, tiny lossless videos)."""
import numpy as np
import pytest

pytest.importorskip("scipy", reason="video masks need scipy (pip install 'm2ae-infer[train]')")

from m2ae_infer.data import video as V  # noqa: E402

H, W, SIDE, STEP = 64, 96, 10, 3


def moving_square(frames=9, seed=0, noise=2):
    """A static random background (values 40..120, the same every frame up to +-``noise`` levels of fresh
    per-frame noise) with a bright ``SIDE`` px square moving ``STEP`` px right per frame; returns the frames
    and the bool footprint of the square in every frame."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(40, 121, (H, W, 3)).astype(np.int16)
    out, path = [], np.zeros((H, W), bool)
    for t in range(frames):
        f = bg + rng.integers(-noise, noise + 1, (H, W, 3))
        x = 20 + STEP * t
        f[27:27 + SIDE, x:x + SIDE] = (230, 200, 30)
        path[27:27 + SIDE, x:x + SIDE] = True
        out.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(out), path


def test_mask_covers_the_squares_path_and_not_the_static_background():
    frames, path = moving_square()
    s = V.motion_clip(frames, centre=4, radius=4)
    assert s.kind == "local" and s.mask.dtype == bool and s.mask.shape == (H, W)
    assert s.mask[path].all()                                  # the whole path is masked
    from scipy import ndimage
    near = ndimage.binary_dilation(path, np.ones((2 * V.GROW + 5,) * 2, bool))
    assert not s.mask[~near].any()                             # nothing far from it (the noisy background)
    assert s.mask.mean() < 0.5
    # outside the mask the reference is exact: blurry == sharp == the centre frame, bit for bit
    assert np.array_equal(s.blurry[~s.mask], s.sharp[~s.mask])
    assert np.array_equal(s.sharp, frames[4].astype(np.float32) / 255)
    # inside, blurry is the linear-light average of the window
    lin = ((frames.astype(np.float64) / 255) ** 2.2).mean(0) ** (1 / 2.2)
    assert np.allclose(s.blurry[s.mask], lin[s.mask], atol=1e-6)
    assert np.abs(s.blurry - s.sharp)[path].max() > 0.2       # really smeared there
    assert s.blurry.dtype == np.float32 and s.trajectories.shape[0] == 0 and (s.regions == -1).all()


def test_static_video_is_sharp_and_untouched():
    frames, _ = moving_square()
    still = np.repeat(frames[:1], 5, axis=0).astype(np.int16)
    still += np.random.default_rng(1).integers(-3, 4, still.shape)       # sensor noise only
    s = V.motion_clip(np.clip(still, 0, 255).astype(np.uint8), 2, 2)
    assert s.kind == "sharp" and not s.mask.any() and np.array_equal(s.blurry, s.sharp)


def test_small_flicker_dropped_and_holes_filled():
    rng = np.random.default_rng(2)
    bg = rng.integers(40, 121, (H, W, 3)).astype(np.uint8)
    frames = np.repeat(bg[None], 3, axis=0).copy()
    frames[0, 5:8, 5:8] = 255                                   # a 9-pixel flicker: below MIN_AREA
    for t in range(3):                                          # a uniform 24 px square moving diagonally 1 px
        frames[t, 20 + t:44 + t, 40 + t:64 + t] = (200, 60, 60)  # per frame: only its edges change (a ring)
    m = V.moving_mask(frames, 1)
    assert not m[:12, :12].any()
    assert m[22:42, 45:60].all()                                # the unchanged inside is filled in


def test_bad_windows_and_frames_are_refused():
    frames, _ = moving_square(frames=5)
    for centre, radius in ((1, 2), (4, 1), (2, 0)):
        with pytest.raises(ValueError, match="window"):
            V.motion_clip(frames, centre, radius)
    with pytest.raises(ValueError, match="uint8"):
        V.motion_clip(frames.astype(np.float32), 2, 2)


def test_clip_centres_spread_and_deterministic():
    c = V.clip_centres(100, 5, 3, seed=7)
    assert c == V.clip_centres(100, 5, 3, seed=7) and c != V.clip_centres(100, 5, 3, seed=8)
    assert c == sorted(c) and len(set(c)) == 5 and 3 <= c[0] and c[-1] <= 96
    assert all(lo <= x < lo + 19 for x, lo in zip(c, np.linspace(3, 97, 6)[:-1].astype(int)))  # one per stratum
    with pytest.raises(ValueError):
        V.clip_centres(6, 1, 3, 0)


def _write_video(path, frames, codec="ffv1", pix_fmt="bgr0"):
    av = pytest.importorskip("av", reason="reading videos needs PyAV (pip install 'm2ae-infer[train]')")
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_read_frames_and_clip_set_from_a_lossless_video(tmp_path):
    frames, _ = moving_square(frames=12)
    path = tmp_path / "square.mkv"
    _write_video(path, frames)
    assert np.array_equal(V.read_frames(path), frames)                  # ffv1 is lossless
    assert np.array_equal(V.read_frames(path, start=2, count=3, step=2), frames[2:8:2])
    assert len(V.read_frames(path, start=10, count=5)) == 2              # the video ends first
    assert V.frame_count(path) == 12
    samples = V.clip_set(path, 3, 2, seed=0)
    centres = V.clip_centres(12, 3, 2, 0)
    assert len(samples) == 3
    for s, c in zip(samples, centres):
        ref = V.motion_clip(frames, c, 2)
        assert np.array_equal(s.blurry, ref.blurry) and np.array_equal(s.mask, ref.mask) and s.kind == "local"


def test_missing_and_broken_videos(tmp_path):
    pytest.importorskip("av")
    with pytest.raises(FileNotFoundError, match="not found"):
        V.read_frames(tmp_path / "nope.avi")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"this is not a video" * 10)
    with pytest.raises(ValueError) as exc:
        V.read_frames(junk)
    assert "junk.avi" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("duration", [None, 100], ids=["no-delay", "100ms"])
def test_animated_gif_frames_all_read(tmp_path, duration):
    """A GIF clip, with frame delays and without (FFmpeg's GIF demuxer returns one frame for the latter): every
    frame comes back, pixel for pixel what was written (four colours: the palette is exact). A broken GIF is a
    one-line ValueError naming it."""
    from PIL import Image
    palette = np.array([[0, 0, 0], [230, 200, 30], [40, 90, 160], [255, 255, 255]], np.uint8)
    idx = np.random.default_rng(3).integers(0, 3, (6, 24, 32))
    for t in range(6):
        idx[t, 8:12, 3 * t:3 * t + 4] = 3                                          # a moving white bar
    frames = palette[idx]
    path = tmp_path / "clip.gif"
    extra = {} if duration is None else {"duration": duration}
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], **extra)
    assert V.frame_count(path) == 6
    assert np.array_equal(V.read_frames(path), frames)
    broken = tmp_path / "broken.gif"
    broken.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError) as exc:
        V.read_frames(broken)
    assert "broken.gif" in str(exc.value) and "\n" not in str(exc.value)


def test_clip_set_keeps_every_window_inside_the_frame_range(tmp_path):
    """--frames / m2ae-train --video: windows of a range use only its frames (the dev clip never overlaps
    the training windows), and equal motion_clip on those frames."""
    frames, _ = moving_square(frames=20)
    path = tmp_path / "square.mkv"
    _write_video(path, frames)
    train, dev = V.clip_set(path, 3, 2, seed=0, frames=(0, 10)), V.clip_set(path, 3, 2, seed=0, frames=(10, None))
    for samples, (lo, hi) in ((train, (0, 10)), (dev, (10, 20))):
        centres = [lo + c for c in V.clip_centres(hi - lo, 3, 2, 0)]
        assert all(lo + 2 <= c <= hi - 3 for c in centres)
        for s, c in zip(samples, centres):
            assert np.array_equal(s.blurry, V.motion_clip(frames, c, 2).blurry)
    with pytest.raises(ValueError, match="hold no window"):
        V.clip_set(path, 3, 2, seed=0, frames=(17, None))


@pytest.mark.parametrize("text,expected", [(None, (0, None)), ("400:", (400, None)), (":10", (0, 10)),
                                           ("3:9", (3, 9))])
def test_parse_frames(text, expected):
    assert V.parse_frames(text) == expected


@pytest.mark.parametrize("text", ["400", "a:b", "5:5", "-1:", "9:3"])
def test_parse_frames_refuses(text):
    with pytest.raises(ValueError, match="frames"):
        V.parse_frames(text)


def test_window_crop_cuts_labels_with_the_pixels():
    frames, path = moving_square()
    clip = V.motion_clip(frames, centre=4, radius=4)
    rng = np.random.default_rng(3)
    for _ in range(20):
        crop = V.window_crop(clip, 32, rng, toward_motion=1.0)
        assert crop.blurry.shape == (32, 32, 3) and crop.mask.shape == (32, 32)
        assert crop.kind == ("local" if crop.mask.any() else "sharp")
        # the crop is a window of the clip: find it by its mask and pixels
        ys, xs = np.nonzero((clip.blurry == crop.blurry[0, 0]).all(-1))
        assert any(np.array_equal(clip.blurry[y:y + 32, x:x + 32], crop.blurry) and
                   np.array_equal(clip.mask[y:y + 32, x:x + 32], crop.mask) for y, x in zip(ys, xs))
    assert sum(V.window_crop(clip, 32, rng, toward_motion=1.0).mask.any() for _ in range(20)) == 20
    with pytest.raises(ValueError, match="smaller than the crop"):
        V.window_crop(clip, 128, rng)


def test_scene_dataset_mixes_video_windows_without_changing_the_scene_samples():
    """m2ae-train --video: a share of SceneDataset's samples are crops of the video windows; the other samples
    are exactly those of a dataset without videos (a separate random stream decides)."""
    from m2ae_infer.data.scenes import SceneDataset
    frames, _ = moving_square()
    clip = V.motion_clip(frames, centre=4, radius=4)
    photos = [np.random.default_rng(i).random((80, 80, 3)).astype(np.float32) for i in range(2)]
    plain = SceneDataset(photos, size=12, seed=5, crop=32)
    mixed = SceneDataset(photos, size=12, seed=5, crop=32, videos=[clip], video_share=0.5)
    differ, exact_cuts = 0, 0
    for i in range(12):
        a, b = plain.sample(i), mixed.sample(i)
        if np.array_equal(a.blurry, b.blurry) and np.array_equal(a.mask, b.mask):
            continue
        differ += 1    # from the video: an exact crop, or one with camera/encoding degradations on top
        exact_cuts += any(np.array_equal(clip.sharp[y:y + 32, x:x + 32], b.sharp) and
                          np.array_equal(clip.mask[y:y + 32, x:x + 32], b.mask)
                          for y in range(H - 31) for x in range(W - 31))
    assert 0 < differ < 12 and exact_cuts >= 1
    none = SceneDataset(photos, size=12, seed=5, crop=32, videos=[clip], video_share=0.0)
    assert all(np.array_equal(none.sample(i).blurry, plain.sample(i).blurry) for i in range(12))
    with pytest.raises(ValueError, match="video"):
        SceneDataset(photos, videos=[], video_share=0.3)


@pytest.mark.parametrize("extra,needle", [({"video_share": 0.3}, "go together"), ({"video": "x.avi"}, "go together"),
                                          ({"video": "x.avi", "video_share": 0.3}, "needs --data"),
                                          ({"video_share": 1.5}, "--video-share must lie in [0, 1]")])
def test_run_settings_refuse_bad_video_options(extra, needle):
    from m2ae_infer.train_settings import RunSettings, UsageError
    with pytest.raises(UsageError) as exc:
        RunSettings(**extra)
    assert needle in str(exc.value) and "\n" not in str(exc.value)
