"""Flow layers as nn.Modules on vectors ``(B, D)`` and images ``(B, C, H, W)``: ``forward(x, context=None) ->
(y, logdet)`` and ``inverse(y, context=None) -> (x, logdet)``."""

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.autoregressive import MaskedAutoregressiveSpline
from fastflow.nn.base import FlowLayer
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling
from fastflow.nn.coupling_network import (
    ConvNetwork,
    MLPNetwork,
    PointwiseConv2d,
    Subnet,
    ZeroConv2d,
    conv_subnet,
    coupling_network,
    mlp_subnet,
)
from fastflow.nn.flow_step import FlowStep
from fastflow.nn.invconv import InvConv1x1, InvertibleLinear
from fastflow.nn.patchify import Patchify, Unpatchify
from fastflow.nn.permutation import Permutation
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.spline_coupling import SplineCoupling
from fastflow.nn.split import Split
from fastflow.nn.squeeze import Squeeze, squeeze2d, unsqueeze2d
from fastflow.nn.tiling import Tiling, set_tiling
from fastflow.nn.token_coupling import TokenCoupling
from fastflow.nn.vit import ViTConditioner

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ConvNetwork",
    "FlowLayer",
    "FlowSequential",
    "FlowStep",
    "InvConv1x1",
    "InvertibleLinear",
    "MLPNetwork",
    "MaskedAutoregressiveSpline",
    "Patchify",
    "Permutation",
    "PointwiseConv2d",
    "SplineCoupling",
    "Split",
    "Squeeze",
    "Subnet",
    "Tiling",
    "TokenCoupling",
    "Unpatchify",
    "ViTConditioner",
    "ZeroConv2d",
    "conv_subnet",
    "coupling_network",
    "mlp_subnet",
    "set_tiling",
    "squeeze2d",
    "unsqueeze2d",
]
