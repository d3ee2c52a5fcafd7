"""FlowStep: one step of Glow, ActNorm -> InvConv1x1 -> coupling."""

from __future__ import annotations

from typing import Literal

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling
from fastflow.nn.invconv import InvConv1x1
from fastflow.nn.sequential import FlowSequential
from fastflow.ops.coupling import ScaleKind

__all__ = ["FlowStep", "CouplingKind"]

CouplingKind = Literal["affine", "additive"]


class FlowStep(FlowSequential):
    """``ActNorm -> InvConv1x1 (LU or plain) -> affine or additive coupling`` on ``num_channels`` channels."""

    def __init__(
        self,
        num_channels: int,
        hidden: int = 512,
        lu: bool = True,
        coupling: CouplingKind = "affine",
        scale: ScaleKind = "sigmoid",
    ) -> None:
        if coupling == "affine":
            coupling_layer: AffineCoupling | AdditiveCoupling = AffineCoupling(num_channels, hidden, scale)
        elif coupling == "additive":
            coupling_layer = AdditiveCoupling(num_channels, hidden)
        else:
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        super().__init__(ActNorm(num_channels), InvConv1x1(num_channels, lu=lu), coupling_layer)

    @property
    def actnorm(self) -> ActNorm:
        """The step's ActNorm layer."""
        return self.layers[0]  # type: ignore[return-value]

    @property
    def invconv(self) -> InvConv1x1:
        """The step's invertible 1x1 convolution."""
        return self.layers[1]  # type: ignore[return-value]

    @property
    def coupling(self) -> AffineCoupling | AdditiveCoupling:
        """The step's coupling layer."""
        return self.layers[2]  # type: ignore[return-value]
