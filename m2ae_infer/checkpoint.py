"""Saving and loading M2AENet checkpoints: safely (no pickled code ever runs) and strictly.

Our format is ``{"format": "m2ae", "version": 1, "config": M2AEConfig.to_dict(), "deploy": bool,
"state_dict": {name: tensor}, "meta": {...}}`` in ``.pth``/``.pt`` (plain types only, so
``torch.load(weights_only=True)`` opens it), or the tensors in ``.safetensors`` with string metadata
``format``, ``version``, ``config`` (JSON), ``deploy`` (``"true"``/``"false"``) and ``meta`` (JSON).

Loading follows timm's stages: **read** (``weights_only=True`` or safetensors, never an unsafe fallback)
-> **clean** (wrappers ``params_ema`` > ``params`` > ``state_dict`` > ``model`` > ``ema`` > ``net``;
``module.`` / ``_orig_mod.`` prefixes) -> **filter** (the user's regex ``key_map``, applied to cleaned names)
-> **check** keys, shapes, dtypes and finiteness against the network *before* copying anything, so a misfit
is one :class:`CheckpointError` listing the offending keys, never a half-loaded model.

Decisions: a bare state dict carries no config, so pass ``config=``; without one ``M2AEConfig()`` is
assumed and a misfit says so (nothing is inferred from shapes: ``act`` or ``motion_points`` leave no
trace there). ``config=`` contradicting a stored config is an error. The stored ``deploy`` flag picks the
form; for bare state dicts the keys do (``blocks.N.spatial.*`` deploy, ``.rbr_*``/``motion.trajectory.*``
training), and a deploy checkpoint loads into a deploy-form network, unmerged. Missing BatchNorm
``num_batches_tracked`` buffers are tolerated, as ``torch`` does for old checkpoints.

The check runs against the network built on the ``meta`` device (shapes and dtypes, no storage), so a config
that does not match the stored tensors, however large it claims to be, is refused before any weight memory
is allocated. When ``torch.load`` fails, the file's main pickle is read with :mod:`pickletools` (which
parses opcodes, never executes them) to tell code, a pickle that weights-only loading cannot read
(``pickle.dump`` files, protocol >= 4) and a truncated or corrupt file apart. Messages name the Python
argument and the CLI option together: of the CLIs only ``m2ae-train`` takes an architecture (``--config``).
"""
from __future__ import annotations

import json
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch

from .atomic import atomic_path
from .config import M2AEConfig
from .messages import one_line
from .model.network import M2AENet
from .pickle_scan import scan_main_pickle

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "read_checkpoint", "load_checkpoint"]

FORMAT, VERSION = "m2ae", 1
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "ema", "net")  # preference order
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
SHOWN = 8  # keys listed per category in an error message
GIVE_CONFIG = "Python: config=...; m2ae-train: --config ..."  # how an architecture is given (m2ae-deblur cannot)
TRUST_TORCH = ("if you trust it, torch.load it with weights_only=False in a trusted environment and "
               "re-save model.state_dict() with torch.save or m2ae_infer.save_checkpoint")
TRUST_PICKLE = ("if you trust it, pickle.load it in a trusted environment and re-save the weights with "
                "torch.save(state_dict, path) or m2ae_infer.save_checkpoint")

PathLike = Union[str, "os.PathLike[str]"]
KeyMap = Union[Sequence[tuple[str, str]], Mapping[str, str]]


class CheckpointError(ValueError):
    """A checkpoint could not be written or read; the message is one line naming the file, problem and fix."""

    def __init__(self, path: PathLike, problem: str = "", fix: str = ""):
        # CheckpointError(message) alone also works (and is what unpickling the exception calls)
        text = os.fspath(path) + (f": {problem}" if problem else "") + (f"; {fix}" if fix else "")
        super().__init__(one_line(text))  # one line, whatever the wrapped exception printed


