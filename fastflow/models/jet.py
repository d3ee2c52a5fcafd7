"""Jet (Kolesnikov et al., 2024, big_vision): a pure coupling flow on image patches with ViT conditioners."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fastflow.models.base import FlowModel
from fastflow.models.glow import image_hw
from fastflow.models.priors import GaussianPrior
from fastflow.nn.patchify import Patchify, Unpatchify
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.token_coupling import SPATIAL_PATTERNS, TokenCoupling, _spatial_order
from fastflow.ops._checks import int_at_least

__all__ = ["Jet"]

_SPLITS = ("channel", "spatial")


def _schedule(kinds: tuple[str, ...], couplings: int) -> list[tuple[str, str, int]]:
    """``(split, pattern, parity)`` of each coupling: the kinds in turn; the spatial ones cycle through
    :data:`SPATIAL_PATTERNS`, each pattern twice (parity 0, then 1)."""
    schedule, spatial = [], 0
    for k in range(couplings):
        split = kinds[k % len(kinds)]
        schedule.append((split, SPATIAL_PATTERNS[(spatial // 2) % len(SPATIAL_PATTERNS)], spatial % 2))
        spatial += split == "spatial"
    return schedule


def _checked_kinds(kinds: object) -> tuple[str, ...]:
    """``kinds`` as a tuple, or a ``TypeError`` / ``ValueError`` naming it unless it is a non-empty sequence (any
    iterable: a generator is read once) of ``"channel"`` / ``"spatial"``."""
    if isinstance(kinds, str) or not isinstance(kinds, Iterable):
        raise TypeError(f"kinds must be a sequence of 'channel' / 'spatial', got {type(kinds).__name__} {kinds!r}")
    kinds = tuple(kinds)
    if not kinds or any(k not in _SPLITS for k in kinds):
        raise ValueError(f"kinds must be a non-empty sequence of 'channel' / 'spatial', got {kinds!r}")
    return kinds


def _check_spatial_patterns(
    grid: tuple[int, int], schedule: list[tuple[str, str, int]], image_size: tuple[int, int], patch_size: int
) -> None:
    """``ValueError`` naming Jet's arguments unless every spatial coupling's pattern halves the token grid (a
    TokenCoupling's own split of it)."""
    tokens = grid[0] * grid[1]
    spatial = {(pattern, parity) for split, pattern, parity in schedule if split == "spatial"}
    odd = sorted({pattern for pattern, parity in spatial if 2 * _spatial_order(grid, pattern, parity)[1] != tokens})
    if odd:
        raise ValueError(
            f"image_size {image_size} // patch_size {patch_size} is a {grid[0]} x {grid[1]} grid of tokens, which "
            f"the spatial couplings' {', '.join(odd)} pattern(s) cannot split in equal halves (they need an even "
            f"number of tokens, of rows and of columns): choose another patch_size (or, in Python, kinds=('channel',))"
        )


class Jet(FlowModel):
    """Jet: patchify, ``couplings`` affine couplings on the tokens, unpatchify, standard normal prior.

    No multiscale, no ActNorm, no 1x1 convolution. The image ``(C, H, W)`` becomes ``N = (H/p)(W/p)`` tokens of
    ``p * p * C`` features (``p = patch_size``); coupling ``k`` splits them by ``kinds[k % len(kinds)]``:
    ``"channel"`` (a fixed random permutation of the features, seeded by ``seed + k``, then halves) or
    ``"spatial"`` (halves of the tokens; the spatial couplings cycle through checkerboard, horizontal and vertical
    stripes, each pattern twice with the halves swapped). Each coupling is
    :class:`~fastflow.nn.token_coupling.TokenCoupling`: ``y_b = (x_b + t) * 2 sigmoid(r)`` with ``(t, r)`` from a
    ViT of ``width``, ``depth`` pre-norm blocks and ``heads`` heads on ``x_a`` (zero-initialised head: the flow
    starts at the identity). The latents come back image-shaped ``(B, C, H, W)``.

    Args:
        in_channels, image_size: input image shape; ``H`` and ``W`` divisible by ``patch_size``.
        patch_size, couplings, width, depth, heads, kinds: as above (``width`` divisible by ``heads``).
        context: > 0 conditions every ViT by cross-attention on a ``context`` ``(B, context)`` or
            ``(B, M, context)`` (zero-initialised: no effect at init).
        n_bins: pixel levels of the data (256 for 8-bit images), used by ``bits_per_dim``.
        reversible: train with memory-saving reversible backprop (same parameters and gradients; activation
            memory flat in ``couplings``; attention is global, so there is no spatial tiling).
        seed: seed of the channel couplings' permutations (buffers: saved with the weights).

    Mixed precision: under ``torch.autocast`` (``fastflow train --amp bf16``) the ViTs compute in bfloat16 while the
    flow (tokens, transforms, log-dets) stays in the input's float32.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int | tuple[int, int] = 32,
        patch_size: int = 4,
        couplings: int = 8,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        kinds: tuple[str, ...] = ("channel", "channel", "spatial"),
        context: int = 0,
        n_bins: int = 256,
        reversible: bool = False,
        seed: int = 0,
    ) -> None:
        h, w = image_hw(image_size)
        int_at_least("in_channels", in_channels, 1)
        int_at_least("patch_size", patch_size, 1)
        int_at_least("n_bins", n_bins, 2)
        int_at_least("couplings", couplings, 1)
        int_at_least("width", width, 1)
        int_at_least("depth", depth, 0)
        int_at_least("heads", heads, 1)
        int_at_least("context", context, 0)
        int_at_least("seed", seed, 0)
        if seed + couplings > 2**64:  # coupling k's permutation is drawn from a generator seeded seed + k < 2**64
            raise ValueError(f"seed must be at most 2**64 - couplings = {2**64 - couplings}, got {seed}")
        if context and not depth:
            raise ValueError(f"context = {context} needs depth >= 1: only the ViT blocks' cross-attention reads it")
        kinds = _checked_kinds(kinds)
        config = dict(
            in_channels=in_channels, image_size=(h, w), patch_size=patch_size, couplings=couplings, width=width,
            depth=depth, heads=heads, kinds=kinds, context=context, n_bins=n_bins, reversible=reversible, seed=seed,
        )  # fmt: skip
        patchify = Patchify(in_channels, (h, w), patch_size)
        grid, features = patchify.grid, patchify.features
        schedule = _schedule(kinds, couplings)
        if features < 2 and any(split == "channel" for split, _, _ in schedule):
            raise ValueError(
                f"in_channels * patch_size**2 = {in_channels} * {patch_size}**2 = {features} feature per token, which "
                "a channel coupling cannot split in two: choose a larger patch_size (or, in Python, kinds=('spatial',))"
            )
        _check_spatial_patterns(grid, schedule, (h, w), patch_size)
        layers = [
            TokenCoupling(
                grid, features, split, pattern=pattern, parity=parity, width=width, depth=depth, heads=heads,
                context_features=context, generator=torch.Generator().manual_seed(seed + k),
            )  # type: ignore[arg-type]
            for k, (split, pattern, parity) in enumerate(schedule)
        ]  # fmt: skip
        block = FlowSequential(patchify, *layers, Unpatchify(in_channels, (h, w), patch_size))
        prior = GaussianPrior((in_channels, h, w), learned=False)
        super().__init__([block], [], prior, (in_channels, h, w), n_bins, config)
