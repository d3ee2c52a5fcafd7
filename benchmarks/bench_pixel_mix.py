"""Compiled CPU channel mix: :func:`~fastflow.ops.channel_mix.pixel_sum` against
:func:`~fastflow.ops.channel_mix.pixel_matmul` under ``torch.compile``, the choice behind
:data:`fastflow.ops.channel_mix.PIXEL_SUM_MAX_PRODUCTS`.

What is timed, per size ``(B, C, H, W)``: forward and backward (gradients of ``x``, ``weight`` and ``bias``) of
``sum((mix(1.5 x + 0.1) )^2)``, each formulation compiled on its own (a fresh Dynamo per size), side by side in
one process (:func:`benchmarks.common.interleaved_medians_ms`). The elementwise neighbours stand for the ops
Inductor fuses with the mix in a flow step. Both formulations' losses and gradients are checked against each
other first; a mismatch is reported in the size's rows instead of a time. ``path`` says which one compiled
flow code takes at that width. ``gbps`` counts the least any formulation moves, ``x`` read once and its gradient
written once (``2 * 4`` bytes per element; weights are ``C x C``), over the median time, and
``pct_of_copy_bandwidth`` puts it against a measured copy. No peak memory: it is measured on CUDA only
(:func:`benchmarks.common.peak_mib`), and this case is CPU only.

Run it with ``python -m benchmarks --cases pixel_mix`` (CPU only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import SKIPPED, Budget, copy_bandwidth_gbs, interleaved_medians_ms
from fastflow.ops.channel_mix import compiles_as_pixel_sum, pixel_matmul, pixel_sum

__all__ = ["SIZES", "pixel_mix_rows"]

SIZES = (
    (8, 12, 16, 16),
    (8, 24, 8, 8),
    (8, 48, 4, 4),
    (8, 96, 4, 4),
    (8, 48, 8, 8),
    (16, 12, 32, 32),
    (16, 12, 64, 64),
    (16, 48, 16, 16),
    (4, 96, 32, 32),
)
"""The Glow reference step's mixes (12 channels at 16x16 to 48 at 4x4, 3e5 products each), and sizes on both sides
of the threshold (1.2e6 to 3.8e7 products)."""
QUICK_SIZES = SIZES[:3] + SIZES[6:7]
VARIANTS: dict[str, Callable[..., torch.Tensor]] = {"bmm": pixel_matmul, "sum": pixel_sum}


def _step(mix: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def loss(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return mix(x * 1.5 + 0.1, weight, bias).square().sum()

    compiled = torch.compile(loss, dynamic=False)

    def step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        value = compiled(x, weight, bias)
        return (value.detach(), *torch.autograd.grad(value, (x, weight, bias)))

    return step


def _mismatch(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> str | None:
    for name, g, w in zip(("loss", "grad_x", "grad_weight", "grad_bias"), got, want):
        if not torch.allclose(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max())):
            return f"{name} differs: max |sum - bmm| {float((g - w).abs().max()):.3g}"
    return None


def pixel_mix_rows(quick: bool, budget: Budget | None = None) -> list[dict[str, Any]]:
    """One row per size and variant: median ms of the compiled forward+backward, ``speedup_vs_bmm`` and GB/s."""
    rows: list[dict[str, Any]] = []
    copy_gbps = copy_bandwidth_gbs(torch.device("cpu"))
    for batch, channels, height, width in QUICK_SIZES if quick else SIZES:
        size = {"op": "pixel_mix", "batch": batch, "channels": channels, "height": height, "width": width}
        if budget is not None and budget.expired():
            rows.extend({**size, "variant": name, **SKIPPED} for name in VARIANTS)
            continue
        torch._dynamo.reset()  # a fresh compile per size: no recompile limit, no stale graphs
        g = torch.Generator().manual_seed(channels)
        x = torch.randn(batch, channels, height, width, generator=g, requires_grad=True)
        weight = torch.randn(channels, channels, generator=g, requires_grad=True)
        bias = torch.randn(channels, generator=g, requires_grad=True)
        steps = {name: _step(mix) for name, mix in VARIANTS.items()}
        error = _mismatch(steps["sum"](x, weight, bias), steps["bmm"](x, weight, bias))
        args = (x, weight, bias)
        timed = {name: lambda s=s, a=args: s(*a) for name, s in steps.items()}
        times = {} if error else interleaved_medians_ms(timed, torch.device("cpu"))
        path = "sum" if compiles_as_pixel_sum(x, weight) else "bmm"
        n_bytes = 2 * x.numel() * x.element_size()
        for name in VARIANTS:
            ms = times.get(name)
            speedup = None if ms is None else times["bmm"] / ms
            gbps = None if ms is None else n_bytes / (ms * 1e6)
            rows.append(
                {
                    **size,
                    "variant": name,
                    "path": path,
                    "median_ms": ms,
                    "speedup_vs_bmm": speedup,
                    "bytes": n_bytes,
                    "gbps": gbps,
                    "pct_of_copy_bandwidth": None if gbps is None else 100 * gbps / copy_gbps,
                    "error": error,
                }
            )
    return rows
