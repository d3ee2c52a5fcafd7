"""FlowStep: one step of Glow, ActNorm -> InvConv1x1 -> coupling."""

from __future__ import annotations

from typing import Literal

import torch

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.base import check_image
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling
from fastflow.nn.invconv import InvConv1x1, exact_dtype
from fastflow.nn.reversible import recompute_backward
from fastflow.nn.sequential import FlowSequential
from fastflow.ops.actnorm_invconv import actnorm_invconv, actnorm_invconv_inverse
from fastflow.ops.coupling import ScaleKind

__all__ = ["FlowStep", "CouplingKind"]

CouplingKind = Literal["affine", "additive"]


class FlowStep(FlowSequential):
    """``ActNorm -> InvConv1x1 (LU or plain) -> affine or additive coupling`` on ``num_channels`` channels.

    ActNorm and the 1x1 convolution run as one op (:mod:`fastflow.ops.actnorm_invconv`): on the Triton
    backends ActNorm is folded into the mixing weight and the pair is one pass over memory; on the eager
    backend it is ActNorm then the convolution. The parameters, ``state_dict`` and outputs are those of the
    three layers run in sequence.
    """

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

    def _mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ActNorm then the 1x1 convolution, as one op."""
        actnorm, invconv = self.actnorm, self.invconv
        actnorm.initialize_once(x)
        with exact_dtype(x):
            weight, weight_logdet = invconv.weight_and_logdet()
            return actnorm_invconv(x, actnorm.bias, actnorm.logs, weight, weight_logdet)

    def _unmix(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`_mix`."""
        actnorm, invconv = self.actnorm, self.invconv
        with exact_dtype(y):
            return actnorm_invconv_inverse(
                y, actnorm.bias, actnorm.logs, invconv.inverse_weight(), invconv.weight_logdet()
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` of the three layers in sequence."""
        check_image("x", x, self.actnorm.num_channels)
        if self.reversible and torch.is_grad_enabled():
            return super().forward(x)
        h, mix_logdet = self._mix(x)
        y, coupling_logdet = self.coupling(h)
        return y, mix_logdet + coupling_logdet

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, logdet)`` of the inverse, coupling first."""
        check_image("y", y, self.actnorm.num_channels)
        h, coupling_logdet = self.coupling.inverse(y)
        x, mix_logdet = self._unmix(h)
        return x, mix_logdet + coupling_logdet

    def backward_from_output(
        self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward: the coupling's fused pass, then the mixing pair rebuilt and recomputed."""
        h, grad_h = self.coupling.backward_from_output(y, grad_y, grad_logdet)
        params = [*self.actnorm.parameters(), *self.invconv.parameters()]
        return recompute_backward(self._mix, self._unmix, params, h, grad_h, grad_logdet)
