"""Spatial tiling of the coupling network: exact tiles with the halo its convolutions need.

A conditioner that can be tiled declares its receptive-field radius as an int attribute ``halo``: Glow's
network (conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3) has ``HALO = 2`` pixels. Its output on a tile
``[h0, h1) x [w0, w1)`` is computed exactly from the input on the tile grown by the halo and clipped to the
image: inside the image the halo supplies the real neighbours; at the image border the clipped edge coincides
with the image edge, where zero-padded convolutions pad exactly as on the whole image. Only the tile's own rows
and columns of the output are kept. (A conditioner without ``halo``, an MLP or one that pools, is not tiled.)

The tile side is ``tile_size`` when given, else the largest side whose network activations fit in
``memory_budget_mb`` (see :func:`choose_tile_size`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

__all__ = [
    "ACTIVE_HIDDEN_TENSORS",
    "DEFAULT_TILE_BUDGET_MB",
    "HALO",
    "Tile",
    "Tiling",
    "check_tileable",
    "choose_tile_size",
    "set_tiling",
    "tiles",
]

HALO = 2
DEFAULT_TILE_BUDGET_MB = 1024.0
ACTIVE_HIDDEN_TENSORS = 4.75
"""Peak memory of one tile's recompute and backward, in hidden-width tensors per pixel of its halo window:
the cost model behind the automatic tile size. Measured, not counted (``python -m benchmarks.tile_memory``:
4.13 to 4.51 on the CPU for hidden 128 to 512), and set just above the largest measurement (allocator
rounding) so that a budget gives the largest tile that fits."""


@dataclass(frozen=True)
class Tiling:
    """Tiling policy of a coupling network: a fixed ``tile_size`` or a ``memory_budget_mb`` to fit."""

    tile_size: int | None = None
    memory_budget_mb: float = DEFAULT_TILE_BUDGET_MB

    def __post_init__(self) -> None:
        if self.tile_size is not None and (isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int)):
            raise TypeError(f"tile_size must be an int, got {self.tile_size!r}")
        if self.tile_size is not None and self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        budget = self.memory_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"memory_budget_mb must be a number, got {budget!r}")
        if not math.isfinite(self.memory_budget_mb) or self.memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be a finite number > 0, got {self.memory_budget_mb}")

    def side(self, batch: int, hidden: int, element_size: int, halo: int = HALO) -> int:
        """The tile side for a batch of ``batch`` images through a network of width ``hidden`` and ``halo``."""
        if self.tile_size is not None:
            return self.tile_size
        return choose_tile_size(batch, hidden, element_size, self.memory_budget_mb, halo)


def set_tiling(module: nn.Module, tile_size: int | None = None, memory_budget_mb: float | None = None) -> None:
    """Run every coupling network in ``module`` (a model, a :class:`~fastflow.nn.FlowSequential` of your own
    layers, one coupling) in spatial tiles with the halo its convolutions need (exact) when it runs without a
    graph: in reversible backprop's forward and recompute, in ``inverse``/``sample``, and under ``torch.no_grad``.
    ``tile_size`` fixes the tile side; otherwise it is the largest side whose network activations fit in
    ``memory_budget_mb`` per coupling. Both None turns tiling off. ``ValueError`` when ``module`` has no coupling
    that tiles, or (from the coupling) when a conditioner declares no ``halo``."""
    tiling = None
    if tile_size is not None or memory_budget_mb is not None:
        budget = DEFAULT_TILE_BUDGET_MB if memory_budget_mb is None else memory_budget_mb
        tiling = Tiling(tile_size=tile_size, memory_budget_mb=budget)
    tiled = [m for m in module.modules() if hasattr(m, "tiling")]
    if tiling is not None and not tiled:
        raise ValueError(
            f"{type(module).__name__} has no layer that runs in spatial tiles (only couplings with convolutional "
            "networks do)"
        )
    if tiling is not None:  # every coupling checked before any is set: a refusal leaves the tiling as it was
        for m in tiled:
            check_tileable(m.net, tiling)
    for m in tiled:
        m.tiling = tiling


def choose_tile_size(batch: int, hidden: int, element_size: int, memory_budget_mb: float, halo: int = HALO) -> int:
    """Largest tile side ``t`` with ``batch * hidden * (t + 2 * halo)^2 * element_size *``
    :data:`ACTIVE_HIDDEN_TENSORS` ``<= budget`` (at least 1)."""
    per_pixel = batch * hidden * element_size * ACTIVE_HIDDEN_TENSORS
    side_with_halo = math.isqrt(int(memory_budget_mb * 2**20 / per_pixel))
    if side_with_halo < 1 + 2 * halo:
        warnings.warn(
            f"a tiling memory budget of {memory_budget_mb:g} MB is below what a 1-pixel tile and its halo of {halo} "
            f"need ({per_pixel * (1 + 2 * halo) ** 2 / 2**20:.3g} MB at batch {batch}): tiles of 1 pixel, over budget",
            RuntimeWarning,
            stacklevel=2,
        )
    return max(side_with_halo - 2 * halo, 1)


@dataclass(frozen=True)
class Tile:
    """A tile ``[h0, h1) x [w0, w1)`` and its halo window ``[hh0, hh1) x [ww0, ww1)`` clipped to the image."""

    h0: int
    h1: int
    w0: int
    w1: int
    hh0: int
    hh1: int
    ww0: int
    ww1: int

    @property
    def core(self) -> tuple[slice, slice]:
        """Slices of the tile in image coordinates."""
        return slice(self.h0, self.h1), slice(self.w0, self.w1)

    @property
    def window(self) -> tuple[slice, slice]:
        """Slices of the halo window in image coordinates."""
        return slice(self.hh0, self.hh1), slice(self.ww0, self.ww1)

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        """Slices of the tile in the coordinates of its halo window."""
        return slice(self.h0 - self.hh0, self.h1 - self.hh0), slice(self.w0 - self.ww0, self.w1 - self.ww0)


def tiles(height: int, width: int, side: int, halo: int = HALO) -> Iterator[Tile]:
    """Tiles of at most ``side x side`` covering the image row by row (the last ones may be smaller), each with
    its window grown by ``halo`` pixels and clipped to the image."""
    for h0 in range(0, height, side):
        for w0 in range(0, width, side):
            h1, w1 = min(h0 + side, height), min(w0 + side, width)
            yield Tile(
                h0, h1, w0, w1, max(h0 - halo, 0), min(h1 + halo, height), max(w0 - halo, 0), min(w1 + halo, width)
            )


def check_tiles_are_exact(net: nn.Module) -> None:
    """``ValueError`` naming the module when ``net`` computes statistics over the pixels, so that running it tile by
    tile is not running it whole: a batch norm in training mode (batch statistics, and its running statistics
    would be updated once per tile), a group, instance or layer norm (statistics over each image)."""
    for name, module in net.named_modules():
        batch_statistics = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
        per_image = isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm))
        if batch_statistics or per_image:
            what = "in training mode (batch statistics)" if batch_statistics else "(statistics over each image)"
            raise ValueError(
                f"the conditioner's {name or 'net'} ({type(module).__name__}) {what} gives another result on each "
                "tile than on the whole image: tiling is exact only for per-pixel layers and convolutions (put batch "
                "norms in eval mode, or switch the tiling off)"
            )


def check_tileable(net: object, tiling: Tiling) -> tuple[int, int | None]:
    """``(halo, hidden)`` that ``net`` declares, or ``ValueError`` when ``tiling`` cannot run on it: a net without
    an int ``halo`` cannot be tiled exactly, and a memory budget (no ``tile_size``) needs its int width ``hidden``."""
    halo, hidden = getattr(net, "halo", None), getattr(net, "hidden", None)
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(
            f"tiling needs a conditioner that declares its receptive-field halo (an int attribute 'halo' >= 0, as "
            f"Glow's ConvNetwork does: 2); {type(net).__name__} declares none, so it cannot be tiled exactly"
        )
    if tiling.tile_size is None and (isinstance(hidden, bool) or not isinstance(hidden, int)):
        raise ValueError(
            f"a tiling memory budget needs the conditioner's width (an int attribute 'hidden'); "
            f"{type(net).__name__} declares none: give tile_size instead"
        )
    return halo, hidden
