"""Conditioner networks of the couplings: Glow's conv net for images, a small MLP for vectors, and the
``subnet(in_features, out_features) -> nn.Module`` factories (FrEIA's convention) that build them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.ops.channel_mix import pixel_matmul

__all__ = [
    "ConvNetwork",
    "MLPNetwork",
    "PointwiseConv2d",
    "Subnet",
    "ZeroConv2d",
    "build_subnet",
    "conv_subnet",
    "coupling_network",
    "mlp_network",
    "mlp_subnet",
]

Subnet = Union[Callable[[int, int], nn.Module], nn.Module]
"""A conditioner: a factory ``subnet(in_features, out_features) -> nn.Module`` or a ready module."""


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


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 ``nn.Conv2d`` (its parameters and ``state_dict``) run eagerly on CPU tensors as per-pixel matrix
    products (:func:`~fastflow.ops.channel_mix.pixel_matmul`), which cost a fraction of oneDNN's 1x1 convolution
    there; a convolution elsewhere and under ``torch.compile`` (whose CPU code for the convolution measured
    faster than for the products: Glow's network forward and backward at 8 x 6 x 16 x 16, hidden 64, 5.1-5.2 ms
    against 6.6-7.5 ms, 2026-11-26)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``weight @ x[b, :, h, w] + bias`` per pixel of ``x`` ``(B, C_in, H, W)``."""
        if x.device.type == "cpu" and x.dim() == 4 and not torch.compiler.is_compiling():
            return pixel_matmul(x, self.weight.flatten(1), self.bias)
        return super().forward(x)


class ConvNetwork(nn.Sequential):
    """Glow's coupling network ``conv3x3(in, hidden) -> ReLU -> conv1x1(hidden, hidden) -> ReLU ->
    ZeroConv2d(hidden, out)`` on ``(B, in, H, W)``.

    It declares its receptive-field radius, ``halo = 2`` pixels (two 3x3 convolutions), and its width ``hidden``:
    what spatial tiling needs (:mod:`fastflow.nn.tiling`)."""

    halo = 2

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            PointwiseConv2d(hidden, hidden),
            nn.ReLU(),
            ZeroConv2d(hidden, out_channels),
        )
        self.hidden = hidden


def coupling_network(in_channels: int, hidden: int, out_channels: int) -> ConvNetwork:
    """Glow's coupling network (:class:`ConvNetwork`)."""
    return ConvNetwork(in_channels, hidden, out_channels)


class MLPNetwork(nn.Sequential):
    """``depth`` times ``Linear -> ReLU`` of width ``hidden``, then a zero-initialised ``Linear(hidden, out)``
    on ``(B, in)``: the zero output makes a coupling start as the identity. No halo: it cannot be tiled."""

    def __init__(self, in_features: int, hidden: int, out_features: int, depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


def mlp_network(in_features: int, hidden: int, out_features: int, depth: int = 2) -> MLPNetwork:
    """The default conditioner for vectors (:class:`MLPNetwork`)."""
    return MLPNetwork(in_features, hidden, out_features, depth)


def conv_subnet(hidden: int) -> Callable[[int, int], nn.Module]:
    """The factory ``(in_channels, out_channels) -> ConvNetwork(in_channels, hidden, out_channels)``."""
    return lambda in_channels, out_channels: ConvNetwork(in_channels, hidden, out_channels)


def mlp_subnet(hidden: int, depth: int = 2) -> Callable[[int, int], nn.Module]:
    """The factory ``(in_features, out_features) -> MLPNetwork(in_features, hidden, out_features, depth)``."""
    return lambda in_features, out_features: MLPNetwork(in_features, hidden, out_features, depth)


def build_subnet(subnet: object, in_features: int, out_features: int) -> nn.Module:
    """The conditioner for ``subnet``: the module itself, or ``subnet(in_features, out_features)`` for a factory
    (``TypeError`` naming ``subnet`` for anything else or a factory that returns no ``nn.Module``)."""
    if isinstance(subnet, nn.Module):
        return subnet
    if not callable(subnet):
        raise TypeError(
            f"subnet must be an nn.Module or a callable (in_features, out_features) -> nn.Module, got "
            f"{type(subnet).__name__}"
        )
    net = subnet(in_features, out_features)
    if not isinstance(net, nn.Module):
        raise TypeError(f"subnet({in_features}, {out_features}) must return an nn.Module, got {type(net).__name__}")
    return net
