"""RealNVP (Dinh et al., 2017): checkerboard and channel-mask affine couplings in a multi-scale flow."""

from __future__ import annotations

from typing import Literal

from fastflow.models.base import FlowModel
from fastflow.models.glow import check_halvings, image_hw
from fastflow.models.priors import GaussianPrior
from fastflow.nn.actnorm import ActNorm
from fastflow.nn.base import FlowLayer
from fastflow.nn.coupling import AffineCoupling, MaskKind
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.spline_coupling import SplineCoupling
from fastflow.nn.split import Split
from fastflow.nn.squeeze import Squeeze
from fastflow.ops._checks import int_at_least

__all__ = ["RealNVP"]


RealNVPCoupling = Literal["affine", "spline"]


def _couplings(channels: int, hidden: int, mask: MaskKind, count: int, coupling: RealNVPCoupling) -> list[FlowLayer]:
    layers: list[FlowLayer] = []
    for parity in range(count):
        if coupling == "affine":
            layers.append(AffineCoupling(channels, hidden, scale="exp", mask=mask, parity=parity % 2))
        else:
            layers.append(SplineCoupling(channels, hidden, parity=parity % 2, mask=mask))
        layers.append(ActNorm(channels))
    return layers


class RealNVP(FlowModel):
    """RealNVP: each of the first ``scales - 1`` scales is 3 checkerboard couplings, squeeze, 3 channel
    couplings and a split (standard-normal prior on the factored-out half); the last scale is 4 checkerboard
    couplings. Couplings use the ``exp(tanh(r))`` scale and Glow's coupling network; ActNorm after every
    coupling stands in for the paper's batch normalisation. Standard-normal top prior.

    ``coupling="spline"``: every coupling a :class:`~fastflow.nn.SplineCoupling` (8 bins on ``[-3, 3]``) with the
    same masks, checkerboard included (the masked positions at the identity spline).
    """

    def __init__(
        self, in_channels: int = 3, image_size: int | tuple[int, int] = 32, scales: int = 2, hidden: int = 64,
        n_bins: int = 256, reversible: bool = False, coupling: RealNVPCoupling = "affine",
    ) -> None:  # fmt: skip
        if coupling not in ("affine", "spline"):
            raise ValueError(f"coupling must be 'affine' or 'spline', got {coupling!r}")
        h, w = image_hw(image_size)
        int_at_least("in_channels", in_channels, 1)
        int_at_least("scales", scales, 1)
        int_at_least("n_bins", n_bins, 2)
        int_at_least("hidden", hidden, 1)
        check_halvings(h, w, scales - 1, "(scales-1)")
        config = dict(
            in_channels=in_channels,
            image_size=(h, w),
            scales=scales,
            hidden=hidden,
            n_bins=n_bins,
            reversible=reversible,
            coupling=coupling,
        )
        blocks, splits = [], []
        c, hh, ww = in_channels, h, w
        for _ in range(scales - 1):
            layers = _couplings(c, hidden, "checkerboard", 3, coupling) + [Squeeze()]
            c, hh, ww = c * 4, hh // 2, ww // 2
            layers += _couplings(c, hidden, "channel", 3, coupling)
            blocks.append(FlowSequential(*layers))
            splits.append(Split(c, learned_prior=False))
            c = splits[-1].keep_channels
        blocks.append(FlowSequential(*_couplings(c, hidden, "checkerboard", 4, coupling)))
        prior = GaussianPrior((c, hh, ww), learned=False)
        super().__init__(blocks, splits, prior, (in_channels, h, w), n_bins, config)
