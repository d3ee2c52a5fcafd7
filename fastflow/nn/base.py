"""The flow-layer contract shared by every invertible module."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FlowLayer", "check_image"]


def check_image(name: str, x: object, channels: int | None = None) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a floating ``(B, C, H, W)`` tensor with ``channels`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got rank {x.dim()} shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the layer was built for {channels} (channel mismatch)")
    return x


class FlowLayer(nn.Module):
    """An invertible layer: ``forward(x) -> (y, logdet)`` and ``inverse(y) -> (x, logdet)``.

    ``logdet`` has shape ``(B,)``, is float32 for half inputs, and the inverse's log-det is the negative of
    the forward's at the matching point.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
