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

The check runs on the file's *structure* (its tensors on the ``meta`` device, no data read:
:mod:`m2ae_infer.checkpoint_source`) against the network built on the ``meta`` device, so a config or a tensor
that does not fit, however large it claims to be, is refused before any of its memory is allocated; compressed
records that would inflate to far more than the network's weights are refused from the zip directory, and the
stripping of prefixes refuses two keys landing on one name as ``key_map`` does. When ``torch.load`` fails,
the file's main pickle is read with :mod:`pickletools` (which parses opcodes, never executes them) to tell
code, a pickle that weights-only loading cannot read (``pickle.dump`` files, protocol >= 4) and a truncated or
corrupt file apart. Messages name the Python argument and the CLI option together: of the CLIs only
``m2ae-train`` takes an architecture (``--config``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from .atomic import atomic_path
from .checkpoint_source import (FORMAT, SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, WRAPPER_KEYS, CheckpointError,
                                CheckpointSource, Contents, checked_suffix, listing)
from .config import M2AEConfig
from .messages import one_line, shown
from .model.network import M2AENet

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "read_checkpoint", "load_checkpoint"]

VERSION = 1
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
GIVE_CONFIG = "Python: config=...; m2ae-train: --config ..."  # how an architecture is given (m2ae-deblur cannot)
MAX_META_DEPTH = 32   # nesting of the free-form meta (lists and dicts); ours holds 2-3 levels
# Compressed tensor records are inflated whole by torch.load (stored ones are memory-mapped): their declared
# size may be at most INFLATE_FACTOR x the network's weights + INFLATE_SLACK (a checkpoint may carry an EMA copy
# or small extras), and never above MAX_INFLATED_BYTES (~30x the `large` variant).
INFLATE_FACTOR, INFLATE_SLACK, MAX_INFLATED_BYTES = 4, 16 * 2**20, 256 * 2**20

PathLike = Union[str, "os.PathLike[str]"]
KeyMap = Union[Sequence[tuple[str, str]], Mapping[str, str]]


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
    return checked_suffix(path)


