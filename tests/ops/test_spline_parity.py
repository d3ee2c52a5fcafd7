"""Parity of ``fastflow/ops/spline.py`` with zuko's ``MonotonicRQSTransform`` on the same spline.

zuko maps its raw parameters differently (softmax without minimum bin sizes of soft-clipped raw sizes, ``exp`` of
soft-clipped raw derivatives, ``clip(r) = r / (1 + |r| / c)`` with ``c = -log(slope)``, halved for the sizes).
fastflow's sizes ``w`` and knot derivatives ``d`` are zuko's for the raw parameters ``clip^-1(log w)`` and
``clip^-1(log d)``; both take the end derivatives as 1 and the identity outside ``[-bound, bound]``. A tiny
``slope`` keeps every ``log`` inside the clip's range.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastflow
from fastflow.backend import interpreter_enabled, triton_available
from fastflow.ops import spline as S

zuko = pytest.importorskip("zuko")

BOUND = 3.0
SLOPE = 1e-30  # zuko's clip range, -log(SLOPE) = 69, holds the logs of sizes and derivatives down to 1e-30


def _unclip(v: torch.Tensor, c: float) -> torch.Tensor:
    """Inverse of ``r / (1 + |r| / c)`` on ``|v| < c``."""
    return v / (1 - v.abs() / c)


def zuko_transform(raw: torch.Tensor, bins: int, min_size: float = 1e-3, min_derivative: float = 1e-3):
    """zuko's ``MonotonicRQSTransform`` with fastflow's spline for ``raw`` (module docstring)."""
    c = -math.log(SLOPE)
    raw_w, raw_h, raw_d = raw.split([bins, bins, bins - 1], dim=-1)
    widths, heights = (min_size + (1 - bins * min_size) * torch.softmax(r, dim=-1) for r in (raw_w, raw_h))
    derivatives = min_derivative + F.softplus(raw_d)
    return zuko.transforms.MonotonicRQSTransform(
        _unclip(widths.log(), c / 2), _unclip(heights.log(), c / 2), _unclip(derivatives.log(), c), BOUND, SLOPE
    )


def _backends() -> list[str]:
    kernels = "interpret" if interpreter_enabled() else "triton" if torch.cuda.is_available() else None
    return ["eager"] + ([kernels] if kernels and triton_available() else [])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("bins", [1, 3, 8])
def test_forward_inverse_and_logdet_match_zuko(backend: str, bins: int) -> None:
    device = "cuda" if backend == "triton" else "cpu"
    raw = 2.0 * torch.randn(4, 6, 3 * bins - 1, dtype=torch.float64, device=device)
    x = 2.0 * torch.randn(4, 6, dtype=torch.float64, device=device)
    x[0, :2] = torch.tensor([-5.0, 4.0])  # both tails
    transform = zuko_transform(raw, bins)
    y_zuko, ladj = transform.call_and_ladj(x)
    with fastflow.backend(backend):  # type: ignore[arg-type]
        y, logdet = S.rq_spline(x, raw, bins, BOUND)
        x_back, neg_logdet = S.rq_spline_inverse(y_zuko, raw, bins, BOUND)
    torch.testing.assert_close(y, y_zuko, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logdet, ladj.sum(dim=1), atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(x_back, transform.inv(y_zuko), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(neg_logdet, -ladj.sum(dim=1), atol=1e-10, rtol=1e-10)


def test_gradients_match_zuko() -> None:
    """Autograd through zuko's transform (and through the raw-parameter mapping) equals fastflow's gradients."""
    bins = 4
    raw = (1.5 * torch.randn(3, 5, 3 * bins - 1, dtype=torch.float64)).requires_grad_()
    x = (2.0 * torch.randn(3, 5, dtype=torch.float64)).requires_grad_()
    y_zuko, ladj = zuko_transform(raw, bins).call_and_ladj(x)
    y, logdet = S.rq_spline_ref(x, raw, bins, BOUND)
    loss_zuko = (y_zuko * y_zuko.detach()).sum() + ladj.sum()
    loss = (y * y.detach()).sum() + logdet.sum()
    for got, want in zip(torch.autograd.grad(loss, (x, raw)), torch.autograd.grad(loss_zuko, (x, raw))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