@dataclass
class Checkpoint:
    """A read and cleaned checkpoint (stages 1-3), before it is checked against a network.

    ``config`` and ``deploy`` are ``None`` where the file does not store them (bare state dicts).
    """

    path: Path
    state_dict: dict[str, torch.Tensor]
    config: M2AEConfig | None = None
    deploy: bool | None = None
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- saving
def save_checkpoint(model: M2AENet, path: PathLike, *, meta: dict[str, Any] | None = None,
                    overwrite: bool = False) -> None:
    """Write ``model`` (training or deploy form) in our format, atomically.

    Args:
        model: the network; its config and form (``model.inference_mode``) are stored with the weights.
        path: ``.pth``/``.pt`` (torch zip, loadable with ``weights_only=True``) or ``.safetensors``.
        meta: free-form information; str/int/float/bool/None and lists/str-keyed dicts of those only.
        overwrite: replace an existing file (otherwise an existing file is an error).
    """
    path = Path(path)
    if not isinstance(model, M2AENet):
        raise CheckpointError(path, f"cannot save a {type(model).__name__}", "pass an M2AENet")
    deploy = model.inference_mode
    if not deploy and any(stage.inference_mode for stage in model.stages()):
        raise CheckpointError(path, "the model is only partly re-parameterized",
                              "call m2ae_infer.reparameterize_model(model) before saving")
    meta = {} if meta is None else meta
    _check_meta(path, meta, "meta")
    suffix = _suffix(path)
    if path.is_dir():
        raise CheckpointError(path, "is a directory", "give a file name")
    if not path.parent.is_dir():
        raise CheckpointError(path, "the destination directory does not exist", "create it first")
    if path.exists() and not overwrite:
        raise CheckpointError(path, "file exists", "pass overwrite=True to replace it")
    # clone: a view must not drag its whole storage into the file, and safetensors refuses shared memory
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    _check_values(path, state)
    config = model.config.to_dict()

    def write(tmp: str) -> None:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file
            save_file(state, tmp, metadata={"format": FORMAT, "version": str(VERSION),
                                            "config": json.dumps(config), "deploy": "true" if deploy else "false",
                                            "meta": json.dumps(meta)})
        else:
            torch.save({"format": FORMAT, "version": VERSION, "config": config, "deploy": deploy,
                        "state_dict": state, "meta": meta}, tmp)

    _atomic_write(path, write)


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_name)`` into a temporary file beside ``path``, then rename over it (:mod:`m2ae_infer.atomic`)."""
    try:
        with atomic_path(path, overwrite=True) as tmp:
            write(str(tmp))
    except Exception as exc:  # the temp file is already gone (KeyboardInterrupt passes through untouched)
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(path, f"could not write ({type(exc).__name__}: {exc})") from exc


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise CheckpointError(path, f"unsupported extension {suffix or '(none)'!r}",
                              f"use one of {', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)}")
    return suffix


def _check_meta(path: Path, value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, (list, dict)):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(value, dict) and not isinstance(key, str):
                raise CheckpointError(path, f"{where} has a non-string key {key!r}", "use string keys")
            _check_meta(path, item, f"{where}[{key!r}]")
        return
    raise CheckpointError(path, f"{where} is a {type(value).__name__}",
                          "meta may hold only str/int/float/bool/None and lists/dicts of those")


# --------------------------------------------------------------------------------------- loading
def read_checkpoint(path: PathLike, *, key_map: KeyMap | None = None, map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint file and clean its state dict, without building a network.

    Args:
        path: a ``.pth``/``.pt``/``.bin``/``.ckpt`` torch file or a ``.safetensors`` file.
        key_map: regex rules ``[(pattern, replacement), ...]`` (or a dict), applied in order with
            ``re.sub`` to every key after wrappers and prefixes are removed.
        map_location: where tensors are loaded (``torch.load``'s argument).
    """
    path = Path(path)
    read = _read_safetensors if _sniff(path) == "safetensors" else _read_torch
    ckpt = read(path, map_location)
    ckpt.state_dict = _apply_key_map(path, _strip_prefixes(ckpt.state_dict), key_map)
    return ckpt


