"""Intra-frame motion analyzer: per-pixel blur trajectories and the guidance features they give the body.

Each working pixel predicts a quadratic trajectory over the exposure (Motion-ETR style),
``d(t) = u * t + v * t**2`` for ``t`` in ``[-1, 1]``, with ``u, v`` 2-D displacements in input pixels.
The trajectory parameters and the hidden features are mixed into guidance features that update the
body's input like a block does: ``x <- x + m * G(x)``. The reblur loss re-blurs a sharp estimate
along the trajectory (average of K warps) and compares it with the blurry input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import activation

TRAJECTORY_PARAMS = 4  # (u_x, u_y, v_x, v_y)


class MotionAnalyzer(nn.Module):
    """``[B, C, h, w] -> [B, C, h, w]`` guidance update (and ``[B, 4, h, w]`` trajectory parameters).

    Training form: ``h = act(conv3x3(x))``, ``traj = conv1x1(h)``, ``G = conv1x1(cat(h, traj))``.
    Deploy form: the two linear maps after ``h`` fold into one (``G = W h + b``, exact); the trajectory
    head is dropped because restoration does not need it.
    """

    def __init__(self, channels: int, hidden: int, act: str, inference_mode: bool = False):
        super().__init__()
        self.act, self.hidden = act, hidden
        self.spatial = nn.Conv2d(channels, hidden, 3, padding=1)
        if inference_mode:
            self.guide = nn.Conv2d(hidden, channels, 1)
        else:
            self.trajectory = nn.Conv2d(hidden, TRAJECTORY_PARAMS, 1)
            self.guide = nn.Conv2d(hidden + TRAJECTORY_PARAMS, channels, 1)

    @property
    def inference_mode(self) -> bool:
        return not hasattr(self, "trajectory")

    def forward_with_trajectory(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inference_mode:
            raise RuntimeError("the deploy-form motion analyzer has no trajectory head")
        h = activation(self.spatial(x), self.act)
        traj = self.trajectory(h)
        return self.guide(torch.cat([h, traj], dim=1)), traj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.guide(activation(self.spatial(x), self.act))
        return self.forward_with_trajectory(x)[0]

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold ``guide(cat(h, trajectory(h)))`` into one 1x1 conv on ``h`` (idempotent)."""
        if self.inference_mode:
            return
        wg = self.guide.weight.flatten(1)                      # [C, M + 4]
        wg_h, wg_t = wg[:, : self.hidden], wg[:, self.hidden:]
        wt = self.trajectory.weight.flatten(1)                 # [4, M]
        merged = nn.Conv2d(self.hidden, wg.shape[0], 1).to(wg)
        merged.weight.copy_((wg_h + wg_t @ wt)[:, :, None, None])
        merged.bias.copy_(self.guide.bias + wg_t @ self.trajectory.bias)
        del self.trajectory
        self.guide = merged

    @torch.no_grad()
    def expand(self) -> None:
        """The inverse of :meth:`reparameterize`, in place (idempotent): a zero trajectory head and a guide
        whose trajectory columns are zero, so ``guide(cat(h, trajectory(h)))`` is exactly the deploy map;
        fine-tuning (``m2ae-train --train body``) then grows the trajectories through the reblur loss."""
        if not self.inference_mode:
            return
        merged = self.guide
        self.trajectory = nn.Conv2d(self.hidden, TRAJECTORY_PARAMS, 1).to(merged.weight)
        self.trajectory.weight.zero_()
        self.trajectory.bias.zero_()
        self.guide = nn.Conv2d(self.hidden + TRAJECTORY_PARAMS, merged.out_channels, 1).to(merged.weight)
        self.guide.weight.zero_()
        self.guide.weight[:, : self.hidden].copy_(merged.weight)
        self.guide.bias.copy_(merged.bias)

    @property
    def pointwise(self) -> tuple[nn.Conv2d, ...]:
        """The per-pixel map after ``act(spatial(x))`` in deploy form (see ``RepBlock.pointwise``)."""
        return (self.guide,)


def trajectory_points(params: torch.Tensor, points: int) -> torch.Tensor:
    """``[B, 4, h, w]`` parameters -> ``[B, K, 2, h, w]`` displacements ``d(t_k)``, ``t_k`` evenly in [-1, 1]."""
    t = torch.linspace(-1.0, 1.0, points, device=params.device, dtype=params.dtype)
    u, v = params[:, None, 0:2], params[:, None, 2:4]
    return u * t[None, :, None, None, None] + v * (t * t)[None, :, None, None, None]


def reblur(sharp: torch.Tensor, params: torch.Tensor, points: int) -> torch.Tensor:
    """Re-blur ``sharp`` ``[B, 3, H, W]`` along per-pixel trajectories given at any resolution.

    The parameters are resized (nearest) to ``H x W``; each output pixel averages ``sharp`` sampled
    (bilinear, border padding) at its K trajectory points.
    """
    b, _, height, width = sharp.shape
    params = F.interpolate(params, size=(height, width), mode="nearest")
    disp = trajectory_points(params, points)                                  # [B, K, 2, H, W]
    ys, xs = torch.meshgrid(torch.arange(height, device=sharp.device, dtype=sharp.dtype),
                            torch.arange(width, device=sharp.device, dtype=sharp.dtype), indexing="ij")
    gx = (xs + disp[:, :, 0]) * (2.0 / max(width - 1, 1)) - 1.0                # [B, K, H, W]
    gy = (ys + disp[:, :, 1]) * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).flatten(0, 1)                        # [B*K, H, W, 2]
    frames = sharp.repeat_interleave(points, dim=0)
    warped = F.grid_sample(frames, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped.view(b, points, *sharp.shape[1:]).mean(dim=1)
