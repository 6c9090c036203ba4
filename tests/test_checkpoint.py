"""Checkpoints: round trips, foreign layouts, safety against pickled code, damaged files, strict checks.

Every check compares with an independent reference: the original network's state dict (``torch.equal``)
and its output on a fixed input.
"""
from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch
from helpers import GIB, deflated_checkpoint, random_net, sparse_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from m2ae_infer import M2AEConfig, M2AENet, reparameterize_model
from m2ae_infer.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from m2ae_infer.config import LIMITS

TINY = M2AEConfig.from_name("tiny")
SUFFIXES = [".pth", ".safetensors"]
FORMS = ["train", "deploy"]


def make_net(form: str = "train", seed: int = 0, config: M2AEConfig = TINY) -> M2AENet:
    net = random_net(config, seed)
    return reparameterize_model(net) if form == "deploy" else net


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(1, 3, 10, 14, generator=torch.Generator().manual_seed(7))


def assert_same(loaded: M2AENet, reference: M2AENet, image: torch.Tensor) -> None:
    """Same config, form, state dict (bit for bit) and outputs (full mask, so every stage runs)."""
    assert loaded.config == reference.config
    assert loaded.inference_mode == reference.inference_mode
    assert not loaded.training
    ref_state, got_state = reference.state_dict(), loaded.state_dict()
    assert sorted(got_state) == sorted(ref_state)  # a re-parameterized net registers `spatial` last
    for key, value in ref_state.items():
        assert torch.equal(got_state[key], value), key
    full = torch.ones(1, 1, *image.shape[-2:], dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(loaded(image, mask=full), reference(image, mask=full))
        assert torch.equal(loaded(image), reference(image))


def assert_one_line_error(exc: pytest.ExceptionInfo, path: os.PathLike, *needles: str) -> str:
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message
    assert str(path) in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("form", FORMS)
def test_round_trip(tmp_path, image, suffix, form):
    net = make_net(form)
    path = tmp_path / f"net{suffix}"
    meta = {"epoch": 3, "psnr": 31.5, "tags": ["a", None, True], "data": {"name": "synthetic"}}
    save_checkpoint(net, path, meta=meta)
    assert_same(load_checkpoint(path), net, image)
    ckpt = read_checkpoint(path)
    assert ckpt.meta == meta and ckpt.deploy == (form == "deploy") and ckpt.config == TINY
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_pth_opens_with_plain_weights_only_load(tmp_path):
    net = make_net("deploy")
    path = tmp_path / "net.pth"
    save_checkpoint(net, path)
    raw = torch.load(path, weights_only=True)
    assert (raw["format"], raw["version"], raw["deploy"], raw["meta"]) == ("m2ae", 1, True, {})
    assert M2AEConfig.from_dict(raw["config"]) == TINY
    assert raw["state_dict"].keys() == net.state_dict().keys()


def test_safetensors_metadata(tmp_path):
    path = tmp_path / "net.safetensors"
    save_checkpoint(make_net("train"), path, meta={"k": 1})
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "m2ae" and metadata["version"] == "1" and metadata["deploy"] == "false"
    assert metadata["meta"] == '{"k": 1}'


@pytest.mark.parametrize("low_byte", [0x80, 0x50])  # a pickle's first byte; "P" as in a zip's "PK"
def test_safetensors_whose_header_length_looks_like_torch(tmp_path, image, low_byte):
    """The header length (u64 little-endian) is the file's first bytes: one in 256 files starts with 0x80.
    Padding the meta walks the length until its low byte is ``low_byte``; the file must still load."""
    net = make_net("deploy")
    path = tmp_path / "net.safetensors"
    for pad in range(300):
        save_checkpoint(net, path, meta={"pad": "x" * pad}, overwrite=True)
        if path.read_bytes()[0] == low_byte:
            break
    assert path.read_bytes()[0] == low_byte
    assert_same(load_checkpoint(path), net, image)
    assert read_checkpoint(path).meta == {"pad": "x" * pad}


def test_deploy_checkpoint_loads_without_training_branches(tmp_path):
    path = tmp_path / "deploy.pth"
    save_checkpoint(make_net("deploy"), path)
    loaded = load_checkpoint(path)
    names = [name for name, _ in loaded.named_modules()]
    assert not any("rbr_" in n or n == "motion.trajectory" for n in names)


# ------------------------------------------------------------------------------ foreign layouts
@pytest.mark.parametrize("wrapper", ["params_ema", "params", "state_dict", "model", "ema", "net"])
def test_wrappers(tmp_path, image, wrapper):
    net = make_net("train")
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: net.state_dict(), "epoch": 12, "optimizer": {"lr": 1e-3}}, path)
    assert_same(load_checkpoint(path, config=TINY), net, image)