def load_checkpoint(path: PathLike, *, config: M2AEConfig | Mapping[str, Any] | None = None,
                    key_map: KeyMap | None = None, map_location: Any = "cpu") -> M2AENet:
    """Load a checkpoint into a new :class:`M2AENet`, returned in eval mode, in the form it was stored.

    Args:
        path: checkpoint file (see :func:`read_checkpoint`).
        config: architecture of a bare state dict; must agree with a stored config if both exist.
        key_map: regex renaming rules for checkpoints trained elsewhere (see :func:`read_checkpoint`).
        map_location: device for the tensors; the network is moved there when it names a device.
    Raises:
        CheckpointError: unreadable/unsafe file, or keys/shapes/dtypes/values that do not fit the network.
    """
    ckpt = read_checkpoint(path, key_map=key_map, map_location=map_location)
    path = ckpt.path
    if config is not None and not isinstance(config, M2AEConfig):
        try:
            config = M2AEConfig.from_dict(config)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(path, f"the architecture config given is invalid ({exc})",
                                  f"fix it ({GIVE_CONFIG})") from exc
    if config is not None and ckpt.config is not None and config != ckpt.config:
        stored = ckpt.config.to_dict()
        differ = ", ".join(f"{k} (stored {stored[k]!r}, given {v!r})" for k, v in config.to_dict().items()
                           if stored[k] != v)
        raise CheckpointError(path, f"the architecture config given disagrees with the one stored in the file on "
                              f"{differ}", f"give the stored values ({GIVE_CONFIG}) or, in Python, leave config= "
                              "out to use the stored config")
    cfg = ckpt.config or config or M2AEConfig()
    deploy = ckpt.deploy if ckpt.deploy is not None else _looks_deployed(ckpt.state_dict)
    _check_fit(path, ckpt.state_dict, _network_state(cfg, deploy), _fit_advice(ckpt.config, config, key_map))
    _check_values(path, ckpt.state_dict)
    try:  # the shapes fit, so the network is no larger than the tensors already read
        model = M2AENet(cfg, inference_mode=deploy)
    except (MemoryError, RuntimeError) as exc:
        raise CheckpointError(path, f"could not build the network of {cfg} ({type(exc).__name__}: "
                              f"{one_line(exc, 160)})", "free memory or load it on a larger machine") from exc
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except (MemoryError, RuntimeError) as exc:  # pre-checked above; kept so nothing half-loaded escapes
        raise CheckpointError(path, f"state dict does not fit ({type(exc).__name__}: {one_line(exc, 160)})") from exc
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    model.checkpoint_meta = dict(ckpt.meta)   # e.g. the dev-chosen "threshold" the API defaults to
    return model.eval()


