"""Tests for ``fastflow/ops/spline_compiled.py``: the spline forward with closed-form gradients equals the eager
twin's autograd (float64, awkward layouts, one and two bins, the extremes), passes gradcheck, and is what
``rq_spline`` takes on the eager backend under ``torch.compile`` (float32 and float64 only)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fastflow
from fastflow.nn import SplineCoupling
from fastflow.ops import spline as S
from fastflow.ops import spline_compiled as C
from fastflow.ops import spline_eager as E
from tests.ops.test_spline import (
    BOUND,
    NAN_CASES,
    _extreme_inputs,
    _randn,
    assert_nan_gradients,
    assert_three_way,
    make_inputs,
    nan_inputs,
)

CASES = [("odd", 3), ("strided", 8), ("toy2d", 2), ("batch1", 1), ("transposed", 4)]


def _spline(bins: int) -> E.Spline:
    return E.Spline(bins, BOUND, 1e-3, 1e-3, 1e-3)


def _results(fn, x: torch.Tensor, raw: torch.Tensor, gy: torch.Tensor, gl: torch.Tensor) -> list[torch.Tensor]:
    """``[y, logdet, grad_x, grad_raw]`` of ``fn(x, raw)`` for upstream ``gy`` and ``gl``."""
    x, raw = x.detach().requires_grad_(), raw.detach().requires_grad_()
    y, logdet = fn(x, raw)
    return [y, logdet, *torch.autograd.grad((y, logdet), (x, raw), (gy, gl))]


@pytest.mark.parametrize(("case", "bins"), CASES, ids=[f"{c}-K{k}" for c, k in CASES])
def test_closed_form_equals_autograd_of_the_eager_twin(case: str, bins: int) -> None:
    x, raw = make_inputs(case, bins, torch.float64, "cpu")
    gy, gl = _randn(tuple(x.shape), torch.float64, "cpu"), _randn((x.shape[0],), torch.float64, "cpu")
    want = _results(lambda x, raw: S.rq_spline_ref(x, raw, bins, BOUND), x, raw, gy, gl)
    got = _results(lambda x, raw: C.rq_spline_closed_form(x, raw, _spline(bins)), x, raw, gy, gl)
    assert (x.abs() > BOUND).any() and (x.abs() < BOUND).any()  # both tails and the spline are exercised
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("bins", [1, 4])
def test_closed_form_gradcheck_float64(bins: int) -> None:
    x, raw = make_inputs("odd", bins, torch.float64, "cpu")
    x = torch.where((x.abs() - BOUND).abs() < 1e-3, 0.5, x)  # the log-det's slope jumps at the bound
    inputs = (x.requires_grad_(), raw.requires_grad_())
    assert torch.autograd.gradcheck(lambda x, raw: C.rq_spline_closed_form(x, raw, _spline(bins)), inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_closed_form_at_the_extremes(dtype: torch.dtype) -> None:
    """Tiny and huge bins and derivatives, the far tails, the bound and the knots: finite gradients, within
    twice the eager float32 error of float64 (equal to it in float64); zero raw gradients outside the bound."""
    x, raw = _extreme_inputs(dtype, "cpu")
    gy, gl = _randn(tuple(x.shape), dtype, "cpu"), torch.ones(x.shape[0], dtype=torch.float64).to(dtype)
    exact = _results(
        lambda x, raw: S.rq_spline_ref(x, raw, 4, BOUND), x.double(), raw.double(), gy.double(), gl.double()
    )
    eager = _results(lambda x, raw: S.rq_spline_ref(x, raw, 4, BOUND), x, raw, gy, gl)
    got = _results(lambda x, raw: C.rq_spline_closed_form(x, raw, _spline(4)), x, raw, gy, gl)
    for g, e, w in zip(got, eager, exact):
        assert torch.isfinite(g).all()
        assert_three_way(g, e, w, 1e-10 * max(1.0, w.abs().max().item()))
    outside = x.abs() > BOUND
    assert torch.equal(got[2][outside], gy[outside]) and not got[3][outside].any()


@pytest.mark.parametrize("where", NAN_CASES)
def test_closed_form_gives_nan_gradients_where_the_eager_twin_does(where: str) -> None:
    """A NaN input or raw parameter of an element (read or not) gives NaN gradients to its input and to all its
    raw parameters, for any upstream gradient of the log-det (0 included), as on the eager twin and the kernels;
    the closed form used to pass a NaN input the finite gradient of the identity tail."""
    x, raw = nan_inputs(where, "cpu")
    gy = torch.full_like(x, 0.5)
    for gl in (torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)):
        *_, grad_x, grad_raw = _results(lambda x, raw: C.rq_spline_closed_form(x, raw, _spline(4)), x, raw, gy, gl)
        assert_nan_gradients(grad_x, grad_raw, gl)


def test_nan_gradients_under_compile() -> None:
    """``torch.compile`` of ``rq_spline`` on the eager backend (the closed form, through Inductor) gives the NaN
    gradients of :func:`test_closed_form_gives_nan_gradients_where_the_eager_twin_does` in one graph."""
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, raw: S.rq_spline(x, raw, 4, BOUND), fullgraph=True, dynamic=False)
    with fastflow.backend("eager"):
        for where in NAN_CASES:
            x, raw = nan_inputs(where, "cpu")
            gy, gl = torch.full_like(x, 0.5), torch.ones(2, dtype=torch.float64)
            *_, grad_x, grad_raw = _results(compiled, x, raw, gy, gl)
            assert_nan_gradients(grad_x, grad_raw, where)


def test_rq_spline_takes_the_closed_form_only_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager runs keep autograd through the eager twin; ``torch.compile(fullgraph=True)`` of ``rq_spline`` on the
    eager backend traces the closed-form gradients and matches the eager twin to float32 rounding."""
    traced = []
    monkeypatch.setattr(S, "rq_spline_closed_form", lambda *args: traced.append(1) or C.rq_spline_closed_form(*args))
    x, raw = make_inputs("odd", 3, torch.float32, "cpu")
    gy, gl = _randn(tuple(x.shape), torch.float32, "cpu"), _randn((x.shape[0],), torch.float32, "cpu")
    exact = _results(
        lambda x, raw: S.rq_spline_ref(x, raw, 3, BOUND), x.double(), raw.double(), gy.double(), gl.double()
    )
    with fastflow.backend("eager"):
        eager = _results(lambda x, raw: S.rq_spline(x, raw, 3, BOUND), x, raw, gy, gl)
        assert not traced
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, raw: S.rq_spline(x, raw, 3, BOUND), fullgraph=True, dynamic=False)
        got = _results(compiled, x, raw, gy, gl)
    assert traced
    for g, e, w in zip(got, eager, exact):
        assert_three_way(g, e, w, 2e-5 * max(1.0, w.abs().max().item()))


