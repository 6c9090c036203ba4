"""``m2ae-train --out DIR``: train M2AENet on synthetic local motion blur (``m2ae_infer.data.synth``).

Loss = Charbonnier(restored, sharp) (the annotated blur's pixels weighted ``--blur-weight``) + w_reblur * L1 reblur
(inside the annotated mask) + w_mask * (BCE + Dice).
AdamW (no decay on biases/norms), linear warm-up then cosine, global-norm clipping. The body is gated by the
annotated working mask (``M2AENet.forward_train``). Data: a pool of ``--pool`` synthetic samples on the
training photos only, generated lazily (about 40 ms each at 128 px) and cached in fp16, served in a fixed
per-epoch permutation with one of the 8 dihedral transforms, both drawn from (seed, stream index): the
batch of step s is a pure function of (settings, s), which is what makes ``--resume`` exact.

Files in DIR: ``last.pth`` (training form, our checkpoint format), ``last_state.pt`` (optimizer, scheduler,
step, RNG, settings; plain tensors, ``weights_only=True`` loads it), ``train_log.csv``, and at the end
``final_deploy.safetensors`` (re-parameterized) plus a validation score (in the meta of both, scored by
``m2ae-eval``'s :func:`~m2ae_infer.evaluate.evaluate`) on the dev photos (``--exclude-photos``) or on new samples
of the training photos; the held-out photos are for ``m2ae-eval`` only. The settings that define a run:
:class:`~m2ae_infer.train_settings.RunSettings`.
Exit codes: 0 done (or stopped cleanly by --time-limit/--stop-after), 1 a run-time failure, 2 bad options,
130 interrupted (state saved).
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .atomic import atomic_path, atomic_write
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .config import VARIANTS, M2AEConfig
from .model.mask import full_resolution, working_mask
from .model.motion import reblur
from .model.network import M2AENet
from .reparam import expand_model, reparameterize_model
from .cliutil import OneLineArgumentParser, cli_main, path_arg, progress_stream, say, writable_folder
# the settings that define a run (stored in last_state.pt; --resume refuses to change them, except steps)
from .train_settings import RUN_DEFAULTS, TRAINABLE, RunSettings, UsageError, require

LOG_FIELDS = ("step", "lr", "loss", "rec", "reblur", "mask", "seconds")
RUN_FILES = ("last.pth", "last_state.pt", "train_log.csv", "final_deploy.safetensors")   # what a run writes
FINAL_RESERVE_S = 30.0  # time kept for the final validation and saves under --time-limit


# ----------------------------------------------------------------------------------------------- losses
def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``sqrt((pred - target)^2 + eps^2)`` over every element; with ``weight`` (broadcast to ``pred``) the
    weighted mean ``sum(w * c) / sum(w)``."""
    c = torch.sqrt((pred - target) ** 2 + eps * eps)
    if weight is None:
        return c.mean()
    weight = weight.expand_as(c)
    return (c * weight).sum() / weight.sum()


def reblur_loss(sharp: torch.Tensor, blurry: torch.Tensor, params: torch.Tensor, mask: torch.Tensor,
                points: int) -> torch.Tensor:
    """L1 between ``reblur(sharp, params)`` and ``blurry`` averaged over the annotated full-resolution
    ``mask`` ``[B, 1, H, W]`` only (outside it there is no motion to explain); 0 for an empty mask."""
    diff = (reblur(sharp, params, points) - blurry).abs() * mask
    return diff.sum() / (mask.sum() * sharp.shape[1]).clamp(min=1.0)


def mask_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 2.0) -> torch.Tensor:
    """BCE-with-logits (blurred pixels weighted by ``pos_weight``) + soft Dice over the whole batch
    (so sharp samples with an empty mask do not make Dice degenerate). ``target`` is 0/1 float."""
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=logits.new_tensor(pos_weight))
    prob = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    return bce + dice