def _sniff(path: Path) -> str:
    """'torch' or 'safetensors' from the file's first bytes, checked against its extension."""
    if not path.exists():
        raise CheckpointError(path, "no such file", "check the path")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file", "give the checkpoint file inside it")
    suffix = _suffix(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if size == 0:
        raise CheckpointError(path, "is empty", "the file was not written completely; save it again")
    # safetensors first: its header length (u64 little-endian) may start with 0x80, a pickle's first byte
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        kind = "safetensors"
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        kind = "torch"
    elif len(head) == 9 and head[8:9] == b"{" and suffix in SAFETENSORS_SUFFIXES:   # the header runs past the end
        raise CheckpointError(path, f"truncated (its safetensors header says {struct.unpack('<Q', head[:8])[0]} "
                              f"bytes, the file has {size - 8} after the length)", "download or copy the file again")
    else:
        raise CheckpointError(path, "unrecognized content (neither a torch checkpoint nor safetensors)",
                              "check that this is the right file and that it was copied completely")
    expected = "safetensors" if suffix in SAFETENSORS_SUFFIXES else "torch"
    if kind != expected:
        raise CheckpointError(path, f"the extension says {expected} but the content is {kind}",
                              "rename the file with the matching extension")
    return kind


def _read_torch(path: Path, map_location: Any) -> Checkpoint:
    try:  # weights_only=True always: a file that needs code is refused, never retried unsafely
        with warnings.catch_warnings():  # torch's two-line protocol warning; a failure is explained below
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # refused code, a pickle weights-only cannot read, or a truncated/damaged file
        raise _load_failure(path, exc) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict or a dict of them")
    if obj.get("format") == FORMAT:
        return _ours(path, obj.get("state_dict"), obj.get("version"), obj.get("config"), obj.get("deploy"),
                     obj.get("meta", {}))
    return Checkpoint(path, _unwrap(path, obj))


def _read_safetensors(path: Path, map_location: Any) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path, device=device)
    except Exception as exc:  # SafetensorError (truncated header/data), OSError, ...
        raise _corrupt(path, exc) from exc
    if metadata.get("format") != FORMAT:
        return Checkpoint(path, _unwrap(path, state))
    try:
        config, meta = json.loads(metadata.get("config", "null")), json.loads(metadata.get("meta", "{}"))
    except ValueError as exc:
        raise CheckpointError(path, f"damaged m2ae metadata ({exc})", "re-save the checkpoint") from exc
    deploy = {"true": True, "false": False}.get(metadata.get("deploy", ""))
    return _ours(path, state, metadata.get("version"), config, deploy, meta)


def _load_failure(path: Path, exc: Exception) -> CheckpointError:
    """Why ``torch.load(weights_only=True)`` failed, from the file's main pickle (see :func:`m2ae_infer.pickle_scan.scan_main_pickle`)."""
    scan = scan_main_pickle(path)
    text = str(exc)
    if scan is None:  # not even the container opens (a zip cut short, ...)
        return _corrupt(path, exc)
    if scan.damage:
        return CheckpointError(path, scan.damage, "download or copy the file again")
    fix = TRUST_PICKLE if scan.ordinary else TRUST_TORCH
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    needs = scan.needs or ([refused.group(1)] if refused else [])
    if needs:
        shown = ", ".join(needs[:3]) + (f" and {len(needs) - 3} more" if len(needs) > 3 else "")
        return CheckpointError(path, f"refusing to unpickle code (the file needs {shown})", fix)
    if scan.ordinary:
        return CheckpointError(path, f"not a weights-only checkpoint (an ordinary pickle, protocol {scan.protocol}, "
                               "not a torch.save file): refusing to unpickle it", fix)
    if "Weights only load failed" in text:  # a clean pickle the weights-only unpickler cannot read
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
        why = (f"saved with pickle protocol {scan.protocol}, which torch.load(weights_only=True) cannot read"
               if scan.protocol >= 4 else f"torch.load(weights_only=True) cannot read it: "
               f"{one_line(detail.group(1) if detail else text, 160)}")
        return CheckpointError(path, f"not a weights-only checkpoint ({why}): refusing to unpickle it", fix)
    return _corrupt(path, exc)


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    detail = one_line(exc, 160)
    return CheckpointError(path, f"truncated or corrupt ({type(exc).__name__}: {detail})",
                           "download or copy the file again")


def _ours(path: Path, state: Any, version: Any, config: Any, deploy: Any, meta: Any) -> Checkpoint:
    """Validate the entries of our format (the same for .pth and .safetensors once decoded)."""
    if str(version) != str(VERSION):
        raise CheckpointError(path, f"m2ae checkpoint version {version!r} is not supported (this reader: {VERSION})",
                              "upgrade m2ae-infer")
    if not isinstance(deploy, bool) or not isinstance(meta, dict):
        raise CheckpointError(path, "damaged m2ae checkpoint (bad 'deploy' or 'meta' entry)", "re-save it")
    try:
        cfg = M2AEConfig.from_dict(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"stored config is invalid ({exc})", "re-save it with a valid config") from exc
    return Checkpoint(path, _tensor_dict(path, state), cfg, deploy, meta)


