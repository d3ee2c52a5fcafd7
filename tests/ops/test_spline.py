"""Tests for ``fastflow/ops/spline.py`` and ``kernels/spline.py``: the eager twin against brute-force Jacobians and
autograd, the fused kernels against the eager twin, and the extremes where splines usually produce NaN.

The kernels run under Triton's CPU interpreter (``"interpret"`` backend) in CI and on CUDA (``"triton"``) where
``FASTFLOW_TEST_GPU=1`` and a GPU exist. Shapes are tiny: the interpreter runs a kernel in about 0.1 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import torch

import fastflow
from fastflow.backend import triton_available
from fastflow.ops import spline as S
from fastflow.ops import spline_eager as E
from fastflow.ops._checks import logdet_dtype
from tests.helpers import brute_force_logdet

BOUND = 3.0
# float64: (atol, rtol) of the fused result against the eager result
TOL = {torch.float64: (1e-10, 1e-10)}
LOGDET_TOL = {torch.float64: (1e-10, 1e-10)}
# float32 and bfloat16 are three-way checked: |fused - float64 ref| <= 2 |eager - float64 ref| + atol (relative to
# the largest magnitude); eager's float32 cumsum accumulates in float64 on the CPU, the kernel's does not
THREE_WAY_ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, dtype=torch.float64)).to(dtype=dtype, device=device)


def make_inputs(case: str, bins: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, raw)`` in the layout named by ``case``; ``x`` spans the bound and both tails."""
    params = 3 * bins - 1
    shapes = {"odd": (3, 5, 7), "batch1": (1, 7), "toy2d": (37, 2), "1x1x1023": (1, 1, 1023)}
    if case in shapes:
        shape = shapes[case]
        return _randn(shape, dtype, device, 2.0), _randn((*shape, params), dtype, device, 1.5)
    if case == "strided":  # a column slice of x, and raw from a (B, P, D) network output: parameter stride D
        x = _randn((4, 10), dtype, device, 2.0)[:, 1::2]
        raw = _randn((4, params, 5), dtype, device, 1.5).transpose(1, 2)
        return x, raw
    if case == "transposed":  # non-batch dims that do not merge: the launcher copies
        x = _randn((3, 6, 4), dtype, device, 2.0).transpose(1, 2)
        raw = _randn((3, 4, 6, params), dtype, device, 1.5)
        return x, raw
    raise ValueError(case)


