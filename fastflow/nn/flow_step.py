"""FlowStep: one step of Glow, ActNorm -> InvConv1x1 -> coupling, on images or vectors."""

from __future__ import annotations

from typing import Literal

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling
from fastflow.nn.coupling_network import Subnet
from fastflow.nn.invconv import InvConv1x1, InvConvInit
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.spline_coupling import SplineCoupling
from fastflow.ops.coupling import SCALE_KINDS, ScaleKind

__all__ = ["FlowStep", "CouplingKind"]

CouplingKind = Literal["affine", "additive", "spline"]


class FlowStep(FlowSequential):
    """``ActNorm -> InvConv1x1 (LU or plain) -> affine, additive or spline coupling`` on ``num_channels`` channels of
    ``(B, C, H, W)``, or on ``(B, D)`` vectors with ``vectors=True`` (the 1x1 convolution is then an invertible
    linear map). ``subnet``, ``context_features`` and ``vectors`` go to the coupling (:class:`AffineCoupling`),
    which alone sees the ``context``; ``invconv_init`` is the 1x1 convolution's ``init``.

    A :class:`FlowSequential` of those three layers and nothing more: the chain runs ActNorm and the 1x1
    convolution as one op (:class:`~fastflow.nn.actnorm_invconv.ActNormInvConv`, ActNorm folded into the mixing
    weight on the Triton backends and for vectors), and a chain of steps (a Glow level) computes the ``C x C``
    weights of all its steps at once, as it would for the same layers in a chain built by hand.
    """

    def __init__(
        self,
        num_channels: int,
        hidden: int = 512,
        lu: bool = True,
        coupling: CouplingKind = "affine",
        scale: ScaleKind = "sigmoid",
        *,
        subnet: Subnet | None = None,
        context_features: int = 0,
        vectors: bool = False,
        invconv_init: InvConvInit = "rotation",
    ) -> None:
        options = dict(subnet=subnet, context_features=context_features, vectors=vectors)
        if scale not in SCALE_KINDS:  # checked whatever the coupling: a model's config keeps it
            raise ValueError(f"scale must be one of {SCALE_KINDS}, got {scale!r}")
        coupling_layer: AffineCoupling | AdditiveCoupling | SplineCoupling
        if coupling == "affine":
            coupling_layer = AffineCoupling(num_channels, hidden, scale, **options)
        elif coupling == "additive":
            coupling_layer = AdditiveCoupling(num_channels, hidden, **options)
        elif coupling == "spline":  # 8 bins on [-3, 3] (SplineCoupling's defaults); ``scale`` does not apply
            coupling_layer = SplineCoupling(num_channels, hidden, **options)
        else:
            raise ValueError(f"coupling must be 'affine', 'additive' or 'spline', got {coupling!r}")
        super().__init__(ActNorm(num_channels), InvConv1x1(num_channels, lu=lu, init=invconv_init), coupling_layer)

    @property
    def actnorm(self) -> ActNorm:
        """The step's ActNorm layer."""
        return self.layers[0]  # type: ignore[return-value]

    @property
    def invconv(self) -> InvConv1x1:
        """The step's invertible 1x1 convolution."""
        return self.layers[1]  # type: ignore[return-value]

    @property
    def coupling(self) -> AffineCoupling | AdditiveCoupling | SplineCoupling:
        """The step's coupling layer."""
        return self.layers[2]  # type: ignore[return-value]