def test_params_ema_preferred_over_params(tmp_path, image):
    ema, raw = make_net("train", seed=1), make_net("train", seed=2)
    path = tmp_path / "basicsr.pth"
    torch.save({"params": raw.state_dict(), "params_ema": ema.state_dict()}, path)
    assert_same(load_checkpoint(path, config=TINY), ema, image)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_prefixes_stripped(tmp_path, image, prefix):
    net = make_net("train")
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in net.state_dict().items()}}, path)
    assert_same(load_checkpoint(path, config=TINY), net, image)


@pytest.mark.parametrize("as_dict", [False, True])
def test_key_map(tmp_path, image, as_dict):
    net = make_net("train")
    renamed = {"net.body." + k.replace("blocks.", "layers."): v for k, v in net.state_dict().items()}
    path = tmp_path / "foreign.safetensors"
    save_file(renamed, path)
    rules = [(r"^net\.body\.", ""), (r"^layers\.", "blocks.")]
    assert_same(load_checkpoint(path, config=TINY, key_map=dict(rules) if as_dict else rules), net, image)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path, "unexpected keys (58)", "net.body.", "key_map=")


def test_key_map_collision_is_an_error(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(make_net("train").state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY, key_map=[(r"\.bias$", ".weight")])
    assert_one_line_error(exc, path, "key_map maps several keys onto one name: (18) [stem.weight <- stem.weight + "
                          "stem.bias,", "one-to-one")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("form", FORMS)
def test_bare_state_dict_with_config(tmp_path, image, suffix, form):
    net = make_net(form)
    path = tmp_path / f"bare{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    assert_same(load_checkpoint(path, config=TINY.to_dict()), net, image)  # a dict config works too


# The fix must work for API users and for the CLIs: only m2ae-train takes an architecture (--config).
GIVE_CONFIG = "(Python: config=...; m2ae-train: --config ...)"


def test_bare_state_dict_without_config_names_the_fix(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(make_net("train").state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    message = assert_one_line_error(exc, path, "shape mismatches", "stem.weight", "stores no architecture config",
                                    GIVE_CONFIG, "m2ae_infer.save_checkpoint")
    assert "pass config=" not in message


def test_config_that_contradicts_the_stored_one(tmp_path):
    path = tmp_path / "net.pth"
    save_checkpoint(make_net("train"), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=M2AEConfig(**{**TINY.to_dict(), "act": "relu"}))
    message = assert_one_line_error(exc, path, "disagrees", "act (stored 'gelu', given 'relu')", GIVE_CONFIG,
                                    "leave config= out")
    assert "drop config=" not in message


def test_given_config_that_does_not_fit_names_both_ways_to_give_it(tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(make_net("train").state_dict(), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config={**TINY.to_dict(), "num_blocks": 3})
    assert_one_line_error(exc, path, "missing keys", "blocks.2.", "config given", GIVE_CONFIG, "key_map=")


# ----------------------------------------------------------------------------------------- safety
class Payload:
    """Unpickling this runs ``Path(marker).touch()``: the file must never appear."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _write_pickle(path: pathlib.Path, obj: object, writer: str) -> str:
    """``obj`` as ``writer`` stores it: torch.save (zip or legacy, any pickle protocol) or a plain pickle.dump;
    returns the loading advice a refusal must give (pickle.dump files are not torch.load-able at all)."""
    kind, _, protocol = writer.partition("-")
    if kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=int(protocol))
        return "pickle.load"
    torch.save(obj, path, _use_new_zipfile_serialization=kind == "zip", pickle_protocol=int(protocol or 2))
    return "weights_only=False"


def _load_quietly(path: pathlib.Path, **kwargs) -> list[str]:
    """load_checkpoint, which must raise; returns the warnings it let through (torch's protocol warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path, **kwargs)
    return [str(w.message) for w in caught]


WRITERS = ["zip", "legacy", "zip-4", "legacy-5", "pickle-2", "pickle-3", "pickle-4", "pickle-5"]


@pytest.mark.parametrize("writer", WRITERS)
def test_pickled_code_is_refused_not_run(tmp_path, writer):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    advice = _write_pickle(path, {"state_dict": make_net("train").state_dict(), "extra": Payload(marker)}, writer)
    with pytest.raises(CheckpointError) as exc:
        assert _load_quietly(path, config=TINY) == []
    message = assert_one_line_error(exc, path, "refusing to unpickle code", "pathlib", advice, "state_dict")
    assert "truncated" not in message and "corrupt" not in message
    assert not marker.exists()
    # the reference: an unsafe load of the same file does run the code, so the test can fail
    if writer.startswith("pickle"):
        with open(path, "rb") as f:
            pickle.load(f)
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle-2", "pickle-3", "pickle-4", "pickle-5", "zip-4", "zip-5", "legacy-4"])
def test_pickle_that_weights_only_cannot_read_is_refused_not_called_corrupt(tmp_path, writer):
    """No code inside, yet not loadable with weights_only=True: a plain pickle.dump file (any protocol) or a
    torch.save with pickle protocol >= 4. The message says so, with the advice for that kind of file."""
    path = tmp_path / "plain.pth"
    obj = {"weights": [1.0, 2.0], "name": "net"} if writer.startswith("pickle") else make_net("train").state_dict()
    advice = _write_pickle(path, obj, writer)
    with pytest.raises(CheckpointError) as exc:
        assert _load_quietly(path, config=TINY) == []
    message = assert_one_line_error(exc, path, "not a weights-only checkpoint", "refusing to unpickle",
                                    f"protocol {writer[-1]}", advice)
    assert "truncated" not in message and "corrupt" not in message and "Re-running" not in message


@pytest.mark.parametrize("writer", ["zip-3", "legacy-3"])
def test_protocol_3_torch_file_loads_without_a_warning(tmp_path, image, writer):
    net = make_net("train")
    path = tmp_path / "p3.pth"
    _write_pickle(path, net.state_dict(), writer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_checkpoint(path, config=TINY)
    assert [str(w.message) for w in caught] == []
    assert_same(loaded, net, image)


@pytest.mark.parametrize("protocol", [2, 4])
def test_truncated_plain_pickle_is_called_truncated(tmp_path, protocol):
    path = tmp_path / "cut.pth"
    path.write_bytes(pickle.dumps({"weights": [1.0] * 64}, protocol=protocol)[:-40])
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path, "truncated", "copy the file again")


# ---------------------------------------------------------------------------------- damaged files
def _write_bad(tmp_path: pathlib.Path, kind: str) -> pathlib.Path:
    """A damaged or wrong file of the given kind (or a path that is no file at all)."""
    net = make_net("train")
    save_checkpoint(net, tmp_path / "good.pth")
    save_checkpoint(net, tmp_path / "good.safetensors")
    pth, st = (tmp_path / "good.pth").read_bytes(), (tmp_path / "good.safetensors").read_bytes()
    noise = bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist())
    if kind == "directory":
        (tmp_path / "dir.pth").mkdir()
    name, payload = {
        "truncated_pth": ("cut.pth", pth[: len(pth) // 2]),
        "truncated_st": ("cut.safetensors", st[: len(st) // 2]),
        "truncated_st_header": ("cut_header.safetensors", st[:40]),   # cut inside the JSON header
        "random_pth": ("random.pth", noise),
        "random_pickle_pth": ("random2.pth", b"\x80\x02" + noise),  # looks like a pickle, is not one
        "random_st": ("random.safetensors", noise),
        "empty": ("empty.pth", b""),
        "wrong_extension": ("net.txt", pth),
        "content_mismatch": ("net.safetensors", pth),
        "directory": ("dir.pth", None),
        "missing": ("missing.pth", None),
    }[kind]
    if payload is not None:
        (tmp_path / name).write_bytes(payload)
    return tmp_path / name


@pytest.mark.parametrize("kind", ["truncated_pth", "truncated_st", "random_pth", "random_pickle_pth", "random_st",
                                  "empty", "wrong_extension", "content_mismatch", "directory", "missing"])
def test_damaged_files(tmp_path, kind):
    path = _write_bad(tmp_path, kind)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path)


def test_safetensors_cut_inside_its_header_is_called_truncated(tmp_path):
    path = _write_bad(tmp_path, "truncated_st_header")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert_one_line_error(exc, path, "truncated", "download or copy the file again")


# ------------------------------------------------------------------------------- strict checking
def _bare(tmp_path: pathlib.Path, state: dict) -> pathlib.Path:
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    return path


def test_missing_and_unexpected_keys_listed(tmp_path):
    state = make_net("train").state_dict()
    del state["tail.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = _bare(tmp_path, state)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path, "missing keys (1) [tail.weight]", "unexpected keys (1) [extra.weight]")


def test_long_key_lists_are_truncated(tmp_path):
    state = {**make_net("train").state_dict(), **{f"junk.{i}": torch.zeros(1) for i in range(20)}}
    path = _bare(tmp_path, state)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    message = assert_one_line_error(exc, path, "unexpected keys (20)", "junk.7", "12 more")
    assert "junk.8," not in message


def test_shape_mismatch_listed(tmp_path):
    wide = M2AEConfig(**{**TINY.to_dict(), "channels": 12})
    path = tmp_path / "wide.pth"
    save_checkpoint(make_net("train", config=wide), path)
    with pytest.raises(CheckpointError) as exc:  # a bare copy of it, loaded with the wrong config
        load_checkpoint(_bare(tmp_path, torch.load(path, weights_only=True)["state_dict"]), config=TINY)
    assert_one_line_error(exc, tmp_path / "edited.pth", "shape mismatches", "stem.weight [12, 12, 3, 3]")
    assert load_checkpoint(path).config == wide  # the stored config builds the right network


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_rejected(tmp_path, value):
    state = make_net("train").state_dict()
    state["blocks.1.mix_in.weight"][0, 0, 0, 0] = value
    path = _bare(tmp_path, state)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path, "non-finite", "blocks.1.mix_in.weight")


def test_integer_tensor_where_float_expected(tmp_path):
    state = make_net("train").state_dict()
    state["stem.bias"] = torch.zeros_like(state["stem.bias"], dtype=torch.int32)
    path = _bare(tmp_path, state)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path, "dtype mismatches", "stem.bias")


# ---------------------------------------------------------------------- configs the weights cannot back
HUGE = [("channels", 10**6), ("num_blocks", 10**9), ("mask_channels", 10**6), ("motion_channels", 10**6),
        ("ffn_expand", 10**6), ("mask_layers", 10**3), ("motion_points", 10**9)]


def _with_stored_config(tmp_path: pathlib.Path, suffix: str, config: dict) -> pathlib.Path:
    """A good tiny checkpoint whose stored config is replaced by ``config`` (as a hand edit or damage would)."""
    net = make_net("train")
    path = tmp_path / f"edited{suffix}"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, path, metadata={"format": "m2ae", "version": "1", "config": json.dumps(config),
                                         "deploy": "false", "meta": "{}"})
    else:
        torch.save({"format": "m2ae", "version": 1, "config": config, "deploy": False, "state_dict": state,
                    "meta": {}}, path)
    return path


def forbid_real_networks(monkeypatch) -> None:
    """From now on M2AENet may be built on the meta device (no storage) only: a real build fails the test,
    before it allocates anything."""
    original = M2AENet.__init__

    def meta_only(self, *args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise AssertionError("a network with real storage was built for a checkpoint that does not fit it")
        original(self, *args, **kwargs)

    monkeypatch.setattr(M2AENet, "__init__", meta_only)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("field, value", HUGE)
@pytest.mark.parametrize("source", ["stored", "given"])
def test_absurd_config_is_refused_before_any_network_exists(tmp_path, monkeypatch, suffix, field, value, source):
    config = {**TINY.to_dict(), field: value}
    if source == "stored":
        path = _with_stored_config(tmp_path, suffix, config)
        kwargs = {}
    else:
        path = tmp_path / f"bare{suffix}"
        state = {k: v.contiguous() for k, v in make_net("train").state_dict().items()}
        save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
        kwargs = {"config": config}

    def never(self, *args, **kwargs):
        raise AssertionError("M2AENet built for an invalid config")

    monkeypatch.setattr(M2AENet, "__init__", never)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, **kwargs)
    assert_one_line_error(exc, path, "invalid", f"M2AEConfig.{field} must be at most {LIMITS[field]}", str(value))


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("source", ["stored", "given"])
@pytest.mark.parametrize("sizes, needle", [
    (dict(channels=1024, num_blocks=64, ffn_expand=16), "shape mismatches"),  # ~15 GB of fp32 weights if built
    # 198 blocks too many x 18 keys each: conv+BN 3x3 (1+4), conv+BN 1x1 (1+4), identity BN (4), mix_in (2),
    # mix_out (2); num_batches_tracked may be missing, as torch allows for old checkpoints
    (dict(num_blocks=200), "missing keys (3564)"),
    (dict(num_blocks=1), "unexpected keys"),
])
@pytest.mark.slow
def test_config_that_does_not_match_the_tensors_is_refused_without_allocating(tmp_path, monkeypatch, suffix,
                                                                             source, sizes, needle):
    config = {**TINY.to_dict(), **sizes}
    if source == "stored":
        path = _with_stored_config(tmp_path, suffix, config)
        kwargs, fix = {}, "config stored in the file does not match its weights"
    else:
        path = tmp_path / f"bare{suffix}"
        state = {k: v.contiguous() for k, v in make_net("train").state_dict().items()}
        save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
        kwargs, fix = {"config": M2AEConfig(**config)}, "check the architecture config given"
    forbid_real_networks(monkeypatch)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, **kwargs)
    assert_one_line_error(exc, path, "does not fit M2AENet", needle, fix)


def test_the_matching_config_still_loads_with_the_meta_check(tmp_path, image):
    # the reference for the test above: the same file with its true config loads, bit for bit
    path = _with_stored_config(tmp_path, ".pth", TINY.to_dict())
    assert_same(load_checkpoint(path), make_net("train"), image)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:127] data.\n"
                                                                "DefaultCPUAllocator: not enough memory")])