def forward(x: torch.Tensor, raw: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    return S.rq_spline(x, raw, bins, BOUND)


def inverse(y: torch.Tensor, raw: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    return S.rq_spline_inverse(y, raw, bins, BOUND)


def assert_three_way(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, atol: float) -> None:
    """Low-precision check: the fused error against the float64 result is at most twice eager's, plus atol."""
    fused_err = (fused.double() - exact.double()).abs().max().item()
    eager_err = (eager.double() - exact.double()).abs().max().item()
    assert fused_err <= 2 * eager_err + atol, f"fused error {fused_err:.3g} vs eager error {eager_err:.3g}"


def assert_matches(
    fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, tol: dict = TOL
) -> None:
    """Closeness for float64 inputs, the three-way check for float32 and bfloat16 ones (bfloat16's log-dets are
    float32 but three-way checked too)."""
    if dtype in THREE_WAY_ATOL:
        assert_three_way(fused, eager, exact, THREE_WAY_ATOL[dtype] * max(1.0, exact.abs().max().item()))
    else:
        atol, rtol = tol[eager.dtype]
        torch.testing.assert_close(fused, eager, atol=atol, rtol=rtol)


def assert_inverse_matches(
    fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, y: torch.Tensor, raw: torch.Tensor, bins: int
) -> None:
    """The inverse's results: closeness in float64; for float32 and bfloat16, the three-way check of their images
    under the float64 forward against ``y`` (backward errors: where the spline is flat its inverse amplifies the
    knots' rounding, such as the order of a cumulative sum, a thousandfold)."""
    if y.dtype not in THREE_WAY_ATOL:
        assert_matches(fused, eager, exact, y.dtype)
        return
    raw = raw.double()
    with fastflow.backend("eager"):
        images = [forward(v.double(), raw, bins)[0] for v in (fused, eager)]
    assert_matches(*images, y.double(), y.dtype)


def _double(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in ts]


# ---------------------------------------------------------------------------------------------- eager twin


@pytest.mark.parametrize("bins", [1, 3, 8])
def test_eager_logdet_matches_brute_force_jacobian(bins: int) -> None:
    x, raw = make_inputs("batch1", bins, torch.float64, "cpu")
    x = torch.cat([x, torch.tensor([[-5.0, 4.0, BOUND, -BOUND]], dtype=torch.float64)], dim=1)  # tails, ends
    x, raw = x.expand(2, -1).clone(), torch.cat([raw, raw[:, :4]], dim=1).expand(2, -1, -1).clone()
    raw[1] *= 3.0
    y, logdet = S.rq_spline_ref(x, raw, bins, BOUND)
    for i in range(2):
        expected = brute_force_logdet(lambda v, i=i: S.rq_spline_ref(v, raw[i : i + 1], bins, BOUND)[0], x[i : i + 1])
        torch.testing.assert_close(logdet[i : i + 1], expected, atol=1e-12, rtol=1e-12)
    x_back, neg_logdet = S.rq_spline_inverse_ref(y, raw, bins, BOUND)
    expected = brute_force_logdet(lambda v: S.rq_spline_inverse_ref(v, raw[:1], bins, BOUND)[0], y[:1])
    torch.testing.assert_close(neg_logdet[:1], expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(neg_logdet, -logdet, atol=1e-12, rtol=1e-12)


def test_eager_spline_is_monotone_continuous_and_identity_outside() -> None:
    """Increasing on a fine grid, through the knots ``(x_j, y_j)`` and continuous there, the identity outside."""
    bins = 5
    spline = E.Spline(bins, BOUND, 1e-3, 1e-3, 1e-3)
    raw = _randn((3 * bins - 1,), torch.float64, "cpu", 2.0)
    x_knots, y_knots = (E.sizes_and_knots(raw[i * bins : (i + 1) * bins], spline, 1e-3)[1][:-1] for i in range(2))
    grid = torch.linspace(-4.0, 4.0, 4001, dtype=torch.float64)
    x = torch.cat([grid, x_knots, x_knots - 1e-9, x_knots + 1e-9])[None]
    y, _ = S.rq_spline_ref(x, raw.expand(*x.shape, -1), bins, BOUND)
    y_grid, (y_at, y_below, y_above) = y[0, : grid.numel()], y[0, grid.numel() :].chunk(3)
    assert (y_grid.diff() > 0).all()
    torch.testing.assert_close(y_at, y_knots, atol=1e-12, rtol=1e-12)
    assert ((y_above - y_below).abs() < 1e-6).all() and (y_below < y_at).all() and (y_at < y_above).all()
    outside = x.abs() > BOUND
    assert torch.equal(y[outside], x[outside])
    tails = x[outside][None]
    _, logdet = S.rq_spline_ref(tails, raw.expand(*tails.shape, -1), bins, BOUND)
    assert torch.equal(logdet, torch.zeros_like(logdet))


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_eager_gradcheck_float64(direction: str) -> None:
    x, raw = make_inputs("odd", 3, torch.float64, "cpu")
    fn = S.rq_spline_ref if direction == "forward" else S.rq_spline_inverse_ref
    inputs = [x[:2, :2, :3].detach().requires_grad_(), raw[:2, :2, :3].detach().requires_grad_()]
    assert torch.autograd.gradcheck(lambda a, r: fn(a, r, 3, BOUND), inputs, atol=1e-8, rtol=1e-6)


def test_eager_upcast_computes_in_float32() -> None:
    x, raw = make_inputs("odd", 4, torch.bfloat16, "cpu")
    y, logdet = S.rq_spline_ref(x, raw, 4, BOUND, upcast=True)
    y32, logdet32 = S.rq_spline_ref(x.float(), raw.float(), 4, BOUND)
    assert y.dtype == torch.bfloat16 and logdet.dtype == torch.float32
    torch.testing.assert_close(y, y32.bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(logdet, logdet32, atol=0, rtol=0)


# ------------------------------------------------------------------------------------- kernels vs eager

FORWARD_CASES = [
    ("odd", 3, torch.float32),
    ("odd", 3, torch.float64),
    ("odd", 8, torch.bfloat16),
    ("batch1", 8, torch.float32),
    ("toy2d", 1, torch.float32),
    ("toy2d", 8, torch.float64),
    ("1x1x1023", 8, torch.float32),
    ("strided", 3, torch.float32),
    ("strided", 8, torch.bfloat16),
    ("transposed", 5, torch.float32),
    ("odd", 16, torch.float32),
]


@pytest.mark.parametrize(("case", "bins", "dtype"), FORWARD_CASES, ids=[f"{c}-K{k}-{d}" for c, k, d in FORWARD_CASES])
def test_forward_and_inverse_match_eager(target, case: str, bins: int, dtype: torch.dtype) -> None:
    backend, device = target
    x, raw = make_inputs(case, bins, dtype, device)
    with fastflow.backend(backend):
        y, logdet = forward(x, raw, bins)
        x_back, neg_logdet = inverse(y, raw, bins)
    with fastflow.backend("eager"):
        # the eager twin in the inputs' precision (the public eager path computes half inputs in float32)
        y_ref, logdet_ref = S.rq_spline_ref(x, raw, bins, BOUND)
        x_ref, neg_logdet_ref = S.rq_spline_inverse_ref(y, raw, bins, BOUND)
        y_exact, logdet_exact = forward(*_double(x, raw), bins)
        x_exact, neg_logdet_exact = inverse(*_double(y, raw), bins)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert logdet.shape == (x.shape[0],) and logdet.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    assert_matches(y, y_ref, y_exact, dtype)
    assert_matches(logdet, logdet_ref, logdet_exact, dtype, LOGDET_TOL)
    assert_inverse_matches(x_back, x_ref, x_exact, y, raw, bins)
    assert_matches(neg_logdet, neg_logdet_ref, neg_logdet_exact, dtype, LOGDET_TOL)
    outside = x.abs() > BOUND
    assert torch.equal(y[outside], x[outside])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_inverse_of_forward_is_identity(target, dtype: torch.dtype) -> None:
    backend, device = target
    x, raw = make_inputs("odd", 4, dtype, device)
    with fastflow.backend(backend):
        y, logdet = forward(x, raw, 4)
        x_back, neg_logdet = inverse(y, raw, 4)
    atol = 1e-12 if dtype == torch.float64 else 5e-5
    torch.testing.assert_close(x_back, x, atol=atol, rtol=atol)
    torch.testing.assert_close(neg_logdet, -logdet, atol=atol, rtol=atol)


def _round_trip_at_scale(dtype: torch.dtype, device: str, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest relative error of ``inverse(forward(x))`` and of the log-dets' sum, for one spline scaled to
    ``bound`` (the same ``u = x / bound`` and parameters at every scale)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(4, 200, generator=gen, dtype=torch.float64) * 2 - 1
    raw = torch.randn(4, 200, 3 * 8 - 1, generator=gen, dtype=torch.float64).to(dtype).to(device)
    x = (u * bound).to(dtype).to(device)
    y, logdet = S.rq_spline(x, raw, 8, bound)
    x_back, neg_logdet = S.rq_spline_inverse(y, raw, 8, bound)
    return ((x_back - x).abs().max() / bound).cpu(), (logdet + neg_logdet).abs().max().cpu()


@pytest.mark.parametrize(
    ("dtype", "bound"),
    [
        (torch.float32, 1e-20),
        (torch.float32, 1e20),
        (torch.float32, 1e30),
        (torch.float64, 1e-160),
        (torch.float64, 1e160),
    ],
    ids=str,
)
@pytest.mark.parametrize("on", ["eager", "kernels"])
def test_inverse_is_exact_at_any_accepted_bound(request, on: str, dtype: torch.dtype, bound: float) -> None:
    """The inverse's quadratic is solved in units of the bin height: at bounds near 1e20 its ``b * b`` overflowed
    float32 (NaN), near 1e-20 it underflowed (x off by the whole bound); the same spline at bound 3 is the
    reference."""
    backend, device = ("eager", "cpu") if on == "eager" else request.getfixturevalue("target")
    with fastflow.backend(backend):
        reference = _round_trip_at_scale(dtype, device, 3.0)
        error, logdet_error = _round_trip_at_scale(dtype, device, bound)
    assert error <= 10 * reference[0] + 10 * torch.finfo(dtype).eps  # 5x at 1e20 in float32: still 4e-5
    assert logdet_error <= 10 * reference[1] + 10 * torch.finfo(dtype).eps


def _grads(fn: Callable, x: torch.Tensor, raw: torch.Tensor, bins: int, gy: torch.Tensor, gl: torch.Tensor | None):
    inputs = [x.detach().requires_grad_(), raw.detach().requires_grad_()]
    out, logdet = fn(*inputs, bins)
    outputs, grads = ((out,), (gy,)) if gl is None else ((out, logdet), (gy, gl))
    return list(torch.autograd.grad(outputs, inputs, grads))


BACKWARD_CASES = [
    ("odd", 3, torch.float32),
    ("strided", 8, torch.float64),
    ("toy2d", 8, torch.bfloat16),
    ("batch1", 1, torch.float32),
    ("transposed", 4, torch.float64),
]


@pytest.mark.parametrize("fn", [forward, inverse], ids=["forward", "inverse"])
@pytest.mark.parametrize(("case", "bins", "dtype"), BACKWARD_CASES, ids=[f"{c}-K{k}-{d}" for c, k, d in BACKWARD_CASES])
def test_backward_matches_eager_autograd(target, fn, case: str, bins: int, dtype: torch.dtype) -> None:
    """The fused backward's gradients to the input and to every raw parameter, against autograd of the twin."""
    backend, device = target
    x, raw = make_inputs(case, bins, dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, device)
    with fastflow.backend(backend):
        fused = _grads(fn, x, raw, bins, gy, gl)
    with fastflow.backend("eager"):
        eager = _grads(fn, x, raw, bins, gy, gl)
        exact = _grads(fn, *_double(x, raw), bins, gy.double(), gl.double())
    for f, e, ex in zip(fused, eager, exact):
        assert f.dtype == dtype and f.shape == e.shape
        assert_matches(f, e, ex, dtype)


def test_backward_of_one_output_alone(target) -> None:
    """Only ``y`` or only the log-det in the loss: the other upstream gradient arrives as None."""
    backend, device = target
    x, raw = make_inputs("odd", 3, torch.float64, device)
    for fn in (forward, inverse):
        for pick in (0, 1):
            found = {}
            for name in (backend, "eager"):
                inputs = [x.detach().requires_grad_(), raw.detach().requires_grad_()]
                with fastflow.backend(name):
                    out = fn(*inputs, 3)[pick]
                found[name] = torch.autograd.grad(out.sum(), inputs, allow_unused=True, materialize_grads=True)
            for f, e in zip(found[backend], found["eager"]):
                torch.testing.assert_close(f, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_kernel_gradcheck_float64(target, direction: str) -> None:
    backend, device = target
    x, raw = make_inputs("odd", 3, torch.float64, device)
    fn = forward if direction == "forward" else inverse
    inputs = [x[:2, :1, :2].detach().requires_grad_(), raw[:2, :1, :2].detach().requires_grad_()]
    with fastflow.backend(backend):
        assert torch.autograd.gradcheck(lambda a, r: fn(a, r, 3), inputs, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(
    ("case", "bins", "dtype"),
    [("odd", 3, torch.float32), ("strided", 8, torch.float64), ("toy2d", 4, torch.bfloat16)],
    ids=str,
)
def test_backward_from_output(target, case: str, bins: int, dtype: torch.dtype) -> None:
    """Fused reversible backward against its eager twin, and the twin against autograd of the forward."""
    backend, device = target
    x, raw = make_inputs(case, bins, dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, device)
    with fastflow.backend("eager"):
        y, _ = forward(x, raw, bins)
        eager = S.rq_spline_backward_from_output(y, raw, gy, gl, bins, BOUND)
        exact = S.rq_spline_backward_from_output_ref(*_double(y, raw, gy), gl.double(), bins, BOUND)
        autograd = _grads(forward, exact[0], raw.double(), bins, gy.double(), gl.double())
    with fastflow.backend(backend):
        fused = S.rq_spline_backward_from_output(y, raw, gy, gl, bins, BOUND)
    assert [f.shape for f in fused] == [x.shape, x.shape, raw.shape]
    for f, e, ex in zip(fused, eager, exact):
        assert f.dtype == dtype
        assert_matches(f, e, ex, dtype)
    for e, a in zip(exact[1:], autograd):
        torch.testing.assert_close(e, a, atol=1e-12, rtol=1e-12)
    with fastflow.backend(backend):
        no_logdet = S.rq_spline_backward_from_output(y, raw, gy, None, bins, BOUND)
        zero_logdet = S.rq_spline_backward_from_output(y, raw, gy, torch.zeros_like(gl), bins, BOUND)
    for a, b in zip(no_logdet, zero_logdet):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_forward_writes_every_slot_of_uninitialised_buffers(target, monkeypatch) -> None:
    """The log-det partial sums live in ``torch.empty`` buffers, never zero-filled: with every new buffer
    pre-filled with NaN (ragged last tiles in samples and in elements included) the results are unchanged."""
    backend, device = target
    empty = torch.empty

    def nan_empty(*args, **kwargs) -> torch.Tensor:
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    for shape in ((5, 3), (3, 300), (37, 1)):
        x, raw = _randn(shape, torch.float32, device, 2.0), _randn((*shape, 8), torch.float32, device)
        with fastflow.backend("eager"):
            expected = forward(x, raw, 3), inverse(x, raw, 3)
        with monkeypatch.context() as patch, fastflow.backend(backend):
            patch.setattr(torch, "empty", nan_empty)
            found = forward(x, raw, 3), inverse(x, raw, 3)
        for got, want in zip(found, expected):
            torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


def test_empty_batch(target) -> None:
    backend, device = target
    x, raw = torch.zeros(0, 3, device=device), torch.zeros(0, 3, 8, device=device)
    with fastflow.backend(backend):
        y, logdet = forward(x, raw, 3)
        x_back, grad_x, grad_raw = S.rq_spline_backward_from_output(y, raw, y, None, 3)
    assert y.shape == x_back.shape == grad_x.shape == x.shape and logdet.shape == (0,) and grad_raw.shape == raw.shape


def test_parameter_offsets_past_2_31_elements_do_not_wrap(target) -> None:
    """Raw parameters at stride ``2^28`` (a permuted network output of ``2^28`` elements per parameter), 4 bins: the
    derivatives lie ``2K * 2^28 = 2^31`` elements on, an offset the kernels computed in int32 and wrapped to
    ``-2^31``. The view starts ``2^31`` elements into a lazily committed storage, so the wrapped read stayed inside
    it (zeros there): the log-det was -38.94 against eager's -39.09."""
    backend, device = target
    bins, stride, n = 4, 2**28, 16
    params, start = 3 * bins - 1, 2**31
    try:  # about 10 GB of address space, a few pages written
        storage = torch.empty(start + (params - 1) * stride + n, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError):
        pytest.skip("needs 10 GB of address space")
    raw = storage.as_strided((1, n, params), (params * stride, 1, stride), start)
    raw.copy_(torch.randn(1, n, params, generator=torch.Generator().manual_seed(0)).mul(2).to(raw))
    x = torch.linspace(-2.5, 2.5, n, dtype=torch.bfloat16, device=device).reshape(1, n)
    with fastflow.backend(backend):
        got = forward(x, raw, bins)
    want = forward(x.float(), raw.float(), bins)
    torch.testing.assert_close(got[1], want[1], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got[0].float(), want[0], atol=2e-2, rtol=0)


@pytest.mark.parametrize("where", ["x", "width", "height", "derivative"])
def test_nan_passes_to_the_output_and_the_logdet_on_every_backend(target, where: str) -> None:
    """A NaN input element, or a NaN raw parameter its bin uses (every width and height enter the softmaxes; a
    derivative only its knot's bins), gives a NaN output and a NaN log-det for its sample, forward and inverse,
    on the kernels as on the eager twin (a clamp that dropped NaN gave finite output)."""
    backend, device = target
    bins = 4
    x = torch.tensor([[-2.0, -1.0, 2.0], [0.1, 0.2, 0.3]], device=device)  # x[0, 0] in the bin of knot 1
    raw = torch.zeros(2, 3, 3 * bins - 1, device=device)
    if where == "x":
        x[0, 0] = float("nan")
    else:
        raw[0, 0, {"width": 0, "height": bins, "derivative": 2 * bins}[where]] = float("nan")
    for name in (backend, "eager"):
        with fastflow.backend(name):
            for fn in (S.rq_spline, S.rq_spline_inverse):
                out, logdet = fn(x, raw, bins)
                assert bool(out[0, 0].isnan()) and bool(logdet[0].isnan()), (name, fn.__name__)
                assert bool(out[1].isfinite().all()) and bool(logdet[1].isfinite()), (name, fn.__name__)


@pytest.mark.parametrize("where", ["width", "derivative of another bin"])
def test_a_nan_raw_parameter_the_element_does_not_read_still_gives_a_nan_logdet(target, where: str) -> None:
    """A NaN in an element's raw parameters that its value does not read (any, outside the bound; a derivative of
    another bin's knot) gives a NaN log-det for its sample on every backend: a NaN conditioner output never
    becomes a finite log-likelihood (its gradients were NaN, so one optimizer step wrote NaN into every weight)."""
    backend, device = target
    bins = 4
    x = torch.tensor([[5.0, -2.5, 0.0], [0.1, 0.2, 0.3]], device=device)  # x[0, 0] outside the bound, x[0, 1] in bin 0
    raw = torch.zeros(2, 3, 3 * bins - 1, device=device)
    element, index = ((0, 0), 0) if where == "width" else ((0, 1), 3 * bins - 2)  # the last interior knot
    raw[0, element[1], index] = float("nan")
    for name in (backend, "eager"):
        with fastflow.backend(name):
            for fn in (S.rq_spline, S.rq_spline_inverse):
                _, logdet = fn(x, raw, bins)
                assert bool(logdet[0].isnan()) and bool(logdet[1].isfinite()), (name, fn.__name__)


NAN_CASES = ["x", "width", "height", "derivative", "derivative of another bin", "width, outside the bound"]


def nan_inputs(where: str, device: str, bins: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, raw)`` (float64, identity raw parameters) with a NaN at element ``[0, 0]``: the input, or a raw
    parameter it reads (a width, a height, the derivative at its bin's right knot) or does not read (another
    bin's derivative; a width, with ``x[0, 0]`` outside the bound)."""
    x = torch.tensor([[-2.0, -1.0, 2.0], [0.1, 0.2, 0.3]], dtype=torch.float64, device=device)  # x[0, 0] in bin 0
    raw = torch.zeros(2, 3, 3 * bins - 1, dtype=torch.float64, device=device)
    index = {"width": 0, "height": bins, "derivative": 2 * bins, "derivative of another bin": 3 * bins - 2}
    if where == "x":
        x[0, 0] = float("nan")
    else:
        raw[0, 0, index.get(where, 0)] = float("nan")
    if where.endswith("outside the bound"):
        x[0, 0] = 5.0
    return x, raw


def assert_nan_gradients(grad_x: torch.Tensor, grad_raw: torch.Tensor, label: object) -> None:
    """NaN gradients for element ``[0, 0]``'s input and every one of its raw parameters, finite ones elsewhere."""
    assert bool(grad_x[0, 0].isnan()) and bool(grad_raw[0, 0].isnan().all()), label
    others = torch.ones_like(grad_x, dtype=torch.bool)
    others[0, 0] = False
    assert bool(grad_x[others].isfinite().all()) and bool(grad_raw[others].isfinite().all()), label


def nan_gradients(backend: str, x: torch.Tensor, raw: torch.Tensor, bins: int = 4) -> Iterator:
    """``(label, grad_x, grad_raw)`` on ``backend``: forward and inverse with the log-det in the loss and without,
    and the reversible backward from ``x`` taken as an output, with and without a log-det gradient."""
    gy, gl = torch.full_like(x, 0.5), torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    with fastflow.backend(backend):
        for fn in (forward, inverse):
            for upstream in (gl, None):
                yield (backend, fn.__name__, upstream is None), *_grads(fn, x, raw, bins, gy, upstream)
        for upstream in (gl, None):
            _, grad_x, grad_raw = S.rq_spline_backward_from_output(x, raw, gy, upstream, bins, BOUND)
            yield (backend, "rebuild", upstream is None), grad_x, grad_raw


@pytest.mark.parametrize("where", NAN_CASES)
def test_nan_gives_nan_gradients_to_its_element_on_the_eager_twin(where: str) -> None:
    """Where an element's input or any of its raw parameters is NaN (its log-det is NaN), autograd of the eager
    twin gives NaN gradients to that input and to all its raw parameters, whether or not the element reads the
    NaN and whether or not the loss has the log-det (the identity tails passed a NaN input a finite gradient,
    and parameters an element does not read got 0); the other elements' gradients stay finite."""
    for label, grad_x, grad_raw in nan_gradients("eager", *nan_inputs(where, "cpu")):
        assert_nan_gradients(grad_x, grad_raw, label)


@pytest.mark.parametrize("where", NAN_CASES)
def test_nan_gives_nan_gradients_to_its_element_on_the_kernels(target, where: str) -> None:
    """The fused backwards (forward, inverse, reversible) give the eager twin's NaN gradients
    (:func:`test_nan_gives_nan_gradients_to_its_element_on_the_eager_twin`), in float64 and float32: they used
    to zero the spline's upstream at a NaN input, which sent back finite gradients."""
    backend, device = target
    x, raw = nan_inputs(where, device)
    for dtype in (torch.float64, torch.float32):
        for label, grad_x, grad_raw in nan_gradients(backend, x.to(dtype), raw.to(dtype)):
            assert grad_x.dtype == grad_raw.dtype == dtype
            assert_nan_gradients(grad_x, grad_raw, (*label, dtype))


# ------------------------------------------------------------------------------------------- extremes


def _extreme_inputs(dtype: torch.dtype, device: str, bins: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Six samples of raw parameters (random; one huge width, so tiny bins; one huge height; huge and tiny
    knot derivatives; everything +-1e4), each at ten points: both far tails (+-1e6), both ends of the bound,
    a point just inside it, zero, and three knots of the sample's own spline, as the eager twin computes them in
    ``dtype``."""
    params = 3 * bins - 1
    big = 1e4
    raw = _randn((6, params), torch.float64, "cpu")
    raw[1, :bins] = torch.tensor([big, -big, -big, -big])
    raw[2, bins : 2 * bins] = torch.tensor([-big, -big, big, -big])
    raw[3, 2 * bins :] = big
    raw[4, 2 * bins :] = -big
    raw[5] = big * torch.tensor([(-1.0) ** i for i in range(params)])
    raw = raw.to(dtype)
    knots = E.sizes_and_knots(raw[:, :bins], E.Spline(bins, BOUND, 1e-3, 1e-3, 1e-3), 1e-3)[1][:, :-1]
    inner = torch.tensor([-1e6, 1e6, -BOUND, BOUND, 0.0, 0.5, -1.0], dtype=dtype)
    x = torch.cat([inner.expand(6, -1), knots], dim=1)
    raw = raw[:, None, :].expand(-1, x.shape[1], -1).contiguous()
    return x.to(device), raw.to(device)


EXTREME_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extremes_are_finite_and_exact(target, dtype: torch.dtype) -> None:
    """No NaN or Inf anywhere, on the kernels and on eager: outputs, log-dets, the inverse at the bound and every
    gradient. The round trip, the inverse at the bound and the forward off the knots match float64 to the
    dtype's rounding (relative to the largest magnitude). The log-dets, the gradients and the forward at the
    knots, which these splines make ill-conditioned (slopes of 1e-3 next to 1e4: the log-det's own slope
    reaches 1e5; a knot an ulp away moves ``y`` by 1e4 ulps), are three-way checked against float64; at the
    knots only the gradients of ``y``, as the log-det's gradients jump there between the two bins (and the bin
    an ulp decides differs between float32 and float64 knots)."""
    backend, device = target
    x, raw = _extreme_inputs(dtype, device)
    tol = EXTREME_TOL[dtype]
    ends = torch.tensor([[-BOUND, BOUND]], dtype=dtype, device=device).expand(6, -1)
    gy = _randn(x.shape, dtype, device)
    gl = torch.ones(6, dtype=logdet_dtype(dtype), device=device)

    def run(name: str, x: torch.Tensor, raw: torch.Tensor, cols: slice) -> dict[str, list[torch.Tensor]]:
        """Results on columns ``cols``: ``direct`` ones (the round trip, the inverse at the bound; the forward
        off the knots) and ``ill`` ones; on the knots (``cols`` from -3) without the log-det's gradients."""
        knots = cols.start == -3
        x, raw, g = x[:, cols], raw[:, cols], gy[:, cols].to(x.dtype)
        with fastflow.backend(name):
            y, logdet = forward(x, raw, 4)
            x_back, neg_logdet = inverse(y, raw, 4)
            at_ends, zero = inverse(ends.to(x.dtype), raw[:, :2], 4)
            g_logdet = None if knots else gl.to(logdet.dtype)
            grads = [t for fn, v in ((forward, x), (inverse, y)) for t in _grads(fn, v, raw, 4, g, g_logdet)]
        ill = [y] if knots else [logdet, neg_logdet, zero]
        return {"direct": [x_back, at_ends, *([] if knots else [y])], "ill": [*ill, *grads], "y": [y]}

    for cols in (slice(0, -3), slice(-3, None)):
        exact = run("eager", *_double(x, raw), cols)
        found = {name: run(name, x, raw, cols) for name in ("eager", backend)}
        for name, results in found.items():
            assert all(torch.isfinite(t).all() for key in ("direct", "ill") for t in results[key]), (name, cols)
            for got, want in zip(results["direct"], [x[:, cols].double(), ends.double(), *exact["y"]]):
                scale = max(1.0, want.abs().max().item())
                torch.testing.assert_close(got.double(), want, atol=tol * scale, rtol=tol)
        for fused, eager, want in zip(found[backend]["ill"], found["eager"]["ill"], exact["ill"]):
            assert_three_way(fused, eager, want, tol * max(1.0, want.abs().max().item()))
        outside = x[:, cols].abs() > BOUND
        (y,), (grad_x, grad_raw) = found[backend]["y"], found[backend]["ill"][-4:-2]
        assert torch.equal(y[outside], x[:, cols][outside]) and torch.equal(grad_x[outside], gy[:, cols][outside])
        assert not grad_raw[outside].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bound_maps_to_itself_exactly(target, dtype: torch.dtype) -> None:
    """Positions are measured from the nearer knot: ``+-bound`` map to themselves both ways with log-det 0,
    bit for bit, on the extreme splines too."""
    backend, device = target
    _, raw = _extreme_inputs(dtype, device)
    ends = torch.tensor([[-BOUND, BOUND]], dtype=dtype, device=device).expand(6, -1)
    for name in ("eager", backend):
        with fastflow.backend(name):
            for fn in (forward, inverse):
                out, logdet = fn(ends, raw[:, :2], 4)
                assert torch.equal(out, ends) and torch.equal(logdet, torch.zeros_like(logdet)), (name, fn)


# --------------------------------------------------------------------------------- registration, checks


@pytest.fixture(scope="module")
def fallback_ops() -> S._SplineOps:
    """The ``custom_op`` registration (torch < 2.6, the interpreter) under a namespace of its own."""
    return S._define_ops("fastflow_spline_fallback_test", traceable=False)


def test_fallback_registration_fake_kernels_match_the_real_outputs(target, fallback_ops) -> None:
    """Schemas as the package's ops; fake kernels give the real shapes, strides and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("rq_spline_fwd", "rq_spline_inv", "rq_spline_bwd"):
        package = str(getattr(torch.ops.fastflow, name).default._schema)
        fallback = str(getattr(torch.ops.fastflow_spline_fallback_test, name).default._schema)
        assert fallback.replace("fastflow_spline_fallback_test::", "fastflow::") == package
    _, device = target
    x, raw = make_inputs("strided", 3, torch.float32, device)
    constants = (BOUND, 1e-3, 1e-3, 1e-3)
    y, logdet = fallback_ops.fwd(x, raw, *constants)
    real = [y, logdet, *fallback_ops.bwd(y, raw, y, logdet, *constants, "rebuild")]
    with FakeTensorMode() as mode:
        fx, fraw, flogdet = mode.from_tensor(x), mode.from_tensor(raw), mode.from_tensor(logdet)
        fakes = [
            *fallback_ops.inv(fx, fraw, *constants),
            *fallback_ops.bwd(fx, fraw, fx, flogdet, *constants, "rebuild"),
        ]
    for fake, want in zip(fakes, real):
        assert (fake.shape, fake.stride(), fake.dtype) == (want.shape, want.stride(), want.dtype)


def test_direct_twins_match_the_library_ops(target) -> None:
    """The autograd.Functions that eager calls take give the library ops' values and gradients, bitwise."""
    _, device = target
    x, raw = make_inputs("strided", 3, torch.float32, device)
    constants = (BOUND, 1e-3, 1e-3, 1e-3)
    results = []
    for ops in (S._OPS, S._DIRECT):
        u, r = x.detach().requires_grad_(), raw.detach().requires_grad_()
        y, logdet = ops.fwd(u, r, *constants)
        back, neg_logdet = ops.inv(y, r, *constants)
        grads = torch.autograd.grad((back.square().sum() + logdet.sum() + neg_logdet.sum()), (u, r))
        results.append([y, logdet, back, *grads, *ops.bwd(y.detach(), raw, x, None, *constants, "rebuild")])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


TRITON_OP_CHECK = """
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.fake_tensor import FakeTensorMode

from fastflow.kernels import spline as K
from fastflow.ops import spline as S

traced = S._define_ops("fastflow_spline_traced", traceable=True)  # what a CUDA build registers as fastflow::
fallback = S._define_ops("fastflow_spline_opaque", traceable=False)
for name, kernel in (("fwd", K.rq_spline_fwd_kernel), ("inv", K.rq_spline_fwd_kernel), ("bwd", K.rq_spline_bwd_kernel)):
    assert get_triton_kernels_for_op(f"fastflow_spline_traced::rq_spline_{name}") == [kernel], name
    namespaces = (torch.ops.fastflow_spline_traced, torch.ops.fastflow_spline_opaque)
    schemas = [str(getattr(ns, f"rq_spline_{name}").default._schema).split("::")[1] for ns in namespaces]
    assert schemas[0] == schemas[1], schemas


def kernels_in(graph):
    launches = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    return [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn for n in launches]


# each op traced alone: without a GPU torch cannot tell which pointers a kernel writes and takes them all, and
# AOTAutograd's partitioner then trips over two launches that "write" the same input
for name in ("fwd", "inv"):
    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    def run(x, raw):
        y, logdet = getattr(traced, name)(x, raw, 3.0, 1e-3, 1e-3, 1e-3)
        return y * 2.0, logdet

    with FakeTensorMode():
        x, raw = torch.randn(3, 5).requires_grad_(), torch.randn(3, 5, 8).requires_grad_()
        outputs = aot_function(run, fw_compiler=keep, bw_compiler=keep)(x, raw)
        torch.autograd.grad([o.sum() for o in outputs], (x, raw))
        # fake kernels: the triton op's own code vs the fallback's
        direct = [getattr(ops, name)(x, raw, 3.0, 1e-3, 1e-3, 1e-3) for ops in (traced, fallback)]
        rebuilt = [ops.bwd(x, raw, x, None, 3.0, 1e-3, 1e-3, 1e-3, "rebuild") for ops in (traced, fallback)]
    for a, b in zip((*direct[0], *rebuilt[0]), (*direct[1], *rebuilt[1])):
        assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
    assert [kernels_in(g) for g in graphs] == [[K.rq_spline_fwd_kernel], [K.rq_spline_bwd_kernel]], name
    assert all("fastflow_spline_traced" not in g.code for g in graphs)
print("traced")
"""


@pytest.mark.skipif(
    not (triton_available() and hasattr(torch.library, "triton_op")), reason="needs triton and torch >= 2.6"
)
def test_triton_op_registration_is_traced_into_kernel_launches() -> None:
    """Where Triton compiles (a fresh interpreter with TRITON_INTERPRET=0, no GPU needed) the ops register as
    triton ops with the fallback's schemas: torch finds their kernels, AOTAutograd traces forward and backward
    into the kernel launches (no opaque op left), and the fake outputs match the fallback's."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", TRITON_OP_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "traced" in proc.stdout, proc.stderr[-4000:]


def test_torch_compile_traces_without_graph_breaks(target) -> None:
    torch._dynamo.reset()

    def loss(x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        y, logdet = S.rq_spline(x, raw, 3)
        x2, neg_logdet = S.rq_spline_inverse(0.5 * y, raw, 3)
        return (x2 * x2).sum() + logdet.sum() + neg_logdet.sum()

    backend, device = target
    x, raw = make_inputs("toy2d", 3, torch.float32, device)
    inputs = [x.requires_grad_(), raw.requires_grad_()]
    with fastflow.backend(backend):
        explanation = torch._dynamo.explain(loss)(*inputs)
        out = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs)
        grads = torch.autograd.grad(out, inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    with fastflow.backend("eager"):
        out_ref = loss(*inputs)
        grads_ref = torch.autograd.grad(out_ref, inputs)
    torch.testing.assert_close(out, out_ref, atol=1e-3, rtol=1e-5)
    for g, rg in zip(grads, grads_ref):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


def _assert_bad_inputs_raise(device: str) -> None:
    x, raw = make_inputs("odd", 3, torch.float32, device)
    with pytest.raises(ValueError, match="raw must have shape x.shape"):
        S.rq_spline(x, raw[..., :7], 3)
    with pytest.raises(ValueError, match="raw must have shape y.shape"):
        S.rq_spline_inverse(x, raw[:1], 3)
    with pytest.raises(TypeError, match="raw must have the dtype of x"):
        S.rq_spline(x, raw.double(), 3)
    with pytest.raises(TypeError, match="x must be float16"):
        S.rq_spline(x.int(), raw, 3)
    with pytest.raises(ValueError, match="x must have at least 2"):
        S.rq_spline(x[0, 0], raw[0, 0], 3)
    with pytest.raises(TypeError, match="bins must be an int"):
        S.rq_spline(x, raw, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bins must be >= 1"):
        S.rq_spline(x, raw, 0)
    with pytest.raises(ValueError, match="bound must be finite and > 0"):
        S.rq_spline(x, raw, 3, bound=-1.0)
    with pytest.raises(ValueError, match="min_derivative must be finite and > 0"):
        S.rq_spline(x, raw, 3, min_derivative=0.0)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bound must be finite and > 0"):
            S.rq_spline(x, raw, 3, bound=value)
    with pytest.raises(ValueError, match="min_width \\* bins must be <= 1"):
        S.rq_spline(x, raw, 3, min_width=0.5)
    with pytest.raises(TypeError, match="min_height must be a float"):
        S.rq_spline_inverse(x, raw, 3, min_height="0.1")  # type: ignore[arg-type]
    # 2 * bound overflowed float32 (NaN out, or an overflow error on eager); a bin below float32's resolution at the
    # bound had zero width and sent x = -bound into the next bin (y far from -bound)
    with pytest.raises(ValueError, match="bound must be <= 8.51e\\+37"):
        S.rq_spline(x, raw, 3, bound=2e38)
    with pytest.raises(ValueError, match="min_width must be >= 2.38e-07 in torch.float32"):
        S.rq_spline(x, raw, 3, min_width=1e-9)
    with pytest.raises(ValueError, match="min_height must be >= 2.38e-07"):
        S.rq_spline_inverse(x.half(), raw.half(), 3, min_height=1e-8)
    edge = torch.full((1, 2), -3.0, dtype=torch.float64, device=device)  # float64 resolves such bins
    raw64 = torch.zeros(1, 2, 8, dtype=torch.float64, device=device)
    raw64[..., 0] = -20.0
    assert torch.equal(S.rq_spline(edge, raw64, 3, min_width=1e-9)[0], edge)
    with pytest.raises(ValueError, match="grad_y must have the shape of y"):
        S.rq_spline_backward_from_output(x, raw, x[:1], None, 3)
    with pytest.raises(ValueError, match="grad_logdet must have shape"):
        S.rq_spline_backward_from_output(x, raw, x, torch.zeros(5, device=device), 3)


def test_bad_inputs_raise_on_eager() -> None:
    with fastflow.backend("eager"):
        _assert_bad_inputs_raise("cpu")


def test_bad_inputs_raise_on_kernel_backend(target) -> None:
    backend, device = target
    with fastflow.backend(backend):
        _assert_bad_inputs_raise(device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_the_eager_backend_computes_in_float32(dtype: torch.dtype) -> None:
    """float16 / bfloat16 inputs on the eager backend are computed in float32, as the kernels do in their registers:
    the outputs are the float32 ones rounded once, monotone, and the log-det is float32's. Computed in half, the
    knot sums and the rational function erred by 10-14 ulps, the float16 map was not monotone and the log-det of
    4,000 points was off by 6 to 30."""
    torch.manual_seed(0)
    x = torch.linspace(-3.2, 3.2, 4000)[None].to(dtype)
    raw = torch.randn(1, 1, 23).expand(1, 4000, 23).to(dtype)
    with fastflow.backend("eager"):
        y, logdet = S.rq_spline(x, raw, 8)
        x_back, _ = S.rq_spline_inverse(y, raw, 8)
    y32, logdet32 = S.rq_spline(x.float(), raw.float(), 8)
    torch.testing.assert_close(y, y32.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(logdet, logdet32)
    assert bool((y.float().diff() >= 0).all())
    with fastflow.backend("eager"):
        x_back32, _ = S.rq_spline_inverse(y.float(), raw.float(), 8)
    torch.testing.assert_close(x_back, x_back32.to(dtype), atol=0, rtol=0)


def test_more_bins_than_the_kernels_take_run_the_eager_twin(target, monkeypatch) -> None:
    """Past :data:`KERNEL_MAX_BINS` (the widest tile compiled without spilling) the op runs eagerly on a kernel
    backend instead of spilling or failing deep in Triton; below it the kernels run."""
    backend, device = target
    monkeypatch.setattr(S, "KERNEL_MAX_BINS", 4)  # the real limit (32 bins) is slow on the interpreter
    launched = []
    ops = S._ops()
    monkeypatch.setattr(S, "_ops", lambda: launched.append(1) or ops)
    x = torch.randn(2, 3, device=device)
    for bins, kernels in ((4, 1), (5, 0)):
        launched.clear()
        raw = torch.randn(2, 3, 3 * bins - 1, device=device)
        with fastflow.backend(backend):
            got = S.rq_spline(x, raw, bins)
        with fastflow.backend("eager"):
            want = S.rq_spline(x, raw, bins)
        assert len(launched) == kernels
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_inverse_stays_finite_where_the_quadratic_cancels(target) -> None:
    """A flat bin between steep knots (raw derivatives ~1e4-1e5): both quadratic coefficients cancel to rounding
    in float32, and the stable root divided by zero (eager: NaN; kernel: the far knot). The linearised root keeps
    the result finite on every backend, the same on both."""
    backend, device = target
    raw = torch.tensor([-1e4, 1e4, -1e4, 1e4, -1e4, 1e4, 1e5, 1e5], device=device).view(1, 1, 8)
    raw2 = torch.tensor([-1e4, 1e4, -1e4, 1e4, -1e4, 1e4, 1e4, 1e4], device=device).view(1, 1, 8)
    cases = [
        (torch.tensor([[-2.594852617221477e-07]], device=device), raw, (3,)),
        (torch.tensor([[-3.016501537445038e-08]], device=device), raw2, (3, 3.0, 1e-3, 3e-4, 1e-3)),
    ]
    for y, r, args in cases:
        results = {}
        for name in ("eager", backend):
            with fastflow.backend(name):
                results[name] = S.rq_spline_inverse(y, r, *args)
                rebuilt, grad_x, grad_raw = S.rq_spline_backward_from_output(y, r, torch.ones_like(y), None, *args)
            assert all(torch.isfinite(t).all() for t in (*results[name], rebuilt, grad_x, grad_raw)), name
        for got, want in zip(results[backend], results["eager"]):
            torch.testing.assert_close(got, want)
