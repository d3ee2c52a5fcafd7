"""Benchmark ActNorm + InvConv1x1: eager (ActNorm then conv2d) vs fused (one channel mix) vs torch.compile.

What is timed, per size ``(B, C, H, W)``, forward and forward+backward (gradients of ``x``, ``bias``,
``logs`` and ``weight``):

- ``eager``: :func:`fastflow.ops.actnorm_invconv.actnorm_invconv_ref` (two passes: ActNorm, then cuDNN);
- ``fused``: :func:`fastflow.ops.actnorm_invconv.actnorm_invconv` (ActNorm folded into the weight, one
  Triton channel-mix pass; on a CPU the fold runs as one conv2d, i.e. the eager backend);
- ``compiled``: ``torch.compile`` of the eager twin.

Median times come from :func:`benchmarks.common.interleaved_medians_ms`, the variants side by side (one timing
method for all on CUDA); speed-ups are against eager in the same run. GB/s is reported against the bytes the
fused kernel must move, ``B*H*W*2C*e`` forward and ``B*H*W*5C*e`` forward+backward (``e`` the element size: read ``x``,
write ``y``; then read ``x`` and ``grad_y``, write ``grad_x``), for every variant, and as a percentage
of a measured device-to-device copy. Peak memory is measured on CUDA. The fused outputs and gradients are
checked against eager before any timing; a mismatch raises instead of reporting. The compiled twin's are checked
too, once per size: a mismatch (or a failed compilation) is reported in its rows instead of a time.

Channels: the issue's grid ``C in {6, 12, 24, 48, 96}`` plus 128, the widest launch class of the kernel
(wider tiles spill registers; see ``kernels/channel_mix.py``). The run raises
:data:`fastflow.ops.channel_mix.KERNEL_MAX_CHANNELS` to the largest ``C`` benchmarked, so the kernel is
timed at every size, and :func:`kernel_max_channels` reads the threshold off the results.

Run it with ``python -m benchmarks --cases actnorm_invconv`` (see ``benchmarks/__main__.py``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch

import fastflow
from benchmarks.common import SKIPPED, Budget, MismatchError, copy_bandwidth_gbs, interleaved_medians_ms, peak_mib
from fastflow.ops import channel_mix as channel_mix_ops
from fastflow.ops.actnorm_invconv import actnorm_invconv, actnorm_invconv_ref
from fastflow.ops.invconv import lu_weight_and_logdet

__all__ = ["CHANNELS", "RESOLUTIONS", "default_sizes", "kernel_max_channels", "run"]

CHANNELS = (6, 12, 24, 48, 96, 128)
RESOLUTIONS = (32, 64, 128, 256)
# max |fused - eager| / max |eager| allowed before timing; float32 allows for TF32 (cuDNN's default)
RELATIVE_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def default_sizes(device: str, quick: bool, channels: tuple[int, ...] | None = None) -> list[tuple[int, int, int, int]]:
    """``(B, C, H, W)`` grid: C in ``channels`` (default {6..128}) x 32^2..256^2 (quick: C in {12, 48} x
    {32^2, 128^2})."""
    batch = 16 if device == "cuda" else 4
    quick_channels, resolutions = ((12, 48), (32, 128)) if quick else (CHANNELS, RESOLUTIONS)
    return [(batch, c, r, r) for c in channels or quick_channels for r in resolutions]


def _params(channels: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(channels)
    weight, weight_logdet = lu_weight_and_logdet(
        torch.randperm(channels, generator=g),
        0.3 * torch.randn(channels, channels, generator=g),
        0.3 * torch.randn(channels, channels, generator=g),
        torch.where(torch.rand(channels, generator=g) < 0.5, -1.0, 1.0),
        0.1 * torch.randn(channels, generator=g),
    )
    params = {
        "bias": torch.randn(1, channels, 1, 1, generator=g),
        "logs": 0.2 * torch.randn(1, channels, 1, 1, generator=g),
        "weight": weight,
        "weight_logdet": weight_logdet,
    }
    return {k: v.to(device).requires_grad_() for k, v in params.items()}


def _check(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item() or 1.0
    if not err <= RELATIVE_TOL[dtype] * scale:
        raise MismatchError(f"fused {name} differs from eager: max error {err:.3g} at scale {scale:.3g}")


@contextlib.contextmanager
def _kernel_up_to(channels: int) -> Iterator[None]:
    """Raise the kernel's channel threshold for the block, so the kernel is timed at every size."""
    saved = channel_mix_ops.KERNEL_MAX_CHANNELS, channel_mix_ops.KERNEL_MAX_CHANNELS_FLOAT32
    channel_mix_ops.KERNEL_MAX_CHANNELS = max(saved[0], channels)
    channel_mix_ops.KERNEL_MAX_CHANNELS_FLOAT32 = max(saved[1], channels)
    try:
        yield
    finally:
        channel_mix_ops.KERNEL_MAX_CHANNELS, channel_mix_ops.KERNEL_MAX_CHANNELS_FLOAT32 = saved


def _check_fused(
    x: torch.Tensor, params: tuple[torch.Tensor, ...], grad_y: torch.Tensor, fn: Callable = actnorm_invconv
) -> None:
    """``fn``'s (the fused op's, or the compiled twin's) output, log-det and gradients against eager; raises on a
    mismatch."""
    inputs = (x, *params[:3])
    want_y, want_logdet = actnorm_invconv_ref(x, *params)
    got_y, got_logdet = fn(x, *params)
    _check("y", got_y, want_y, x.dtype)
    _check("logdet", got_logdet, want_logdet, torch.float32)
    want_grads = torch.autograd.grad(want_y, inputs, grad_y)
    got_grads = torch.autograd.grad(got_y, inputs, grad_y)
    for name, got, want in zip(("grad_x", "grad_bias", "grad_logs", "grad_weight"), got_grads, want_grads):
        _check(name, got, want, x.dtype)