def compute_losses(model: M2AENet, blurry: torch.Tensor, sharp: torch.Tensor, mask: torch.Tensor,
                   settings: RunSettings) -> dict[str, torch.Tensor]:
    """Forward pass (body gated by the annotated working mask) and the three losses plus their total.
    With ``train="mask"`` only the mask loss, unweighted (reconstruction and reblur are reported as 0)."""
    work = working_mask(mask).to(blurry.dtype)
    if settings.train == "mask":   # the frozen rest need not run: stem features -> mask head only
        with torch.no_grad():
            features = None if model.mask_head.reads_image else model.stem_features(blurry)
        mk = mask_loss(model.mask_logits(blurry, features), work, settings.pos_weight)
        zero = mk.new_zeros(())
        return {"loss": mk, "rec": zero, "reblur": zero, "mask": mk}
    out = model.forward_train(blurry, work, gate_predicted=settings.gate == "union")
    # --blur-weight: the annotated blur counts W times a pixel the body must leave alone (a wrongly flagged one)
    weight = None if settings.blur_weight == 1.0 else 1.0 + (settings.blur_weight - 1.0) * full_resolution(
        work, sharp.shape[-2:])
    rec = charbonnier(out.restored, sharp, weight=weight)
    source = sharp if settings.reblur_source == "sharp" else out.restored
    rb = reblur_loss(source, blurry, out.trajectory, mask, model.config.motion_points)
    mk = mask_loss(out.mask_logits, work, settings.pos_weight)
    # --train body: the mask head is frozen, so its loss is reported but not optimised (it would otherwise
    # pull the shared stem towards the mask for a head that reads stem features)
    w_mask = 0.0 if settings.train == "body" else settings.w_mask
    total = rec + settings.w_reblur * rb + w_mask * mk
    return {"loss": total, "rec": rec, "reblur": rb, "mask": mk}


def build_model(settings: RunSettings) -> M2AENet:
    """The network a run starts from: fresh (``init_for_training``), or ``--init`` weights.

    ``train="all"`` needs ``--init`` in training form and of the run's architecture. ``train="body"`` keeps
    the mask head frozen and may start from either form of the run's architecture: a deploy checkpoint trains
    its merged convs as they are (no RepVGG branches to re-grow). ``train="mask"`` freezes everything but the
    mask head, so it may start from a deploy checkpoint (the shipped one) and the run's config may give the mask
    head another size: the head then starts fresh (as with ``fresh_head``), the rest is copied."""
    config = M2AEConfig.from_spec(settings.config)
    if not settings.init:
        require(settings.train == "all", f"--train {settings.train} needs --init: the weights of the frozen "
                "part of the network")
        return init_for_training(M2AENet(config))
    if settings.train == "body":   # a deploy init grows its training branches back, exactly (frozen norms)
        try:   # config=: bare state dicts load too
            start = load_checkpoint(settings.init, config=config)
        except CheckpointError:   # a stored config of another depth: _deepened checks everything else
            start = load_checkpoint(settings.init)
        return expand_model(_deepened(start, config, settings.init), inplace=True)
    if settings.train == "all":   # config=: bare state dicts load too, a stored config must agree
        start = load_checkpoint(settings.init, config=config)
        require(not start.inference_mode, f"--init {settings.init} is a deploy (re-parameterized) checkpoint; "
                "fine-tuning the whole network needs the training form (a run's last.pth)")
        return start
    with torch.random.fork_rng():   # loading builds a network too: keep the seeded draws for the fresh head
        start = load_checkpoint(settings.init)   # its own config: the mask head may differ from the run's
    outside_head = lambda cfg: {k: v for k, v in cfg.to_dict().items()  # noqa: E731
                                if not k.startswith("mask_") and k != "detector"}
    require(outside_head(config) == outside_head(start.config),
            f"--init {settings.init} ({start.config}) differs from --config {settings.config} outside the "
            "mask head, which --train mask keeps frozen")
    model = M2AENet(config, inference_mode=start.inference_mode)
    copy_head = start.config == config and not settings.fresh_head
    keep = {k: v for k, v in start.state_dict().items() if not k.startswith("mask_head.") or copy_head}
    model.load_state_dict(keep, strict=False)   # only the mask head is missing, when it starts fresh
    return model