def _tensor_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(path, "the state dict is missing or empty")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"state dict entries that are not tensors: {_listing(bad)}")
    return dict(obj)


def _unwrap(path: Path, obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Stage 2a: descend through training-framework wrappers until a flat ``{name: tensor}`` dict."""
    while obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            keys = [str(k) for k in obj]
            raise CheckpointError(path, f"no state dict found among the top-level keys {_listing(keys)}",
                                  f"expected a bare state dict or one under {'/'.join(WRAPPER_KEYS)}")
        obj = inner
    return _tensor_dict(path, obj)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 2b: drop ``module.`` / ``_orig_mod.`` (any nesting) from the front of every key."""
    out = {}
    for key, value in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _apply_key_map(path: Path, state: dict[str, torch.Tensor], key_map: KeyMap | None) -> dict[str, torch.Tensor]:
    """Stage 3: the user's regex rules, applied in order to every key; two keys landing on one is an error."""
    if not key_map:
        return state
    rules = list(key_map.items()) if isinstance(key_map, Mapping) else list(key_map)
    try:
        compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    except (re.error, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid key_map ({exc})", "give [(regex, replacement), ...]") from exc
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in compiled:
            new = pattern.sub(replacement, new)
        if new in out:
            raise CheckpointError(path, f"key_map maps two keys onto {new!r}", "make the rules one-to-one")
        out[new] = value
    return out


def _looks_deployed(state: Mapping[str, torch.Tensor]) -> bool:
    """Form of a bare state dict, read off its keys (training form when nothing tells)."""
    if any(".rbr_" in k or k.startswith("motion.trajectory.") for k in state):
        return False
    return any(re.match(r"blocks\.\d+\.spatial\.", k) for k in state)


def _network_state(cfg: M2AEConfig, deploy: bool) -> dict[str, torch.Tensor]:
    """The network's state dict on the ``meta`` device: every key, shape and dtype, no storage allocated."""
    with torch.device("meta"):
        return M2AENet(cfg, inference_mode=deploy).state_dict()


def _fit_advice(stored: M2AEConfig | None, given: M2AEConfig | None, key_map: KeyMap | None) -> str:
    """What to do when the tensors do not fit the network built from the stored, given or default config."""
    rename = "check key_map" if key_map else ("for a checkpoint trained elsewhere rename its keys "
                                              "(Python: key_map=[(regex, replacement), ...])")
    if stored is not None:
        return ("the config stored in the file does not match its weights: re-save the checkpoint from its model "
                f"with m2ae_infer.save_checkpoint, or {rename}")
    if given is not None:
        return f"check the architecture config given ({GIVE_CONFIG}); {rename}"
    return (f"the file stores no architecture config and the default one does not fit: give it ({GIVE_CONFIG}) "
            "or re-save the checkpoint with m2ae_infer.save_checkpoint, which stores it")


def _check_fit(path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
               fix: str) -> None:
    """Keys, shapes and dtype kinds against the network's own state dict: one error listing all misfits."""
    common = [(k, state[k], v) for k, v in expected.items() if k in state]
    misfits = {
        "missing keys": [k for k in expected if k not in state and not k.endswith("num_batches_tracked")],
        "unexpected keys": [k for k in state if k not in expected],
        "shape mismatches": [f"{k} {list(got.shape)} vs network {list(want.shape)}"
                             for k, got, want in common if got.shape != want.shape],
        "dtype mismatches": [f"{k} {got.dtype} vs network {want.dtype}"
                             for k, got, want in common if got.is_floating_point() != want.is_floating_point()],
    }
    problems = [f"{what} {_listing(keys)}" for what, keys in misfits.items() if keys]
    if problems:
        raise CheckpointError(path, "does not fit M2AENet: " + "; ".join(problems), fix)


def _check_values(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, f"non-finite values (NaN/Inf) in {key!r}",
                                  "the weights are broken; use an earlier checkpoint")


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return f"({len(items)}) [{shown}" + (f", ... {len(items) - SHOWN} more]" if len(items) > SHOWN else "]")