def test_out_of_memory_while_building_is_a_checkpoint_error(tmp_path, monkeypatch, error):
    path = tmp_path / "net.safetensors"
    save_checkpoint(make_net("train"), path)
    original = M2AENet.__init__

    def out_of_memory(self, *args, **kwargs):
        if torch.empty(0).device.type != "meta":
            raise error
        original(self, *args, **kwargs)

    monkeypatch.setattr(M2AENet, "__init__", out_of_memory)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert_one_line_error(exc, path, "could not build the network", type(error).__name__, "free memory")


# ----------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_refuses_to_overwrite_unless_asked(tmp_path, image, suffix):
    path = tmp_path / f"net{suffix}"
    first, second = make_net("train", seed=1), make_net("train", seed=2)
    save_checkpoint(first, path)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(second, path)
    assert_one_line_error(exc, path, "overwrite=True")
    assert_same(load_checkpoint(path), first, image)
    save_checkpoint(second, path, overwrite=True)
    assert_same(load_checkpoint(path), second, image)
    assert os.listdir(tmp_path) == [path.name]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, image, monkeypatch):
    path = tmp_path / "net.pth"
    net = make_net("train")
    save_checkpoint(net, path)

    def broken_save(obj, f, *args, **kwargs):
        pathlib.Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(make_net("train", seed=3), path, overwrite=True)
    assert_one_line_error(exc, path, "disk full")
    assert os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()
    assert_same(load_checkpoint(path), net, image)