def _deepened(start: M2AENet, config: M2AEConfig, init: str) -> M2AENet:
    """``start`` with ``config``'s ``num_blocks``: blocks beyond ``start``'s own are appended after them, each
    starting as an exact no-op (its last 1x1 conv zero, so ``F(x) = 0``), so the deeper network computes what
    ``start`` computes at step 0 (``--train body --config v2,num_blocks=10``). Every other field must agree."""
    same_but_depth = lambda cfg: {k: v for k, v in cfg.to_dict().items() if k != "num_blocks"}  # noqa: E731
    require(same_but_depth(config) == same_but_depth(start.config),
            f"--init {init} ({start.config}) differs from --config {config} in more than num_blocks")
    require(config.num_blocks >= start.config.num_blocks,
            f"--config has {config.num_blocks} blocks, fewer than --init {init}'s {start.config.num_blocks}: "
            "--train body can add blocks, not drop them")
    if config == start.config:
        return start
    with torch.random.fork_rng():   # the new blocks' other weights are random, like a fresh network's
        torch.manual_seed(0)
        deeper = M2AENet(config, inference_mode=start.inference_mode)
    missing, unexpected = deeper.load_state_dict(start.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("blocks.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for block in deeper.blocks[start.config.num_blocks:]:
            block.mix_out.weight.zero_()
            block.mix_out.bias.zero_()
    return deeper.eval()


def trainable_parameters(model: M2AENet, settings: RunSettings) -> list[torch.nn.Parameter]:
    """``train="mask"``: the mask head's parameters; everything else gets ``requires_grad=False``.
    ``train="body"``: every parameter but the mask head's."""
    if settings.train == "all":
        return list(model.parameters())
    if settings.train == "body":
        model.mask_head.requires_grad_(False)
        return [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    model.mask_head.requires_grad_(True)
    return list(model.mask_head.parameters())


def set_train_mode(model: M2AENet, settings: RunSettings) -> None:
    """Train mode, except with ``--train body`` every BatchNorm stays in eval mode: the frozen mask head's
    statistics are part of the detector being kept, and the body's norms (grown back from a deploy init by
    :func:`expand_model`, with no batch statistics of their own) keep the network exactly what it was at
    step 0; their affine weights still train, so the block stays re-parameterizable."""
    model.train()
    if settings.train == "body":
        model.mask_head.eval()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def init_for_training(model: M2AENet) -> M2AENet:
    """Zero the tail so training starts from ``restored == blurry`` (Charbonnier 0.016 on the synthetic data)
    instead of a random residual inside the mask (0.36 with the default init for ``M2AEConfig()``)."""
    with torch.no_grad():
        model.tail.weight.zero_()
        model.tail.bias.zero_()
    return model


# ------------------------------------------------------------------------------------------------- data
class TrainStream(Dataset):
    """Stream index n -> sample: pool entry ``perm_epoch[n % pool]`` under dihedral transform ``t(n)``."""

    def __init__(self, crop: int, pool: int, seed: int, defocus: float = 0.0, exclude_photos: str = "",
                 data: str = "", video: str = "", video_share: float = 0.0, ghost_share: float = 0.0):
        if data:     # a photo corpus (m2ae-data fetch): the v2 scenes on its training split
            from .data.scenes import SceneDataset
            photos, cutouts = corpus_arrays(data, "train")
            self.base = SceneDataset(photos, cutouts, size=pool, seed=seed, crop=crop,
                                     videos=video_windows(video, seed) if video else (), video_share=video_share,
                                     ghost_share=ghost_share)
        else:
            from .data.synth import SyntheticBlurDataset, photo_names, training_photos
            photos = training_photos(photo_names(exclude_photos))
            self.base = SyntheticBlurDataset(photos, size=pool, seed=seed, crop=crop, p_defocus=defocus)
        self.pool, self.seed, self.cache = pool, seed, {}

    def __len__(self) -> int:
        return 2**62  # an endless stream; the sampler picks the indices of each step

    @functools.lru_cache(maxsize=2)
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, epoch]).permutation(self.pool)

    def __getitem__(self, n: int):
        epoch, pos = divmod(n, self.pool)
        idx = int(self._perm(epoch)[pos])
        if idx not in self.cache:
            s = self.base[idx]
            self.cache[idx] = (s.blurry.half(), s.sharp.half(), s.mask.bool())
        t = int(np.random.default_rng([self.seed, 2, n]).integers(8))
        return tuple(_dihedral(x.float(), t) for x in self.cache[idx])


VIDEO_WINDOWS = 32   # training windows cut from --video (7 frames each, before video.TRAIN_FRAMES)


@functools.lru_cache(maxsize=2)
def video_windows(path: str, seed: int) -> list:
    """The training windows of ``--video``: :data:`VIDEO_WINDOWS` motion clips (video.motion_clip, radius 3) whose
    frames all lie before ``video.TRAIN_FRAMES``; the frames after it are the dev clip."""
    from .data.video import TRAIN_FRAMES, clip_set
    return clip_set(path, VIDEO_WINDOWS, 3, seed, frames=(0, TRAIN_FRAMES))


@functools.lru_cache(maxsize=2)
def corpus_arrays(root: str, split: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Photos (float RGB) and cut-outs (float RGBA) of one split of a corpus folder, loaded once."""
    from .data import corpus
    photos = [corpus.load_rgb(p) for p in corpus.photos(root, split)]
    cutouts = [corpus.load_rgba(p) for p in corpus.photos(root, split, kind="cutout")]
    if not photos:
        raise UsageError(f"--data {root} holds no {split} photos")
    return photos, cutouts


def _dihedral(x: torch.Tensor, t: int) -> torch.Tensor:
    x = torch.rot90(x, t % 4, dims=(1, 2))
    return (x.flip(2) if t >= 4 else x).contiguous()


def make_loader(settings: RunSettings, start: int, stop: int, workers: int = 0) -> DataLoader:
    """Batches of steps ``start .. stop - 1`` (step s = stream indices ``s*B .. s*B + B - 1``)."""
    b = settings.batch
    stream = TrainStream(settings.crop, settings.pool, settings.seed, settings.defocus, settings.exclude_photos,
                         settings.data, settings.video, settings.video_share, settings.ghost_share)
    return DataLoader(stream, batch_size=b, sampler=range(start * b, stop * b), num_workers=workers)


# ------------------------------------------------------------------------------------ optimizer, state
def build_optimizer(model: M2AENet, settings: RunSettings):
    """AdamW (no decay on biases and norms) and its schedule: linear warm-up, then cosine down to 2 %."""
    params = trainable_parameters(model, settings)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.99))

    def factor(step: int) -> float:  # on --resume, settings carry a longer --steps if one was given
        warm, total = min(settings.warmup, settings.steps - 1), settings.steps
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _rng_state() -> dict:  # plain ints and tensors only (weights_only); numpy's gauss cache is dropped
    (version, py, _), (_, keys, pos, *_) = random.getstate(), np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, *py], "numpy": [pos, *keys.tolist()]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1:]), None))
    np.random.set_state(("MT19937", np.array(state["numpy"][1:], np.uint32), state["numpy"][0]))


def _save_state(out: Path, model, opt, sched, settings: dict, step: int, meta: dict) -> None:
    """``last_state.pt`` first, then ``last.pth``; both carry the step, so a torn pair is detected. ``settings``:
    a plain dict (:meth:`RunSettings.to_dict`), which ``torch.load(weights_only=True)`` reads back."""
    with atomic_path(out / "last_state.pt", overwrite=True) as tmp:
        torch.save({"step": step, "settings": settings, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": _rng_state(), "meta": meta}, tmp)
    save_checkpoint(model, out / "last.pth", meta={**meta, "step": step}, overwrite=True)


# ------------------------------------------------------------------------------------------ validation
def validate(model: M2AENet, n: int = 8, crop: int = 128, photos: Sequence[str] = (), data: str = "") -> dict:
    """End-of-run score on validation samples (``synth.validation_set``), never on the held-out photos: those
    are for ``m2ae-eval`` alone, so a run's printout cannot become a loop that tunes on them. ``photos``: the
    run's dev photos (``--exclude-photos``), scored as unseen photos; empty: new samples on all training photos.
    ``data``: a corpus folder, scored on v2 scenes of its *dev* split (photos no run trains on).

    Scored by :func:`m2ae_infer.evaluate.evaluate` (a deploy copy of ``model``, predicted mask at threshold 0.5,
    on the CPU), so the figures are ``m2ae-eval``'s: PSNR inside the annotated mask of blurry and of restored
    (``masked_psnr``; mean over the samples with a mask) and the pooled full-resolution IoU of the predicted mask."""
    from .data.synth import VALIDATION_SEED, validation_set
    from .evaluate import ROWS, evaluate, summarize
    if n < 1:
        raise ValueError(f"validate needs n >= 1 samples, got {n}")
    if data:
        from .data.scenes import scene_set
        dev_photos, dev_cutouts = corpus_arrays(data, "dev")
        samples = scene_set(dev_photos, n, VALIDATION_SEED, crop, dev_cutouts)
    else:
        samples = validation_set(n, crop=crop, photos=list(photos) or None)
    summary = summarize(evaluate(model, samples, rows=ROWS[:3], device="cpu", threshold=0.5))
    return {"samples": n, "crop": crop, "photos": f"dev split of {data}" if data else list(photos) or "training photos",
            "psnr_blurry_in_mask": summary["rows"]["blurry"]["all"]["psnr_mask"],
            "psnr_restored_in_mask": summary["rows"]["ours_sparse"]["all"]["psnr_mask"],
            "mask_iou": summary["mask"]["pooled"]["iou"]}


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    d = RUN_DEFAULTS
    p = OneLineArgumentParser(prog="m2ae-train", description="Train M2AENet on synthetic local motion blur: the v2 "
                "scenes of a photo corpus's train split (--data) and real static-camera video (--video), or the "
                "v1 generator on the scikit-image photos; held-out photos are never used for training.")
    p.add_argument("--out", required=True, metavar="DIR", type=path_arg, help="run folder: checkpoints, log, deploy weights")
    p.add_argument("--resume", action="store_true", help="continue exactly from DIR/last.pth + last_state.pt")
    p.add_argument("--config", help=f"architecture: {' | '.join(VARIANTS)} (the shipped model: v2), optionally "
                   f"with field overrides, e.g. 'v2,num_blocks=10' (default {d['config']})")
    p.add_argument("--train", choices=TRAINABLE, help="what is trained: the whole network (all), the blur-mask head "
                   "alone with everything else frozen (mask), or everything but the mask head (body; best with "
                   "--gate union); mask and body need --init (default all)")
    p.add_argument("--fresh-head", action="store_const", const=True,
                   help="with --train mask: start the mask head from random weights instead of --init's")
    p.add_argument("--steps", type=int, help=f"total optimizer steps, sets the schedule (default {d['steps']})")
    p.add_argument("--batch", type=int, help=f"batch size (default {d['batch']})")
    p.add_argument("--crop", type=int, help=f"training crop in pixels, even (default {d['crop']})")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate (default {d['lr']})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW decay of conv weights (default {d['weight_decay']})")
    p.add_argument("--clip", type=float, help=f"gradient norm clip (default {d['clip']})")
    p.add_argument("--warmup", type=int, help=f"linear warm-up steps (default {d['warmup']})")
    p.add_argument("--pool", type=int, help=f"distinct synthetic samples, cached (default {d['pool']})")
    p.add_argument("--seed", type=int, help=f"seed of the weights and the data (default {d['seed']})")
    p.add_argument("--w-reblur", type=float, help=f"reblur loss weight (default {d['w_reblur']})")
    p.add_argument("--w-mask", type=float, help=f"mask loss weight (default {d['w_mask']})")
    p.add_argument("--pos-weight", type=float, help=f"BCE weight of blurred pixels (default {d['pos_weight']})")
    p.add_argument("--reblur-source", choices=("sharp", "restored"),
                   help="re-blur the ground truth (trains the trajectories) or the restored image (default sharp)")
    p.add_argument("--gate", choices=("annotated", "union"),
                   help="gate the body with the annotated mask, or with its union with the predicted mask so the "
                        "body learns to leave wrongly flagged sharp pixels alone (default annotated)")
    p.add_argument("--blur-weight", type=float, help="weight of the annotated blur's pixels in the reconstruction "
                   "loss, against 1 for every other pixel (with --gate union: the wrongly flagged pixels the body must "
                   "leave alone); 1 is the plain mean (default 1)")
    p.add_argument("--defocus", type=float, help="share of local/sharp samples whose static background gets a "
                                                 "defocused region, kept out of the mask (default 0)")
    p.add_argument("--exclude-photos", metavar="A,B",
                   help="training photos to keep out of this run, as dev photos for m2ae-eval --split validation "
                        "--photos A,B: a score on photos the run never saw (default none)")
    p.add_argument("--data", metavar="DIR", help="a photo corpus (m2ae-data fetch DIR): train on the v2 scenes "
                   "(m2ae_infer.data.scenes) of its train split, validate on its dev split (default: the "
                   "scikit-image photos and the v1 generator)")
    p.add_argument("--video", metavar="PATH", help="a static-camera video (e.g. the corpus's vtest.avi): windows of "
                   "its frames before video.TRAIN_FRAMES (400) join the --data scenes as real motion and real static "
                   "video; the later frames stay for dev scoring (needs --video-share)")
    p.add_argument("--video-share", type=float, help="share of the samples cut from --video's windows (default 0)")
    p.add_argument("--ghost-share", type=float, help="share of the --data scenes' local samples whose movers are "
                   "averaged over 3-11 frame positions, as a video's frames averaged show them, instead of a smooth "
                   "smear (default 0)")
    p.add_argument("--init", metavar="CKPT", help="start from these weights (fine-tuning): training form, or with "
                                                   "--train mask any form; the optimizer and schedule start fresh")
    p.add_argument("--time-limit", type=float, default=55.0, metavar="MIN",
                   help="stop cleanly (saving everything) after MIN minutes of this run (default 55)")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="stop cleanly at this step (chunked runs)")
    p.add_argument("--save-every", type=int, default=500, help="save last.pth every N steps (default 500)")
    p.add_argument("--threads", type=int, default=_cores(), help="torch threads (default: all cores)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("--val-samples", type=int, default=8,
                   help="end-of-run validation samples: on the --exclude-photos dev photos if given, else new "
                        "samples on the training photos; never the held-out photos (default 8, 0: none)")
    p.add_argument("--val-crop", type=int, default=128, help="validation sample size in pixels (default 128)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_options(args: argparse.Namespace) -> None:
    """The options of this session that are no run setting (a resumed run may change them)."""
    require(args.val_crop >= 16 and args.val_crop % 2 == 0, f"--val-crop must be even and >= 16, got {args.val_crop}")
    require(math.isfinite(args.time_limit) and args.time_limit > 0,
            f"--time-limit must be > 0, got {args.time_limit}")
    for k in ("save_every", "threads", "stop_after", "workers", "val_samples"):
        low, v = int(k not in ("workers", "val_samples")), getattr(args, k)
        require(v is None or v >= low, f"--{k.replace('_', '-')} must be >= {low}, got {v}")


@dataclass
class _Run:
    """A run being trained: where it writes, what it trains, how far it got, the recent losses."""
    out: Path
    settings: RunSettings
    model: M2AENet
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    data: dict                 # what it trains on, for the meta
    threads: int
    t0: float                  # perf_counter at the start of this session
    step: int = 0
    prev_wall: float = 0.0     # seconds spent by the sessions before this one (--resume)
    recent: dict = field(default_factory=lambda: {k: [] for k in ("loss", "rec", "reblur", "mask")})

    def wall_time(self) -> float:
        return self.prev_wall + time.perf_counter() - self.t0

    def meta(self, stopped: str) -> dict:
        avg = {k: float(np.mean(v[-100:])) if v else None for k, v in self.recent.items()}
        return {"step": self.step, "steps": self.settings.steps, "completed": self.step >= self.settings.steps,
                "stopped": stopped, "wall_time_s": self.wall_time(), "losses": avg,
                "settings": self.settings.to_dict(), "data": self.data, "threads": self.threads,
                "torch": str(torch.__version__)}

    def save(self, meta: dict) -> None:
        _save_state(self.out, self.model, self.opt, self.sched, self.settings.to_dict(), self.step, meta)


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) a training; returns the final meta. Options are parsed by :func:`main`."""
    run = _open_run(args)
    stopped = _train_loop(run, args)
    return _finish(run, args, stopped)


def _open_run(args: argparse.Namespace) -> _Run:
    """Check the options and ``--out``, then a new run (seeded model, fresh optimizer) or the resumed one (its
    settings, weights, optimizer, schedule and RNG); ``train_log.csv`` ends at the step it starts from."""
    t0 = time.perf_counter()
    out = Path(args.out)
    state = _read_state(out, args.resume)
    settings = RunSettings.from_args(args, state and state["settings"])
    _check_options(args)
    if state is not None:
        require(settings.steps >= state["step"], f"--steps {settings.steps} is below the step the resumed "
                f"run already reached ({state['step']}); give --steps {state['step'] + 1} or more")
    torch.set_num_threads(args.threads)
    torch.manual_seed(settings.seed), random.seed(settings.seed), np.random.seed(settings.seed)
    model = build_model(settings) if state is None else load_checkpoint(out / "last.pth")
    writable_folder(out, "--out ", error=UsageError)   # only now: a refused run (bad --init) leaves no folder
    opt, sched = build_optimizer(model, settings)
    run = _Run(out, settings, model, opt, sched, _data_meta(settings), args.threads, t0)
    if state is not None:
        _restore(run, state)
    set_train_mode(model, settings)
    _rewrite_log(out / "train_log.csv", run.step if state is not None else None)
    return run


def _read_state(out: Path, resume: bool) -> dict | None:
    """``last_state.pt`` of the run in ``out`` (``--resume``), else ``None`` once ``out`` is known to hold no run."""
    require(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder")
    if resume:
        require((out / "last.pth").is_file() and (out / "last_state.pt").is_file(),
                f"--resume: {out} holds no last.pth + last_state.pt to resume from")
        return torch.load(out / "last_state.pt", weights_only=True)
    held = [name for name in RUN_FILES if (out / name).exists()]
    require(not held, f"{out} already holds {', '.join(held)}: pass --resume to continue that run, or pick a "
            "new --out (a new run would replace those files)")
    return None


def _restore(run: _Run, state: dict) -> None:
    """Continue from ``state`` exactly: optimizer, schedule, RNG, step and time spent."""
    saved = read_checkpoint(run.out / "last.pth").meta
    if saved.get("step") != state["step"]:
        raise RuntimeError(f"{run.out}: last.pth (step {saved.get('step')}) and last_state.pt "
                           f"(step {state['step']}) do not belong together")
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    run.step, run.prev_wall = state["step"], state["meta"].get("wall_time_s", 0.0)
    for group, base in zip(run.opt.param_groups, run.sched.base_lrs):  # identical unless --steps changed
        group["lr"] = base * run.sched.lr_lambdas[0](run.step)


def _rewrite_log(path: Path, resumed_step: int | None) -> None:
    """A new ``train_log.csv``, or (``--resume``) the run's own without the rows past ``resumed_step``."""
    old = path.read_text().splitlines() if resumed_step is not None and path.exists() else []
    with atomic_write(path, "w", overwrite=True, newline="") as f:
        csv.DictWriter(f, LOG_FIELDS).writeheader()
        csv.DictWriter(f, LOG_FIELDS).writerows(r for r in csv.DictReader(old) if int(r["step"]) <= resumed_step)


def _data_meta(settings: RunSettings) -> dict:
    """What the run trains on, as the meta records it (never a held-out photo)."""
    from .data.synth import HELDOUT_PHOTOS, photo_names, training_photos
    excluded = photo_names(settings.exclude_photos)
    data = {"generator": "m2ae_infer.data.synth", "photos": list(training_photos(excluded)),
            "excluded_photos": excluded, "heldout_never_used": list(HELDOUT_PHOTOS), "crop": settings.crop,
            "pool": settings.pool, "seed": settings.seed, "augment": "8 dihedral transforms",
            "defocus": settings.defocus}
    if settings.data:
        from .data import corpus
        data.update(generator="m2ae_infer.data.scenes", corpus=settings.data,
                    photos=[str(p) for p in corpus.photos(settings.data, "train")], defocus="built in",
                    ghost_share=settings.ghost_share)
    if settings.video:
        from .data.video import TRAIN_FRAMES
        data.update(video=settings.video, video_share=settings.video_share,
                    video_frames=f"windows of 7 frames within 0:{TRAIN_FRAMES} ({VIDEO_WINDOWS} windows)")
    return data


def _train_loop(run: _Run, args: argparse.Namespace) -> str:
    """Train up to ``--steps`` / ``--stop-after``, saving every ``--save-every`` steps; returns why it stopped
    ("steps", "stop-after", "time limit"). Ctrl-C saves the state and says how to continue."""
    from tqdm import tqdm
    steps = run.settings.steps
    stop = min(steps, args.stop_after or steps)
    bar = tqdm(total=steps, initial=run.step, disable=args.quiet, desc="m2ae-train", unit="step",
               file=progress_stream())
    stopped, step_time = "steps", None
    try:
        with (run.out / "train_log.csv").open("a", newline="") as logf:
            log = csv.DictWriter(logf, LOG_FIELDS)
            for blurry, sharp, mask in make_loader(run.settings, run.step, stop, args.workers):
                ts = time.perf_counter()
                vals, lr = _train_step(run, blurry, sharp, mask)
                log.writerow({"step": run.step, "lr": f"{lr:.4g}", **{k: f"{v:.6g}" for k, v in vals.items()},
                              "seconds": f"{run.wall_time():.1f}"})
                bar.update(1)
                bar.set_postfix(loss=f"{vals['loss']:.4f}", rec=f"{vals['rec']:.4f}",
                                reblur=f"{vals['reblur']:.4f}", mask=f"{vals['mask']:.3f}", refresh=False)
                if run.step % args.save_every == 0 and run.step < stop:
                    logf.flush()
                    run.save(run.meta("checkpoint"))
                dt = time.perf_counter() - ts
                step_time = dt if step_time is None else 0.9 * step_time + 0.1 * dt
                elapsed = time.perf_counter() - run.t0 + step_time
                if run.step < stop and elapsed > args.time_limit * 60 - FINAL_RESERVE_S:
                    stopped = "time limit"
                    break
        if stopped == "steps" and run.step < steps:
            stopped = "stop-after"
    except KeyboardInterrupt:
        run.save(run.meta("interrupted"))
        raise KeyboardInterrupt(f"at step {run.step}, saved; continue with --resume") from None
    finally:
        bar.close()
    return stopped


def _train_step(run: _Run, blurry: torch.Tensor, sharp: torch.Tensor, mask: torch.Tensor):
    """One optimizer step on a batch; returns its losses (floats) and the learning rate it used."""
    losses = compute_losses(run.model, blurry, sharp, mask, run.settings)
    if not torch.isfinite(losses["loss"]):
        raise RuntimeError(f"non-finite loss at step {run.step}: lower --lr")
    run.opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.settings.clip)
    lr = run.opt.param_groups[0]["lr"]
    run.opt.step()
    run.sched.step()
    run.step += 1
    vals = {k: float(v.detach()) for k, v in losses.items()}
    run.recent = {k: run.recent[k][-99:] + [v] for k, v in vals.items()}
    return vals, lr


def _finish(run: _Run, args: argparse.Namespace, stopped: str) -> dict:
    """The validation score, the last state and the deploy checkpoint; returns the final meta."""
    final = run.meta(stopped)
    final["validation"] = (validate(run.model, args.val_samples, args.val_crop, run.data["excluded_photos"],
                                    run.settings.data) if args.val_samples else None)
    final["wall_time_s"] = run.wall_time()
    run.save(final)
    save_checkpoint(reparameterize_model(run.model), run.out / "final_deploy.safetensors", meta=final, overwrite=True)
    return final


@cli_main("m2ae-train", usage=(UsageError, ImportError, CheckpointError))
def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad options, scikit-image missing or an --init that cannot be used (the message
    names the file), 1 a run-time failure, 130 interrupted (state saved)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:   # --help (0) or a one-line usage error (2), returned as the exit code
        return int(exc.code or 0)
    report(train(args), Path(args.out))
    return 0


def report(final: dict, out: Path) -> None:
    """The run's closing lines: where it stopped, the recent losses, the validation score, the files."""
    val, f4 = final["validation"], lambda v, d=4: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    say(f"m2ae-train: step {final['step']}/{final['steps']} ({final['stopped']}), "
        f"{final['wall_time_s'] / 60:.1f} min; mean of the last 100 steps: "
        + ", ".join(f"{k} {f4(v)}" for k, v in final["losses"].items()))
    if val:
        photos = val["photos"]
        where = ("dev photos " + ",".join(photos) if isinstance(photos, list)
                 else "new samples on the training photos" if photos == "training photos" else photos)
        say(f"m2ae-train: validation, {where} ({val['samples']} x {val['crop']} px): PSNR in mask blurry "
            f"{f4(val['psnr_blurry_in_mask'], 2)} dB -> restored {f4(val['psnr_restored_in_mask'], 2)} dB, "
            f"mask IoU {val['mask_iou']:.3f}")
    say(f"m2ae-train: wrote {out / 'last.pth'} and {out / 'final_deploy.safetensors'}")


if __name__ == "__main__":
    sys.exit(main())
