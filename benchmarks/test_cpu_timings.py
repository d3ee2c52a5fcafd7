"""pytest-benchmark timings of the CPU paths (``make bench`` runs them after ``python -m benchmarks``).

Each compiled benchmark checks the timed callable against the eager reference once before timing it (the eager
variants are that reference).
"""

from __future__ import annotations

import pytest
import torch

import fastflow
from benchmarks.common import check_close
from fastflow.nn import FlowStep
from fastflow.ops.actnorm_invconv import actnorm_invconv_ref
from fastflow.ops.coupling import affine_coupling_ref


def _coupling_inputs():
    return [torch.randn(16, 24, 32, 32) for _ in range(3)]


def _mix_inputs():
    channels = 48
    x = torch.randn(8, channels, 32, 32)
    weight = torch.linalg.qr(torch.randn(channels, channels))[0]
    return x, torch.randn(1, channels, 1, 1), 0.1 * torch.randn(1, channels, 1, 1), weight, torch.zeros(())


CASES = {
    "coupling": (affine_coupling_ref, _coupling_inputs),
    "actnorm_invconv": (actnorm_invconv_ref, _mix_inputs),
}


@pytest.mark.parametrize("variant", ["eager", "compile"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_op_forward(benchmark, case, variant):
    op, make_inputs = CASES[case]
    inputs = make_inputs()
    fn = op if variant == "eager" else torch.compile(op, dynamic=False)
    if variant != "eager":
        check_close(f"{case} {variant}", fn(*inputs)[0], op(*inputs)[0], atol=1e-4, rtol=1e-4)
    benchmark(fn, *inputs)


@pytest.mark.parametrize("variant", ["eager", "compile"])
def test_flowstep_forward_backward(benchmark, variant):
    step = FlowStep(12, hidden=64).train()
    x = torch.randn(8, 12, 16, 16, requires_grad=True)
    step(x)
    module = step if variant == "eager" else torch.compile(step)

    def forward_backward() -> None:
        y, logdet = module(x)
        (y.square().mean() - logdet.mean()).backward()

    with fastflow.backend("eager"):
        if variant != "eager":
            check_close(f"flowstep {variant}", module(x)[0], step(x)[0], atol=1e-4, rtol=1e-4)
        benchmark(forward_backward)
