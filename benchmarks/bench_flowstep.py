"""One Glow FlowStep (ActNorm -> LU 1x1 conv -> affine coupling), forward and forward+backward:
eager vs fused (Triton, CUDA only) vs torch.compile of the eager step (mode default, static shapes: compiled
afresh per size). The case ``flowstep_max_autotune`` adds ``torch.compile(mode="max-autotune-no-cudagraphs")`` at
the first size (autotuning alone: CUDA graphs would also take the launches off the host, which no other variant
gets): minutes of autotuning on a GPU, so it is a case of its own, last in ``make gpu-check``. Every variant's
output, log-det and gradients (of the input and of every parameter) are checked against eager's before it is
timed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import fastflow
from benchmarks.common import SKIPPED, Budget, MismatchError, check_close, interleaved_medians_ms
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


def _results(module: torch.nn.Module, step: FlowStep, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``module``'s output and log-det on ``x``, and the gradients of :func:`_fwd_bwd`'s loss
    w.r.t. ``x`` and each of ``step``'s parameters (the module's, compiled or not)."""
    x.grad = None
    step.zero_grad(set_to_none=True)
    y, logdet = module(x)
    (y.float().square().mean() - logdet.mean()).backward()
    grads = [(f"grad {name}", p.grad) for name, p in step.named_parameters() if p.grad is not None]
    return [("y", y.detach()), ("logdet", logdet.detach()), ("grad x", x.grad), *grads]


_TOL = {torch.float32: (1e-3, 1e-2), torch.float16: (1e-2, 2e-2), torch.bfloat16: (4e-2, 8e-2)}
"""``(output, log-det and gradients)`` tolerance by dtype, relative to the largest magnitude of eager's result
(at least 1) and to each element: TF32 coupling networks on a GPU round at 1e-3; half precision at its own
epsilon (bfloat16 7.8e-3) through a whole step."""


def _check(name: str, results: list[tuple[str, torch.Tensor]], eager: list[tuple[str, torch.Tensor]]) -> None:
    """Each result against eager's within :data:`_TOL` of its dtype."""
    names, eager_names = [n for n, _ in results], [n for n, _ in eager]
    if names != eager_names:
        raise MismatchError(f"flowstep {name}: results {names}, eager's {eager_names}")
    for (what, got), (_, want) in zip(results, eager):
        output_tol, rest_tol = _TOL.get(want.dtype, _TOL[torch.float32])
        tol = output_tol if what == "y" else rest_tol
        atol = tol * max(1.0, want.abs().max().item())
        check_close(f"flowstep {name} {what}", got, want, atol=atol, rtol=tol)


def _time_variants(
    step: FlowStep, x: torch.Tensor, device: torch.device, max_autotune: bool
) -> dict[str, tuple[float, float] | str]:
    """``{variant: (fwd_ms, fwd_bwd_ms)}``, or ``{variant: error}`` for a variant whose results differ from
    eager's (:func:`_check`; it is not timed) or that fails to compile."""
    with fastflow.backend("eager"):
        eager = _results(step, step, x)
    variants: dict[str, tuple[torch.nn.Module, str]] = {"eager": (step, "eager")}
    if device.type == "cuda":
        variants["fused"] = (step, "triton")
    torch._dynamo.reset()  # static shapes per size: no size marked dynamic by the previous one's compilation
    variants["compile"] = (torch.compile(step, dynamic=False), "eager")
    if max_autotune:
        variants["compile-max-autotune"] = (
            torch.compile(step, mode="max-autotune-no-cudagraphs", dynamic=False),
            "eager",
        )
    timings: dict[str, tuple[float, float] | str] = {}
    checked: dict[str, tuple[torch.nn.Module, str]] = {}
    for name, (module, backend) in variants.items():
        with fastflow.backend(backend):
            try:
                _check(name, _results(module, step, x), eager)
            except (MismatchError, RuntimeError) as err:  # a wrong result, or a failed compilation
                timings[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}; not timed"
                continue
        checked[name] = (module, backend)

    def on_backend(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            with fastflow.backend(backend):
                return fn()

        return call

    # side by side (interleaved rounds): a slow spell of the machine lands on every variant alike
    forward = interleaved_medians_ms(
        {name: on_backend(b, lambda m=m: m(x)) for name, (m, b) in checked.items()}, device
    )
    forward_backward = interleaved_medians_ms(
        {name: on_backend(b, lambda m=m: _fwd_bwd(m, x)) for name, (m, b) in checked.items()}, device
    )
    for name in checked:
        timings[name] = (forward[name], forward_backward[name])
    return {name: timings[name] for name in variants}


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
        for name, timing in timings.items():
            row: dict[str, Any] = {
                "case": "flowstep", "size": f"{b}x{c}x{h}x{w} h{hidden}", "dtype": str(dtype).split(".")[-1],
                "variant": name,
            }  # fmt: skip
            if isinstance(timing, str):
                row["error"] = timing
            else:
                row.update(fwd_ms=timing[0], fwd_bwd_ms=timing[1])
                for base in ("eager", "compile"):
                    if isinstance(timings[base], tuple):
                        row[f"speedup_vs_{base}"] = timings[base][1] / timing[1]  # type: ignore[index]
            rows.append(row)
    return rows