def _check_meta(path: Path, value: Any, where: str, depth: int = 0) -> None:
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if depth >= MAX_META_DEPTH:
        raise CheckpointError(path, f"{where} is nested more than {MAX_META_DEPTH} levels deep",
                              "meta may hold only a few levels of lists/dicts")
    if isinstance(value, (list, dict)):
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(value, dict) and not isinstance(key, str):
                raise CheckpointError(path, f"{where} has a non-string key {key!r}", "use string keys")
            _check_meta(path, item, f"{where}[{shown(key)!r}]" if depth < 4 else f"{where}[...]", depth + 1)
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
        map_location: where tensors are loaded: a device (the state dict's tensors are moved there), or any
            other ``torch.load`` ``map_location``. Tensors of an uncompressed torch zip are memory-mapped.
    """
    source = CheckpointSource.open(path)
    structure = _clean(source, source.read("meta"), key_map)
    deploy = structure.deploy if structure.deploy is not None else _looks_deployed(structure.state_dict)
    _check_inflated(source, _network_state(structure.config or M2AEConfig(), deploy))
    return _clean(source, source.read(map_location), key_map)


def load_checkpoint(path: PathLike, *, config: M2AEConfig | Mapping[str, Any] | None = None,
                    key_map: KeyMap | None = None, map_location: Any = "cpu") -> M2AENet:
    """Load a checkpoint into a new :class:`M2AENet`, returned in eval mode, in the form it was stored.

    Keys, shapes and dtypes are checked on the file's structure (no tensor data read) against the network built
    on the meta device, so a misfit, however large the tensors it declares, is refused before allocating them.

    Args:
        path: checkpoint file (see :func:`read_checkpoint`).
        config: architecture of a bare state dict; must agree with a stored config if both exist.
        key_map: regex renaming rules for checkpoints trained elsewhere (see :func:`read_checkpoint`).
        map_location: device for the tensors; the network is moved there when it names a device.
    Raises:
        CheckpointError: unreadable/unsafe file, or keys/shapes/dtypes/values that do not fit the network.
    """
    source = CheckpointSource.open(path)
    path = source.path
    structure = _clean(source, source.read("meta"), key_map)
    if config is not None and not isinstance(config, M2AEConfig):
        try:
            config = M2AEConfig.from_dict(config)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(path, f"the architecture config given is invalid ({exc})",
                                  f"fix it ({GIVE_CONFIG})") from exc
    if config is not None and structure.config is not None and config != structure.config:
        stored = structure.config.to_dict()
        differ = ", ".join(f"{k} (stored {stored[k]!r}, given {v!r})" for k, v in config.to_dict().items()
                           if stored[k] != v)
        raise CheckpointError(path, f"the architecture config given disagrees with the one stored in the file on "
                              f"{differ}", f"give the stored values ({GIVE_CONFIG}) or, in Python, leave config= "
                              "out to use the stored config")
    cfg = structure.config or config or M2AEConfig()
    deploy = structure.deploy if structure.deploy is not None else _looks_deployed(structure.state_dict)
    expected = _network_state(cfg, deploy)
    fix = _fit_advice(structure.config, config, key_map)
    _check_fit(path, structure.state_dict, expected, fix)
    _check_inflated(source, expected)
    # The network is built on the CPU and moved afterwards; the tensors are read there (mapped where possible).
    device = map_location if isinstance(map_location, (str, torch.device)) else None
    ckpt = _clean(source, source.read("cpu" if device is not None else map_location), key_map)
    _check_fit(path, ckpt.state_dict, expected, fix)   # the same file read again: cheap, and it may have changed
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
    if device is not None:
        model.to(device)
    model.checkpoint_meta = dict(ckpt.meta)   # e.g. the dev-chosen "threshold" the API defaults to
    return model.eval()


def _clean(source: CheckpointSource, contents: Contents, key_map: KeyMap | None) -> Checkpoint:
    """Stages 2-3 on what one pass read: our format's entries validated, prefixes stripped, key_map applied."""
    path = source.path
    state = _apply_key_map(path, _strip_prefixes(path, contents.state_dict), key_map)
    if contents.entries is None:
        return Checkpoint(path, state)
    return _ours(path, state, **contents.entries)


def _ours(path: Path, state: dict[str, torch.Tensor], version: Any, config: Any, deploy: Any,
          meta: Any) -> Checkpoint:
    """Validate the entries of our format (the same for .pth and .safetensors once decoded)."""
    if str(version) != str(VERSION):
        raise CheckpointError(path, f"m2ae checkpoint version {version!r} is not supported (this reader: "
                              f"{VERSION})", "upgrade m2ae-infer")
    if not isinstance(deploy, bool) or not isinstance(meta, dict):
        raise CheckpointError(path, "damaged m2ae checkpoint (bad 'deploy' or 'meta' entry)", "re-save it")
    _check_meta(path, meta, "stored meta")
    try:
        cfg = M2AEConfig.from_dict(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(path, f"stored config is invalid ({exc})", "re-save it with a valid config") from exc
    return Checkpoint(path, state, cfg, deploy, meta)


def _strip_prefixes(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage 2b: drop ``module.`` / ``_orig_mod.`` (any nesting) from the front of every key."""
    def strip(key: str) -> str:
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        return key

    return _rename(path, state, strip, "stripping the module./_orig_mod. prefixes",
                   "the file holds the same weights twice, wrapped and plain: keep one copy of each and re-save it")


def _apply_key_map(path: Path, state: dict[str, torch.Tensor], key_map: KeyMap | None) -> dict[str, torch.Tensor]:
    """Stage 3: the user's regex rules, applied in order to every key."""
    if not key_map:
        return state
    rules = list(key_map.items()) if isinstance(key_map, Mapping) else list(key_map)
    try:
        compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    except (re.error, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid key_map ({exc})", "give [(regex, replacement), ...]") from exc

    def apply(key: str) -> str:
        for pattern, replacement in compiled:
            key = pattern.sub(replacement, key)
        return key

    return _rename(path, state, apply, "key_map", "make the rules one-to-one")


def _rename(path: Path, state: dict[str, torch.Tensor], rename: Callable[[str], str], what: str,
            fix: str) -> dict[str, torch.Tensor]:
    """``state`` with every key renamed; several keys landing on one name is an error listing them all, never a
    silent choice of one of the tensors."""
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, list[str]] = {}
    for key, value in state.items():
        new = rename(key)
        sources.setdefault(new, []).append(key)
        out[new] = value
    clashes = [f"{shown(new) or repr(new)} <- {' + '.join(shown(k) or repr(k) for k in keys)}"
               for new, keys in sources.items() if len(keys) > 1]
    if clashes:
        raise CheckpointError(path, f"{what} maps several keys onto one name: {listing(clashes)}", fix)
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


def _check_inflated(source: CheckpointSource, expected: Mapping[str, torch.Tensor]) -> None:
    """Compressed tensor records (inflated whole by ``torch.load``) declaring far more than the network's weights
    (``expected``, on the meta device): refused before anything is inflated (a 1 MB zip can declare 1 GB)."""
    if not source.inflated:
        return
    weights = sum(t.numel() * t.element_size() for t in expected.values())
    limit = min(INFLATE_FACTOR * weights + INFLATE_SLACK, MAX_INFLATED_BYTES)
    if source.inflated > limit:
        raise CheckpointError(source.path, f"its compressed tensor records declare {source.inflated} bytes once "
                              f"inflated, more than the {limit} a network with {weights} bytes of weights can need "
                              "(a zip bomb, or a file holding much more than the weights): refusing to inflate it",
                              "re-save the weights alone, uncompressed: torch.save(model.state_dict(), path)")


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
    problems = [f"{what} {listing(keys)}" for what, keys in misfits.items() if keys]
    if problems:
        raise CheckpointError(path, "does not fit M2AENet: " + "; ".join(problems), fix)


def _check_values(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(path, f"non-finite values (NaN/Inf) in {shown(key)!r}",
                                  "the weights are broken; use an earlier checkpoint")
