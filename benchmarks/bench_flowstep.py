"""One Glow FlowStep (ActNorm -> LU 1x1 conv -> affine coupling), forward and forward+backward:
eager vs fused (Triton, CUDA only) vs torch.compile of the eager step (mode default). The case
``flowstep_max_autotune`` adds ``torch.compile(mode="max-autotune")`` at the first size: minutes of autotuning
on a GPU, so it is a case of its own, last in ``make gpu-check``."""

from __future__ import annotations

from typing import Any

import torch

import fastflow
from benchmarks.common import SKIPPED, Budget, check_close, median_ms
from fastflow.nn import FlowStep

__all__ = ["run"]


def _sizes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int, int]]:
    """``(batch, channels, height, width, hidden)``."""
    if device.type == "cuda":
        sizes = [(64, 12, 16, 16, 512), (16, 12, 64, 64, 512), (16, 48, 32, 32, 512), (4, 12, 128, 128, 512)]
    else:
        sizes = [(8, 12, 16, 16, 64), (4, 48, 16, 16, 64)]
    return sizes[:2] if quick else sizes


def _fwd_bwd(step: FlowStep, x: torch.Tensor) -> None:
    y, logdet = step(x)
    (y.float().square().mean() - logdet.mean()).backward()


def _time_variants(
    step: FlowStep, x: torch.Tensor, device: torch.device, max_autotune: bool
) -> dict[str, tuple[float, float]]:
    """``{variant: (fwd_ms, fwd_bwd_ms)}`` after checking each variant's output against eager."""
    with fastflow.backend("eager"):
        eager_out = step(x)[0].detach()
    variants: dict[str, tuple[torch.nn.Module, str]] = {"eager": (step, "eager")}
    if device.type == "cuda":
        variants["fused"] = (step, "triton")
    variants["compile"] = (torch.compile(step), "eager")
    if max_autotune:
        variants["compile-max-autotune"] = (torch.compile(step, mode="max-autotune"), "eager")
    timings = {}
    for name, (module, backend) in variants.items():
        with fastflow.backend(backend):
            check_close(f"flowstep {name}", module(x)[0].detach(), eager_out, atol=1e-3, rtol=1e-3)
            timings[name] = (
                median_ms(lambda m=module: m(x), device),
                median_ms(lambda m=module: _fwd_bwd(m, x), device),
            )
    return timings


def run(
    device: torch.device, dtype: torch.dtype, quick: bool, max_autotune: bool = False, budget: Budget | None = None
) -> list[dict[str, Any]]:
    """Rows of ``{case, size, variant, fwd_ms, fwd_bwd_ms, speedup_*}``; with ``max_autotune`` the first size
    only, with the max-autotune variant too. A size not started before ``budget`` expires gets one
    ``skipped: time`` row."""
    rows: list[dict[str, Any]] = []
    for b, c, h, w, hidden in _sizes(device, quick)[: 1 if max_autotune else None]:
        if budget is not None and budget.expired():
            rows.append({"case": "flowstep", "size": f"{b}x{c}x{h}x{w} h{hidden}", **SKIPPED})
            continue
        step = FlowStep(c, hidden).to(device).train()
        x = torch.randn(b, c, h, w, device=device)
        step(x)  # ActNorm init
        step = step.to(dtype)
        timings = _time_variants(step, x.to(dtype).requires_grad_(True), device, max_autotune)
        for name, (fwd_ms, fwd_bwd_ms) in timings.items():
            rows.append(
                {
                    "case": "flowstep",
                    "size": f"{b}x{c}x{h}x{w} h{hidden}",
                    "dtype": str(dtype).split(".")[-1],
                    "variant": name,
                    "fwd_ms": fwd_ms,
                    "fwd_bwd_ms": fwd_bwd_ms,
                    "speedup_vs_eager": timings["eager"][1] / fwd_bwd_ms,
                    "speedup_vs_compile": timings["compile"][1] / fwd_bwd_ms,
                }
            )
    return rows