@pytest.mark.parametrize("meta, needle", [({"x": object()}, "meta['x'] is a object"),
                                          ({"x": (1, 2)}, "tuple"), ({1: "a"}, "non-string key"),
                                          ({"t": torch.zeros(1)}, "Tensor")])
def test_meta_must_be_plain(tmp_path, meta, needle):
    path = tmp_path / "net.pth"
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(make_net("train"), path, meta=meta)
    assert_one_line_error(exc, path, needle)
    assert os.listdir(tmp_path) == []


def test_partly_reparameterized_model_refused(tmp_path):
    net = make_net("train")
    net.blocks[0].reparameterize()
    path = tmp_path / "net.pth"
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(net, path)
    assert_one_line_error(exc, path, "reparameterize_model")


@pytest.mark.parametrize("name, needle", [("missing_dir/net.pth", "does not exist"), ("net.onnx", "extension"),
                                          ("adir.pth", "is a directory")])
def test_bad_destinations(tmp_path, name, needle):
    (tmp_path / "adir.pth").mkdir()
    with pytest.raises(CheckpointError) as exc:
        save_checkpoint(make_net("train"), tmp_path / name, overwrite=True)
    assert_one_line_error(exc, tmp_path / name, needle)
    assert os.listdir(tmp_path) == ["adir.pth"]


