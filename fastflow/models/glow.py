"""Glow (Kingma & Dhariwal, 2018): multi-scale flow of ActNorm -> 1x1 conv -> coupling steps."""

from __future__ import annotations

from fastflow.models.base import FlowModel
from fastflow.models.priors import GaussianPrior
from fastflow.nn.flow_step import CouplingKind, FlowStep
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.split import Split
from fastflow.nn.squeeze import Squeeze
from fastflow.ops._checks import check_bool, int_at_least
from fastflow.ops.coupling import ScaleKind

__all__ = ["Glow"]


def image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """``(H, W)`` from an int or a pair of ints, each >= 1 (``TypeError``/``ValueError`` naming
    ``image_size`` otherwise)."""
    sides = [image_size, image_size] if not isinstance(image_size, (tuple, list)) else list(image_size)
    if len(sides) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in sides):
        raise TypeError(f"image_size must be an int or a pair of ints (H, W), got {image_size!r}")
    if min(sides) < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size!r}")
    return sides[0], sides[1]


def check_halvings(h: int, w: int, times: int, name: str, subject: str | None = None) -> None:
    """``ValueError`` naming ``name`` unless ``H`` and ``W`` are divisible by ``2 ** times`` (``subject``: what
    has the sides, default ``image_size``); the bound is checked before the power is formed (a config's
    ``levels`` of 10**9 would take seconds and gigabytes to raise 2 to)."""
    if times > min(h, w).bit_length() or h % (1 << times) or w % (1 << times):
        power = 1 << times if times < 64 else f"2**{times}"
        subject = subject or f"image_size {(h, w)}"
        raise ValueError(f"{subject} must be divisible by 2**{name} = {power}")


class Glow(FlowModel):
    """Glow with ``levels`` levels of (squeeze, ``steps`` flow steps, split); the last level has no split.

    Args:
        in_channels, image_size: input image shape ``(in_channels, H, W)``; H and W divisible by
            ``2 ** levels``.
        levels (L), steps (K), hidden: depth and coupling-network width (Glow: L=3, K=32, 512 for 32x32).
        lu: LU-parameterised 1x1 convolutions (O(C) log-det) instead of plain ones.
        coupling, scale: ``"affine"`` with ``"sigmoid"`` (Glow) or ``"exp"`` (RealNVP) scale,
            ``"additive"``, or ``"spline"`` (a rational-quadratic spline coupling, 8 bins on [-3, 3]; no scale).
        learn_top: learned mean and log-std of the top prior (else standard normal).
        num_classes: > 0 conditions the top prior on class labels ``y``.
        n_bins: pixel levels of the data (256 for 8-bit images), used by ``bits_per_dim``.
        reversible: train with memory-saving reversible backprop (same parameters and gradients).
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        levels: int = 3,
        steps: int = 32,
        hidden: int = 512,
        lu: bool = True,
        coupling: CouplingKind = "affine",
        scale: ScaleKind = "sigmoid",
        learn_top: bool = True,
        num_classes: int = 0,
        n_bins: int = 256,
        reversible: bool = False,
    ) -> None:
        h, w = image_hw(image_size)
        int_at_least("levels", levels, 1)
        int_at_least("steps", steps, 1)
        check_bool("lu", lu)
        check_bool("learn_top", learn_top)
        int_at_least("in_channels", in_channels, 1)
        int_at_least("hidden", hidden, 1)
        int_at_least("n_bins", n_bins, 2)
        int_at_least("num_classes", num_classes, 0)
        check_halvings(h, w, levels, "levels")
        config = dict(
            in_channels=in_channels, image_size=(h, w), levels=levels, steps=steps, hidden=hidden, lu=lu,
            coupling=coupling, scale=scale, learn_top=learn_top, num_classes=num_classes, n_bins=n_bins,
            reversible=reversible,
        )  # fmt: skip
        blocks, splits = [], []
        c, hh, ww = in_channels, h, w
        for level in range(levels):
            c, hh, ww = c * 4, hh // 2, ww // 2
            flow_steps = [FlowStep(c, hidden, lu=lu, coupling=coupling, scale=scale) for _ in range(steps)]
            blocks.append(FlowSequential(Squeeze(), *flow_steps))
            if level < levels - 1:
                splits.append(Split(c, learned_prior=True))
                c = splits[-1].keep_channels
        prior = GaussianPrior((c, hh, ww), learned=learn_top, num_classes=num_classes)
        super().__init__(blocks, splits, prior, (in_channels, h, w), n_bins, config)
