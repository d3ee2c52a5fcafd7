"""The coupling network of Glow: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZeroConv2d", "coupling_network"]


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised to zero whose output is scaled by ``exp(logscale_factor * logs)``.

    Starting at zero makes every coupling the identity at initialisation (Glow). The per-channel scale
    ``e = exp(logscale_factor * logs)`` is folded into the convolution, ``conv(x, W * e, b * e) = conv(x, W, b) * e``
    (``e`` scales output channel ``o``'s filter and bias): one elementwise pass over the output, and its backward,
    become a ``C_out x C_in x 3 x 3`` multiply. Parameters and ``state_dict`` are those of the unfolded layer.
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
        conv = self.conv
        scale = torch.exp(self.logs * self.logscale_factor).flatten()
        weight, bias = conv.weight * scale[:, None, None, None], conv.bias * scale
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def coupling_network(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """``conv3x3(in, hidden) -> ReLU -> conv1x1(hidden, hidden) -> ReLU -> ZeroConv2d(hidden, out)``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, kernel_size=1),
        nn.ReLU(),
        ZeroConv2d(hidden, out_channels),
    )
