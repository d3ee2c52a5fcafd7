"""Where the host time goes (CUDA): ``python -m benchmarks.profile_overhead [--out DIR]``.

Prints, for the fused coupling (forward+backward at Glow's smallest benchmark size), the fused
ActNorm + 1x1 convolution and one Glow training step (L=3, K=8, hidden 64, 32x32, batch 8) on the eager
and Triton backends: the median device time (``do_bench``), the host time per call (many calls queued
without a sync, then one sync), the kernel launches per call, and the torch.profiler table of the ops that
cost the most host time. A step whose host time exceeds its device time is launch-bound.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

import fastflow
from benchmarks.common import median_ms
from fastflow.models import Glow
from fastflow.ops.actnorm_invconv import actnorm_invconv
from fastflow.ops.coupling import affine_coupling


def _host_ms(fn: Callable[[], Any], calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / calls


def _profile(fn: Callable[[], Any], calls: int = 5) -> tuple[int, str]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    return kernel_launches(events) // calls, events.table(sort_by="self_cpu_time_total", row_limit=18)


def kernel_launches(events: Any) -> int:
    """The kernel launches among profiler ``events`` (``key``, ``count``): every CUDA runtime or driver launch
    call (``cudaLaunchKernel``, ``cudaLaunchKernelExC`` that cuBLAS and cuDNN use, ``cuLaunchKernel`` /
    ``cuLaunchKernelEx`` of Triton, cooperative launches), not host-function launches."""
    return sum(e.count for e in events if e.key.startswith(("cudaLaunch", "cuLaunch")) and "Kernel" in e.key)


def _coupling_case() -> Callable[[], Any]:
    h = torch.randn(16, 96, 32, 32, device="cuda")
    net = torch.randn(16, 96, 32, 32, device="cuda")
    x, t, r = (v.detach().requires_grad_() for v in (h[:, 48:], *net.chunk(2, dim=1)))
    gy, gl = torch.randn_like(x), torch.randn(16, device="cuda")

    def step() -> Any:
        y, logdet = affine_coupling(x, t, r, "sigmoid")
        return torch.autograd.grad((y, logdet), (x, t, r), (gy, gl))

    return step


def _mix_case() -> Callable[[], Any]:
    c = 8  # the widest float32 mix the kernel takes (KERNEL_MAX_CHANNELS_FLOAT32): at 12, cuDNN ran instead
    x = torch.randn(16, c, 32, 32, device="cuda", requires_grad=True)
    bias, logs = (torch.randn(1, c, 1, 1, device="cuda").mul(0.1).requires_grad_() for _ in range(2))
    weight = torch.linalg.qr(torch.randn(c, c, device="cuda"))[0].requires_grad_()
    wl = torch.zeros((), device="cuda", requires_grad=True)

    def step() -> Any:
        y, logdet = actnorm_invconv(x, bias, logs, weight, wl)
        return torch.autograd.grad((y.square().sum() + logdet.sum()), (x, bias, logs, weight))

    return step


def _glow_case(reversible: bool) -> Callable[[], Any]:
    torch.manual_seed(0)
    model = Glow(3, 32, levels=3, steps=8, hidden=64, reversible=reversible).cuda().train()
    x = torch.rand(8, 3, 32, 32, device="cuda") - 0.5
    with torch.no_grad():
        model.log_prob(x)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model.bits_per_dim(x).mean().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None, help="folder for profile_overhead.txt (the full tables)")
    args = parser.parse_args()
    cases = {
        "coupling fwd+bwd (16,48,32,32)": _coupling_case,
        "actnorm_invconv fwd+bwd (16,12,32,32)": _mix_case,
        "glow step L3 K8 h64 32x32 b8": lambda: _glow_case(False),
        "glow step reversible": lambda: _glow_case(True),
    }
    lines, tables = [], []
    for name, make in cases.items():
        for backend in ("eager", "triton"):
            with fastflow.backend(backend):
                fn = make()
                device_ms = median_ms(fn, torch.device("cuda"))
                host_ms = _host_ms(fn)
                launches, table = _profile(fn)
            lines.append(
                f"{name:40s} {backend:7s} median {device_ms:8.3f} ms  host/call {host_ms:8.3f} ms  launches {launches}"
            )
            tables.append(f"### {name} [{backend}]\n{table}")
            print(lines[-1], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_overhead.txt"), "w") as f:
            f.write("\n".join(lines) + "\n\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