def test_newer_format_version_refused(tmp_path):
    path = tmp_path / "net.pth"
    save_checkpoint(make_net("train"), path)
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, "version": 2}, tmp_path / "v2.pth")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "v2.pth")
    assert_one_line_error(exc, tmp_path / "v2.pth", "version 2", "upgrade")


def test_invalid_key_map_regex(tmp_path):
    path = tmp_path / "net.pth"
    save_checkpoint(make_net("train"), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, key_map=[("(unclosed", "")])
    assert_one_line_error(exc, path, "invalid key_map")


def test_error_survives_pickling():  # e.g. raised in a DataLoader worker or a process pool
    import pickle

    err = pickle.loads(pickle.dumps(CheckpointError("f.pth", "is empty", "save it again")))
    assert isinstance(err, CheckpointError) and str(err) == "f.pth: is empty; save it again"


# ------------------------------------------------------------------------- hostile files (issue 18)
def _tiny_ours(state: dict | None = None) -> dict:
    state = {k: v.contiguous() for k, v in make_net("train").state_dict().items()} if state is None else state
    return {"format": "m2ae", "version": 1, "config": TINY.to_dict(), "deploy": False, "state_dict": state,
            "meta": {}}


_PEAK = """
import resource, sys
from m2ae_infer.checkpoint import CheckpointError, load_checkpoint
try:
    load_checkpoint(sys.argv[1])
    outcome = "loaded"
except CheckpointError as exc:
    outcome = str(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, outcome)
"""


