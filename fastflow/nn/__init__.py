"""Flow layers as nn.Modules: ``forward(x) -> (y, logdet)`` and ``inverse(y) -> (x, logdet)``."""

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.base import FlowLayer
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling
from fastflow.nn.coupling_network import ZeroConv2d, coupling_network
from fastflow.nn.flow_step import FlowStep
from fastflow.nn.invconv import InvConv1x1
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.split import Split
from fastflow.nn.squeeze import Squeeze, squeeze2d, unsqueeze2d

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "FlowLayer",
    "FlowSequential",
    "FlowStep",
    "InvConv1x1",
    "Split",
    "Squeeze",
    "ZeroConv2d",
    "coupling_network",
    "squeeze2d",
    "unsqueeze2d",
]
