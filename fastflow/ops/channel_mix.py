"""Per-pixel channel mix ``y[b, :, h, w] = weight @ x[b, :, h, w] + bias`` (a 1x1 convolution).

Backward: ``grad_x = weight^T @ grad_y`` per pixel, ``grad_weight = sum_{b,h,w} grad_y x^T``,
``grad_bias = sum_{b,h,w} grad_y``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["channel_mix", "channel_mix_ref"]


def channel_mix_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager per-pixel channel mix ``weight @ x + bias`` for ``x`` of shape ``(B, C, H, W)``."""
    b = None if bias is None else bias.to(x.dtype)
    return F.conv2d(x, weight.to(x.dtype)[:, :, None, None], b)


def channel_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Channel mix on the backend chosen by :mod:`fastflow.backend`."""
    return channel_mix_ref(x, weight, bias)