def _peak_rss_kb(path: pathlib.Path) -> tuple[int, str]:
    """Peak RSS (kB) of a fresh process that loads ``path``, and what the load said."""
    proc = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, outcome = proc.stdout.strip().split(" ", 1)
    return int(peak), outcome


@pytest.mark.slow
def test_refusing_or_loading_hostile_files_costs_no_more_memory_than_a_normal_refusal(tmp_path):
    """Issue 18: a 1 MB .pth declaring a 1 GiB tensor peaked at 1.3 GB before its keys were checked. Each file here
    is judged in its own process against a small bad checkpoint refused the same way (the reference)."""
    files = {
        "reference": lambda p: torch.save({"state_dict": {"x": torch.zeros(16)}}, p),
        "bomb in the state dict": lambda p: p.write_bytes(deflated_checkpoint(
            "x", lambda: {"state_dict": {"x": torch.empty(GIB // 4)}})),
        "bomb beside the weights": lambda p: p.write_bytes(deflated_checkpoint(
            "beside", lambda: {**_tiny_ours(), "junk": torch.empty(GIB // 16)})),
        # torch.save's own (uncompressed) layout is memory-mapped: 1 GiB beside the weights is never read
        "1 GiB stored beside the weights": lambda p: sparse_checkpoint({**_tiny_ours(), "junk": torch.empty(GIB // 4)},
                                                                       p),
    }
    peaks, outcomes = {}, {}
    for name, write in files.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pth"
        write(path)
        assert path.stat().st_blocks * 512 < 8 * 2**20, "the test files themselves stay small on disk"
        peaks[name], outcomes[name] = _peak_rss_kb(path)
    for name, peak in peaks.items():   # first: the bound the issue sets
        assert peak <= peaks["reference"] + 50 * 1024, (name, peaks)
    assert "unexpected keys (1) [x]" in outcomes["reference"]
    assert "unexpected keys (1) [x]" in outcomes["bomb in the state dict"]
    declared = re.search(r"records declare (\d+) bytes", outcomes["bomb beside the weights"])
    assert declared and int(declared.group(1)) >= GIB // 4
    assert "refusing to inflate" in outcomes["bomb beside the weights"]
    assert outcomes["1 GiB stored beside the weights"] == "loaded"


def test_object_pickle_over_the_cap_is_refused_from_the_zip_directory(tmp_path, monkeypatch):
    """A compressed data.pkl may unpack to gigabytes (a 512 MiB string took 1.8 GB): its declared size is read off
    the zip directory and refused before torch.load unpickles anything."""
    from m2ae_infer import checkpoint_source
    path = tmp_path / "big_meta.pth"
    torch.save({**_tiny_ours(), "meta": {"note": "a" * 5000}}, path)
    monkeypatch.setattr(checkpoint_source, "MAX_PICKLE_BYTES", 4096)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert_one_line_error(exc, path, "data.pkl declares", "more than the 4096", "refusing to unpack it")


def test_compressed_checkpoint_within_the_budget_still_loads(tmp_path, image):
    """The reference for the bombs: the same tiny checkpoint re-zipped with ZIP_DEFLATED loads bit for bit."""
    net = make_net("train")
    stored, path = tmp_path / "stored.pth", tmp_path / "deflated.pth"
    save_checkpoint(net, stored)
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert_same(load_checkpoint(path), net, image)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_colliding_prefixes_are_refused_not_a_silent_choice(tmp_path, suffix, prefix):
    """Issue 18: the shipped weights plus zeroed ``module.`` copies loaded the zeros for 44 of 52 tensors, exit 0.
    Stripping now refuses two keys landing on one name, as key_map does, listing them."""
    state = {k: v.contiguous() for k, v in make_net("train").state_dict().items()}
    both = {**state, **{prefix + k: torch.zeros_like(v) for k, v in state.items()}}
    path = tmp_path / f"ddp{suffix}"
    save_file(both, path) if suffix == ".safetensors" else torch.save(both, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    message = assert_one_line_error(exc, path, "stripping the module./_orig_mod. prefixes maps several keys onto "
                                    f"one name: ({len(state)}) [", "keep one copy")
    name, *sources = re.search(r"one name: \(\d+\) \[(\S+) <- (\S+) \+ (\S+),", message).groups()
    assert sorted(sources) == sorted([name, prefix + name]), message


@pytest.mark.parametrize("entry, text", [("config", "[" * 100000 + "]" * 100000),
                                         ("meta", "{\"a\": " * 5000 + "1" + "}" * 5000),
                                         ("config", "{\"channels\": 1e999999}"), ("meta", "[1, 2]")])
def test_odd_or_deeply_nested_json_metadata_is_a_checkpoint_error(tmp_path, entry, text):
    """Issue 18: a "[" * 100000 config raised a raw RecursionError, and the CLI line did not name the file."""
    path = _with_stored_config(tmp_path, ".safetensors", TINY.to_dict())
    with safe_open(path, framework="pt") as f:
        metadata, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(state, path, metadata={**metadata, entry: text})
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert_one_line_error(exc, path, "re-save")


def test_deeply_nested_meta_in_a_pth_is_a_checkpoint_error(tmp_path):
    meta: dict = {}
    for _ in range(40):
        meta = {"a": meta}
    path = tmp_path / "nested.pth"
    torch.save({**_tiny_ours(), "meta": meta}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert_one_line_error(exc, path, "stored meta", "nested more than 32 levels deep")


def test_huge_safetensors_header_length_is_diagnosed_as_such(tmp_path):
    """Issue 18: a header length of 0x80 + 2**40 (first byte 0x80, like a pickle) was called 'content is torch'."""
    path = tmp_path / "net.safetensors"
    path.write_bytes(struct.pack("<Q", 0x80 + 2**40) + b'{"x": 1}' + bytes(64))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    message = assert_one_line_error(exc, path, f"header length field says {0x80 + 2**40} bytes", "damaged")
    assert "torch" not in message


def test_oversized_safetensors_header_is_refused_before_parsing(tmp_path, monkeypatch):
    from m2ae_infer import checkpoint_source
    path = _with_stored_config(tmp_path, ".safetensors", TINY.to_dict())
    monkeypatch.setattr(checkpoint_source, "MAX_HEADER_BYTES", 1024)
    import safetensors
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: pytest.fail("the header was parsed"))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert_one_line_error(exc, path, "more than the 1024 bytes")


def test_safetensors_tensors_are_read_only_after_the_structure_fits(tmp_path, monkeypatch):
    """A small header may declare a huge tensor (the data a hole of a sparse file): the misfit is refused from the
    header (shapes on the meta device); no tensor is read."""
    path = tmp_path / "huge.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [GIB // 4], "data_offsets": [0, GIB]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + GIB)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("load_file read everything"))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path, "unexpected keys (1) [x]")


def test_empty_and_control_character_keys_are_shown_escaped(tmp_path):
    state = {k: v.contiguous() for k, v in make_net("train").state_dict().items()}
    path = tmp_path / "odd.pth"
    torch.save({**state, "module.": torch.zeros(1), "evil\nkey\x1b[2J": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path, config=TINY)
    assert_one_line_error(exc, path, "unexpected keys (2) ['', evil\\nkey\\x1b[2J]")


def test_file_name_with_control_characters_is_shown_escaped(tmp_path):
    path = tmp_path / "bad\nname\r.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    message = str(exc.value)
    assert "\n" not in message and "\r" not in message and "bad\\nname\\r.pth: is empty" in message


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_and_dataless_tensors_are_checkpoint_errors(tmp_path, kind):
    """Issue 18: these raised raw NotImplementedError / RuntimeError from the value check."""
    state = {k: v.contiguous() for k, v in make_net("train").state_dict().items()}
    state["stem.bias"] = state["stem.bias"].to_sparse() if kind == "sparse" else torch.empty_like(
        state["stem.bias"], device="meta")
    path = tmp_path / f"{kind}.pth"
    torch.save(_tiny_ours(state), path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert_one_line_error(exc, path, "sparse tensors" if kind == "sparse" else "tensors without data", "stem.bias")
