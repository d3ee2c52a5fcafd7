"""Coupling op benchmark: eager vs fused Triton vs ``torch.compile`` of eager, forward and forward+backward.

Sizes are Glow activations ``(B, C, H, W)`` where ``C`` is the channel count of ``x_b``, ``shift`` and
``raw`` (the half a coupling transforms), laid out as in :class:`fastflow.nn.AffineCoupling`:
``x_b = h[:, C:]`` of a contiguous ``(B, 2C, H, W)`` input and ``shift, raw = net.chunk(2, dim=1)`` of the
network output, so every provider reads channel slices (batch stride ``2CHW``), as in the model.

Bytes counted (``E`` = element size, per element of ``x_b``; see ``kernels/coupling.py``): forward 4E
(read ``x, t, r``, write ``y``; additive 3E); forward+backward adds the fused backward, 6E for Glow (read
``x, t, r, gy``, write ``gx, gr``; ``gt`` is ``gx``; Jet's ``"sigmoid2"`` the same), 5E for RealNVP (``gt`` is
``gy``), 0 for additive (``gx`` and ``gt`` are ``gy``: no kernel). GB/s is that count over the median
time for every provider (eager and compiled move more bytes than this minimum, so theirs is an effective
rate), and ``pct_of_copy`` compares it with a measured device copy. Each provider's result is checked
against float32 eager before it is timed; a mismatch raises instead of reporting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

import fastflow
from benchmarks.common import SKIPPED, Budget, check_close, copy_bandwidth_gbs, interleaved_medians_ms, peak_mib
from fastflow.backend import interpreter_enabled, triton_available
from fastflow.ops.coupling import additive_coupling, affine_coupling

__all__ = ["GLOW_SIZES", "KINDS", "run"]

GLOW_SIZES = ((16, 48, 32, 32), (16, 48, 64, 64), (16, 48, 128, 128), (16, 48, 256, 256))
KINDS = ("sigmoid", "exp", "additive", "sigmoid2")
_FWD_BYTES = {"sigmoid": 4, "exp": 4, "additive": 3, "sigmoid2": 4}
_BWD_BYTES = {"sigmoid": 6, "exp": 5, "additive": 0, "sigmoid2": 6}  # kernels/coupling.py's table
# (atol, rtol) against float32 eager
_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 2e-2)}
_REPS = {True: 5, False: 20}  # CPU repeats for quick / full runs (CUDA: common.CUDA_SAMPLES)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _coupling(kind: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    if kind == "additive":
        return lambda x, t, r: additive_coupling(x, t)
    return lambda x, t, r: affine_coupling(x, t, r, kind)  # type: ignore[arg-type]


def _inputs(size: Sequence[int], dtype: torch.dtype, device: torch.device, requires_grad: bool) -> Inputs:
    batch, channels, height, width = size
    h = torch.randn(batch, 2 * channels, height, width, device=device, dtype=dtype)
    net = torch.randn(batch, 2 * channels, height, width, device=device, dtype=dtype)
    x, (t, r) = h[:, channels:], net.chunk(2, dim=1)
    if requires_grad:
        x, t, r = (v.detach().requires_grad_() for v in (x, t, r))
    return x, t, r


def _fwd_bwd(
    op: Callable[..., tuple[torch.Tensor, ...]], kind: str, grad_y: torch.Tensor, grad_logdet: torch.Tensor
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """Forward then backward with fixed upstream gradients; returns the input gradients."""

    def step(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, logdet = op(x, t, r)
        if kind == "additive":  # its log-det is a constant zero
            return torch.autograd.grad(y, (x, t), grad_y)
        return torch.autograd.grad((y, logdet), (x, t, r), (grad_y, grad_logdet))

    return step


def _providers(kind: str, device: torch.device) -> dict[str, tuple[str, Callable[..., tuple[torch.Tensor, ...]]]]:
    """``name -> (fastflow backend, op)``: eager, compiled eager, and fused where CUDA and Triton exist.

    On the CPU the kernels only run under Triton's interpreter, whose times say nothing about speed.
    """
    op = _coupling(kind)
    # every closure of _coupling shares one code object, hence one dynamo cache: start each pass afresh so
    # kinds, dtypes and grad modes never hit the recompile limit and fall back to eager unnoticed
    torch._dynamo.reset()
    providers = {"eager": ("eager", op), "compile": ("eager", torch.compile(op, dynamic=False))}
    if device.type == "cuda" and triton_available() and not interpreter_enabled():
        providers["fused"] = ("triton", op)
    return providers


def _reference(
    kind: str, backward: bool, inputs: Inputs, grad_y: torch.Tensor, grad_logdet: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Float32 eager outputs (forward) or input gradients (forward+backward) for the correctness check."""
    with fastflow.backend("eager"):
        ref_inputs = [v.detach().float().requires_grad_(backward) for v in inputs]
        op = _fwd_bwd(_coupling(kind), kind, grad_y.float(), grad_logdet) if backward else _coupling(kind)
        return op(*ref_inputs)


