"""Squeeze: trade spatial size for channels, ``(B, C, H, W) -> (B, 4C, H/2, W/2)``; log-det 0."""

from __future__ import annotations

import torch

from fastflow.nn.base import FlowLayer, check_image, zero_logdet

__all__ = ["Squeeze", "squeeze2d", "unsqueeze2d"]


def squeeze2d(x: torch.Tensor) -> torch.Tensor:
    """Each 2x2 spatial block becomes 4 channels: output channel ``c * 4 + 2 * i + j`` is pixel ``(i, j)``."""
    b, c, h, w = check_image("x", x).shape
    if h % 2 or w % 2:
        raise ValueError(f"squeeze needs even height and width, got x of shape {tuple(x.shape)}")
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(y: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`squeeze2d`."""
    b, c, h, w = check_image("y", y).shape
    if c % 4:
        raise ValueError(f"unsqueeze needs channels divisible by 4, got y of shape {tuple(y.shape)}")
    y = y.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(b, c // 4, h * 2, w * 2)


class Squeeze(FlowLayer):
    """Space-to-channel reshape by a factor of 2; volume preserving."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(squeeze2d(x), 0)``; ``context`` is ignored."""
        return squeeze2d(x), zero_logdet(x)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unsqueeze2d(y), 0)``."""
        return unsqueeze2d(y), zero_logdet(y)