def _forward(fn: Callable, x: torch.Tensor, params: tuple, grad_y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fn(x, *params)[0]


def _forward_backward(fn: Callable, x: torch.Tensor, params: tuple, grad_y: torch.Tensor) -> tuple:
    return torch.autograd.grad(fn(x, *params)[0], (x, *params[:3]), grad_y)


def run(
    device: torch.device,
    dtype: torch.dtype,
    quick: bool,
    channels: tuple[int, ...] | None = None,
    budget: Budget | None = None,
) -> list[dict]:
    """Benchmark every ``(B, C, H, W)`` size of :func:`default_sizes`; one dict per (size, mode, variant)
    with median ms, speed-up vs eager, GB/s, % of copy bandwidth and peak MiB. Sizes not started before
    ``budget`` expires get one ``skipped: time`` row each."""
    sizes = default_sizes(device.type, quick, channels)
    backend = "triton" if device.type == "cuda" else "eager"
    copy_gbps = copy_bandwidth_gbs(device)
    results = []
    with _kernel_up_to(max(c for _, c, _, _ in sizes)), fastflow.backend(backend):
        for batch, channels, height, width in sizes:
            if budget is not None and budget.expired():
                size = {"batch": batch, "channels": channels, "height": height, "width": width}
                results.append({"op": "actnorm_invconv", **size, **SKIPPED})
                continue
            torch._dynamo.reset()  # a fresh compile per size: no recompile limit, no stale graphs
            variants = {
                "eager": actnorm_invconv_ref,
                "fused": actnorm_invconv,
                "compiled": torch.compile(actnorm_invconv_ref, dynamic=False),
            }
            p = _params(channels, device)
            params = (p["bias"], p["logs"], p["weight"], p["weight_logdet"])
            x = torch.randn(batch, channels, height, width, device=device, dtype=dtype, requires_grad=True)
            grad_y = torch.randn_like(x)
            _check_fused(x, params, grad_y)
            compiled_error: Exception | None = None
            try:  # the compiled twin, checked as the fused op is (a failed compilation shows here too)
                _check_fused(x, params, grad_y, variants["compiled"])
            except Exception as err:
                compiled_error = err

            pixel_bytes = batch * height * width * channels * x.element_size()
            for mode, step, n_bytes in (
                ("forward", _forward, 2 * pixel_bytes),
                ("forward+backward", _forward_backward, 5 * pixel_bytes),
            ):
                timed = {name: functools.partial(step, fn, x, params, grad_y) for name, fn in variants.items()}
                errors: dict[str, str] = {}
                for name, call in timed.items():
                    try:
                        if name == "compiled" and compiled_error is not None:
                            raise compiled_error
                        call()  # warm-up, and the compile of the compiled variant
                    except Exception as err:  # a torch.compile failure or mismatch is reported (no time), not fatal
                        errors[name] = repr(err)[:200]
                # side by side: a slow spell of a shared machine lands on every variant alike
                try:
                    times = interleaved_medians_ms({n: c for n, c in timed.items() if n not in errors}, device)
                except Exception as err:  # an out-of-memory while timing, say: every variant's row says so
                    times, errors = {}, {name: errors.get(name, f"timing: {err!r}"[:200]) for name in variants}
                for name in variants:
                    ms, eager_ms, error = times.get(name), times.get("eager"), errors.get(name)
                    try:
                        peak = None if ms is None else peak_mib(timed[name], device)
                    except Exception as err:
                        peak, error = None, f"peak memory: {err!r}"[:200]
                    gbps = None if ms is None else n_bytes / (ms * 1e6)
                    results.append(
                        {
                            "op": "actnorm_invconv",
                            "dtype": str(dtype).replace("torch.", ""),
                            "batch": batch,
                            "channels": channels,
                            "height": height,
                            "width": width,
                            "mode": mode,
                            "variant": name,
                            "fused_backend": backend,
                            "median_ms": ms,
                            "speedup_vs_eager": None if ms is None or eager_ms is None else eager_ms / ms,
                            "bytes": n_bytes,
                            "gbps": gbps,
                            "pct_of_copy_bandwidth": None if gbps is None else 100 * gbps / copy_gbps,
                            "copy_gbps": copy_gbps,
                            "peak_mib": peak,
                            "error": error,
                        }
                    )
    return results


def kernel_max_channels(results: list[dict]) -> int | None:
    """The threshold these results support for :data:`fastflow.ops.channel_mix.KERNEL_MAX_CHANNELS`: the
    largest benchmarked ``C`` such that at it and at every smaller benchmarked ``C``, ``fused`` is faster
    than ``eager`` at every size, forward and forward+backward (0 when the smallest ``C`` already loses).
    None when the results hold no fused timings from a Triton backend (a CPU run times eager twice)."""
    wins: dict[int, bool] = {}
    for fused in results:
        if fused.get("variant") != "fused" or fused["fused_backend"] == "eager":
            continue
        speedup = fused["speedup_vs_eager"]
        wins[fused["channels"]] = wins.get(fused["channels"], True) and speedup is not None and speedup > 1.0
    if not wins:
        return None
    threshold = 0
    for channels in sorted(wins):
        if not wins[channels]:
            break
        threshold = channels
    return threshold