def test_empty_batch_on_the_eager_paths() -> None:
    """B = 0: the eager twin (forward, inverse, its reversible backward) and the closed form return empty
    results of the right shapes, gradients included."""
    x, raw = torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3, 8, requires_grad=True)
    for fn in (lambda x, raw: S.rq_spline_ref(x, raw, 3), lambda x, raw: C.rq_spline_closed_form(x, raw, _spline(3))):
        y, logdet = fn(x, raw)
        grad_x, grad_raw = torch.autograd.grad((y, logdet), (x, raw), (torch.ones_like(y), torch.ones_like(logdet)))
        assert y.shape == grad_x.shape == x.shape and logdet.shape == (0,) and grad_raw.shape == raw.shape
    x_back, neg_logdet = S.rq_spline_inverse_ref(x.detach(), raw.detach(), 3)
    rebuilt, grad_x, grad_raw = S.rq_spline_backward_from_output_ref(x.detach(), raw.detach(), x.detach(), None, 3)
    assert x_back.shape == rebuilt.shape == grad_x.shape == (0, 3) and neg_logdet.shape == (0,)


def test_spline_layer_compiles_with_dynamic_shapes_in_one_graph() -> None:
    """``torch.compile(dynamic=True, fullgraph=True)`` of a spline coupling on the eager backend: the constants'
    checks trace (no ``math.isfinite`` on a traced float), two batch sizes share the graph, and the results match
    the eager layer."""
    torch.manual_seed(0)
    layer = SplineCoupling(4, hidden=8, bins=3, vectors=True)
    with torch.no_grad():
        for parameter in layer.parameters():  # leave the identity start: every bin and tail in use
            parameter.add_(0.3 * torch.randn_like(parameter))
    torch._dynamo.reset()
    graphs = []

    def counted(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=counted, dynamic=True, fullgraph=True)
    with fastflow.backend("eager"):
        for batch in (5, 9):
            x = 2.0 * torch.randn(batch, 4)
            (y, logdet), (y_ref, logdet_ref) = compiled(x), layer(x)
            torch.testing.assert_close(y, y_ref)
            torch.testing.assert_close(logdet, logdet_ref)
    assert len(graphs) == 1  # the second batch size reused the first graph: no recompile