def _bench_pass(
    kind: str,
    pass_name: str,
    size: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    copy_gbs: float,
) -> list[dict[str, Any]]:
    """Rows of one (kind, pass, size): each provider checked against float32 eager, then timed."""
    backward = pass_name == "fwd+bwd"
    torch.manual_seed(0)  # the same inputs in every run
    x, t, r = _inputs(size, dtype, device, requires_grad=backward)
    grad_y, grad_logdet = torch.randn_like(x), torch.randn(x.shape[0], device=device)
    want = _reference(kind, backward, (x, t, r), grad_y, grad_logdet)
    nbytes = x.numel() * x.element_size() * (_FWD_BYTES[kind] + (_BWD_BYTES[kind] if backward else 0))
    atol, rtol = _TOL[dtype]
    calls: dict[str, Callable[[], Any]] = {}
    for name, (backend, op) in _providers(kind, device).items():
        fn = _fwd_bwd(op, kind, grad_y, grad_logdet) if backward else op

        def call(fn: Callable = fn, backend: str = backend) -> Any:
            with fastflow.backend(backend), torch.set_grad_enabled(backward):  # type: ignore[arg-type]
                return fn(x, t, r)

        for i, (got, ref) in enumerate(zip(call(), want)):
            # a per-sample log-det sums x[0].numel() terms: its float32 rounding grows with their count
            scale = math.sqrt(x[0].numel()) if ref.dim() == 1 else 1.0
            check_close(f"coupling {kind} {pass_name} {name} output {i}", got, ref, atol * scale, rtol)
        calls[name] = call
    # side by side on the CPU (a shared machine's slow spell falls on every provider), do_bench each on CUDA
    times = interleaved_medians_ms(calls, device, rounds=_REPS[quick], calls=1)
    rows = []
    for name, call in calls.items():
        ms, peak = times[name], peak_mib(call, device)
        gbs = nbytes / ms / 1e6
        rows.append(
            {
                "op": "coupling",
                "kind": kind,
                "pass": pass_name,
                "provider": name,
                "shape": list(size),
                "dtype": str(dtype).replace("torch.", ""),
                "device": str(device),
                "median_ms": ms,
                "gbps": gbs,
                "pct_of_copy": 100 * gbs / copy_gbs,
                "peak_mem_mb": peak,
            }
        )
    return rows


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    timed = [r for r in rows if "median_ms" in r]
    by_key = {(r["kind"], r["pass"], tuple(r["shape"]), r["provider"]): r["median_ms"] for r in timed}
    for row in timed:
        key = (row["kind"], row["pass"], tuple(row["shape"]))
        row["speedup_vs_eager"] = by_key[(*key, "eager")] / row["median_ms"]
        row["speedup_vs_compile"] = by_key[(*key, "compile")] / row["median_ms"]


def run(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float32,
    sizes: Sequence[Sequence[int]] = GLOW_SIZES,
    quick: bool = False,
    budget: Budget | None = None,
) -> list[dict[str, Any]]:
    """Time the coupling op on ``device`` in ``dtype`` (float32/float16/bfloat16) for each ``(B, C, H, W)``.

    Returns one dict per (kind, pass, size, provider) with ``median_ms``, ``gbps``, ``pct_of_copy`` (of the
    measured device copy bandwidth), ``peak_mem_mb`` (CUDA only), ``speedup_vs_eager`` and
    ``speedup_vs_compile``. ``quick`` times only the Glow (sigmoid) coupling, with fewer CPU repeats.
    Providers: ``eager``, ``compile`` (``torch.compile`` of eager) and, on CUDA with Triton, ``fused``.
    Raises :class:`benchmarks.common.MismatchError` if a provider disagrees with float32 eager. A (kind,
    pass, size) not started before ``budget`` expires gets one ``skipped: time`` row.
    """
    device = torch.device(device)
    copy_gbs = copy_bandwidth_gbs(device)
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for kind in KINDS[:1] if quick else KINDS:
            for pass_name in ("fwd", "fwd+bwd"):
                if budget is not None and budget.expired():
                    rows.append({"op": "coupling", "kind": kind, "pass": pass_name, "shape": list(size), **SKIPPED})
                    continue
                rows += _bench_pass(kind, pass_name, size, dtype, device, quick, copy_gbs)
    _add_speedups(rows)
    return rows
