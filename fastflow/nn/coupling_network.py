"""The coupling network of Glow: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ZeroConv2d", "coupling_network"]


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised to zero whose output is scaled by ``exp(logscale_factor * logs)``.

    Starting at zero makes every coupling the identity at initialisation (Glow).
    """

    def __init__(self, in_channels: int, out_channels: int, logscale_factor: float = 3.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))
        self.logscale_factor = logscale_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-initialised 3x3 convolution of ``x`` with a learned per-channel output scale."""
        return self.conv(x) * torch.exp(self.logs * self.logscale_factor)


def coupling_network(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """``conv3x3(in, hidden) -> ReLU -> conv1x1(hidden, hidden) -> ReLU -> ZeroConv2d(hidden, out)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, kernel_size=1),
        nn.ReLU(),
        ZeroConv2d(hidden, out_channels),
    )
