"""Tests for ``fastflow/ops/coupling.py`` and ``kernels/coupling.py``: fused kernels against the eager twins.

The kernels run under Triton's CPU interpreter (``"interpret"`` backend) in CI and on CUDA (``"triton"``)
where ``FASTFLOW_TEST_GPU=1`` and a GPU exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow
from fastflow.backend import interpreter_enabled, triton_available
from fastflow.ops import coupling as C

KINDS = ("sigmoid", "exp", "sigmoid2", "additive")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# float32/float64: (atol, rtol) of the fused result against the eager result in the same dtype
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)}
# float16/bfloat16 are three-way checked: |fused - float32 ref| <= 2 |eager - float32 ref| + atol
THREE_WAY_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Triton's interpreter truncates float32 -> bfloat16 where GPUs round to nearest even: allow one more ulp
INTERPRETER_BF16_ULPS = 1.0 if interpreter_enabled() else 0.0
LOGDET_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def forward(kind: str, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "additive":
        return C.additive_coupling(x, t)
    return C.affine_coupling(x, t, r, kind)  # type: ignore[arg-type]


def inverse(kind: str, y: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "additive":
        return C.additive_coupling_inverse(y, t)
    return C.affine_coupling_inverse(y, t, r, kind)  # type: ignore[arg-type]


def from_output(kind: str, y, t, r, gy, gl) -> tuple[torch.Tensor, ...]:
    """Reversible backward ``(x, gx, gt[, gr])`` on the current backend."""
    if kind == "additive":
        return C.additive_coupling_backward_from_output(y, t, gy)
    return C.affine_coupling_backward_from_output(y, t, r, gy, gl, kind)  # type: ignore[arg-type]


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, dtype=torch.float64)).to(dtype=dtype, device=device)


def make_inputs(case: str, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_b, shift, raw)`` in the layout named by ``case``; raw spans the saturating range of sigmoid."""
    shapes = {"odd": (3, 5, 7, 9), "batch1": (1, 5, 7, 9), "1x1x1023": (1, 1, 1023), "toy2d": (37, 1)}
    if case in shapes:
        shape = shapes[case]
        return _randn(shape, dtype, device), _randn(shape, dtype, device), _randn(shape, dtype, device, 3.0)
    if case in ("channel_slice", "channels_last"):
        h, net = _randn((3, 10, 7, 9), dtype, device), _randn((3, 10, 7, 9), dtype, device, 3.0)
        if case == "channels_last":
            h, net = h.to(memory_format=torch.channels_last), net.to(memory_format=torch.channels_last)
            return h[:, 5:], net[:, :5], net[:, 5:]
        return h[:, 5:], net[:, 0::2], net[:, 1::2]
    if case == "transposed":
        base = [_randn((3, 5, 9, 7), dtype, device, s) for s in (1.0, 1.0, 3.0)]
        return base[0].transpose(2, 3), base[1].transpose(2, 3), base[2].transpose(2, 3).contiguous()
    if case == "mixed_5d":  # no dim merges across inputs: four runs, so the launcher copies
        x = _randn((2, 3, 4, 5, 2), dtype, device)
        t = _randn((2, 2, 5, 4, 3), dtype, device).permute(0, 4, 3, 2, 1)
        r = _randn((2, 4, 3, 2, 5), dtype, device, 3.0).permute(0, 2, 1, 4, 3)
        return x, t, r
    raise ValueError(case)


def make_split_inputs(
    case: str, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(x, shift, raw, b_start)`` for a channel split: ``x`` whole, ``shift``/``raw`` the halves of a network
    output, transformed channels ``[b_start, b_start + shift.shape[1])``; layouts named by ``case``."""
    cl = torch.channels_last
    if case in ("split_nchw", "split_parity1", "split_batch1", "split_channels_last", "split_mixed"):
        batch = 1 if case == "split_batch1" else 3
        x, net = _randn((batch, 5, 7, 9), dtype, device), _randn((batch, 6, 7, 9), dtype, device, 3.0)
        if case == "split_channels_last":
            x, net = x.to(memory_format=cl), net.to(memory_format=cl)
        if case == "split_mixed":
            net = net.to(memory_format=cl)
        return x, net[:, :3], net[:, 3:], 0 if case == "split_parity1" else 2
    if case == "split_vectors":  # (B, D): the features are the channels
        x, net = _randn((37, 5), dtype, device), _randn((37, 4), dtype, device, 3.0)
        return x, net[:, 0::2], net[:, 1::2], 3
    if case == "split_cropped":  # spatial crops, whose rows and columns do not merge: three runs
        x, net = _randn((2, 5, 9, 11), dtype, device), _randn((2, 6, 9, 11), dtype, device, 3.0)
        x, net = x[:, :, 1:8, 2:10], net[:, :, 2:9, 1:9]
        return x, net[:, :3], net[:, 3:], 1
    if case == "split_copied":  # four runs: the launcher copies, each tensor in its own shape
        x = _randn((2, 4, 3, 5, 2), dtype, device)
        t = _randn((2, 2, 5, 3, 2), dtype, device).transpose(2, 3)
        r = _randn((2, 2, 3, 2, 5), dtype, device, 3.0).transpose(3, 4)
        return x, t, r, 1
    raise ValueError(case)


def split_forward(kind: str, x, t, r, b_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "additive":
        return C.additive_coupling(x, t, b_start)
    return C.affine_coupling(x, t, r, kind, b_start)  # type: ignore[arg-type]


def split_inverse(kind: str, y, t, r, b_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "additive":
        return C.additive_coupling_inverse(y, t, b_start)
    return C.affine_coupling_inverse(y, t, r, kind, b_start)  # type: ignore[arg-type]


def assert_three_way(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, atol: float) -> None:
    """Low-precision check: the fused error against the float32 result is at most twice eager's, plus atol."""
    fused_err = (fused.double() - exact.double()).abs().max().item()
    eager_err = (eager.double() - exact.double()).abs().max().item()
    assert fused_err <= 2 * eager_err + atol, f"fused error {fused_err:.3g} vs eager error {eager_err:.3g}"


def assert_matches(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor) -> None:
    """Per-dtype closeness for float32/float64, the three-way check for float16/bfloat16."""
    if eager.dtype in THREE_WAY_ATOL:
        atol = THREE_WAY_ATOL[eager.dtype]
        if eager.dtype == torch.bfloat16:
            atol += INTERPRETER_BF16_ULPS * torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
        assert_three_way(fused, eager, exact, atol)
    else:
        atol, rtol = TOL[eager.dtype]
        torch.testing.assert_close(fused, eager, atol=atol, rtol=rtol)


def assert_logdet_matches(fused: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert fused.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if dtype in THREE_WAY_ATOL:
        assert_three_way(fused, eager, exact, atol=1e-3)
    else:
        torch.testing.assert_close(fused, eager, atol=LOGDET_ATOL[dtype], rtol=1e-5)


def _upcast(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in ts]


# every dtype on two layouts; the other layouts in float32 and bfloat16
FORWARD_CASES = [(case, dtype) for case in ("odd", "channel_slice") for dtype in DTYPES] + [
    (case, dtype)
    for case in ("batch1", "1x1x1023", "toy2d", "transposed", "channels_last", "mixed_5d")
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("case", "dtype"), FORWARD_CASES, ids=[f"{c}-{d}" for c, d in FORWARD_CASES])
def test_forward_and_inverse_match_eager(target, case: str, kind: str, dtype: torch.dtype) -> None:
    backend, device = target
    x, t, r = make_inputs(case, dtype, device)
    with fastflow.backend(backend):
        y, logdet = forward(kind, x, t, r)
        x_back, neg_logdet = inverse(kind, y, t, r)
    with fastflow.backend("eager"):
        y_ref, logdet_ref = forward(kind, x, t, r)
        x_ref, neg_logdet_ref = inverse(kind, y, t, r)
        y_exact, logdet_exact = forward(kind, *_upcast(x, t, r))
        x_exact, neg_logdet_exact = inverse(kind, *_upcast(y, t, r))
    assert y.shape == x.shape and y.dtype == dtype and logdet.shape == (x.shape[0],)
    assert_matches(y, y_ref, y_exact)
    assert_logdet_matches(logdet, logdet_ref, logdet_exact, dtype)
    assert_matches(x_back, x_ref, x_exact)
    torch.testing.assert_close(neg_logdet, -logdet, atol=0, rtol=0)
    assert_logdet_matches(neg_logdet, neg_logdet_ref, neg_logdet_exact, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_inverse_of_forward_is_identity(target, kind: str, dtype: torch.dtype) -> None:
    backend, device = target
    x, t, r = make_inputs("channel_slice", dtype, device)
    with fastflow.backend(backend):
        y, logdet = forward(kind, x, t, r)
        x_back, neg_logdet = inverse(kind, y, t, r)
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(x_back, x, atol=atol, rtol=atol)
    torch.testing.assert_close(neg_logdet, -logdet, atol=0, rtol=0)


def test_extreme_raw_is_stable(target) -> None:
    backend, device = target
    raw = torch.linspace(-60.0, 60.0, 2 * 3 * 40, device=device).reshape(2, 3, 40)
    x, t = _randn(raw.shape, torch.float32, device), _randn(raw.shape, torch.float32, device)
    for kind in ("sigmoid", "exp", "sigmoid2"):
        with fastflow.backend(backend):
            y, logdet = forward(kind, x, t, raw)
        with fastflow.backend("eager"):
            y_exact, logdet_exact = forward(kind, x.double(), t.double(), raw.double())
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
        torch.testing.assert_close(y.double(), y_exact, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logdet.double(), logdet_exact, atol=1e-4, rtol=1e-6)


def test_sigmoid2_is_jets_scale_and_the_identity_at_zero() -> None:
    """``"sigmoid2"`` is ``y = (x + t) * 2 sigmoid(r)`` with log-det ``sum log(2 sigmoid(r))``: the identity
    (plus shift) at ``r = 0``, where a zero-initialised Jet conditioner starts."""
    x, t, r = (torch.randn(3, 4, 5, dtype=torch.float64) for _ in range(3))
    y, logdet = C.affine_coupling_ref(x, t, r, "sigmoid2")
    torch.testing.assert_close(y, (x + t) * 2 * torch.sigmoid(r), atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(logdet, torch.log(2 * torch.sigmoid(r)).sum(dim=(1, 2)), atol=1e-12, rtol=1e-12)
    y0, logdet0 = C.affine_coupling_ref(x, t, torch.zeros_like(r), "sigmoid2")
    torch.testing.assert_close(y0, x + t, atol=0, rtol=0)
    torch.testing.assert_close(logdet0, torch.zeros(3, dtype=torch.float64), atol=1e-15, rtol=0)


def _differentiable(kind: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Leaf copies of ``(x, t, r)`` that require grad; ``r`` dropped for the additive coupling."""
    return [v.detach().requires_grad_() for v in tensors[: 2 if kind == "additive" else 3]]


def _call(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], kind: str, *inputs: torch.Tensor):
    x, t, *rest = inputs
    return fn(kind, x, t, rest[0] if rest else None)


def _grads(kind: str, x, t, r, gy, gl, fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = forward):
    """Autograd gradients w.r.t. ``(x, t[, r])`` of ``fn`` for upstream ``(gy, gl)``."""
    inputs = _differentiable(kind, x, t, r)
    pairs = [(out, grad) for out, grad in zip(_call(fn, kind, *inputs), (gy, gl)) if out.requires_grad]
    outputs, grads = zip(*pairs)
    return list(torch.autograd.grad(outputs, inputs, grads))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["odd", "channel_slice", "channels_last", "toy2d"])
@pytest.mark.parametrize("fn", [forward, inverse], ids=["forward", "inverse"])
def test_backward_matches_eager_autograd(target, fn, case: str, kind: str, dtype: torch.dtype) -> None:
    backend, device = target
    x, t, r = make_inputs(case, dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, device)
    with fastflow.backend(backend):
        fused = _grads(kind, x, t, r, gy, gl, fn)
    with fastflow.backend("eager"):
        eager = _grads(kind, x, t, r, gy, gl, fn)
        exact = _grads(kind, *_upcast(x, t, r, gy), gl, fn)
    for f, e, ex in zip(fused, eager, exact):
        assert f.dtype == dtype
        assert_matches(f, e, ex)


def _sum_loss_grads(backend: str, x, t, r) -> list[torch.Tensor]:
    with fastflow.backend(backend):
        inputs = [v.detach().requires_grad_() for v in (x, t, r)]
        y, logdet = C.affine_coupling(*inputs, "exp")
        return list(torch.autograd.grad(y.sum() + logdet.sum(), inputs))


def test_backward_with_expanded_upstream_gradients(target) -> None:
    """``loss = y.sum() + logdet.sum()`` sends stride-0 gradients; the kernel reads them in place."""
    backend, device = target
    x, t, r = make_inputs("channels_last", torch.float32, device)
    for f, e in zip(_sum_loss_grads(backend, x, t, r), _sum_loss_grads("eager", x, t, r)):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradcheck_float64(target, kind: str, direction: str) -> None:
    backend, device = target
    h = _randn((2, 4, 2, 3), torch.float64, device)
    inputs = [
        h[:, 1:3],
        _randn((2, 2, 2, 3), torch.float64, device),
        _randn((2, 2, 2, 3), torch.float64, device),
    ]
    fn = forward if direction == "forward" else inverse
    with fastflow.backend(backend):
        assert torch.autograd.gradcheck(
            lambda *args: _call(fn, kind, *args), _differentiable(kind, *inputs), atol=1e-8, rtol=1e-6
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["odd", "channel_slice", "channels_last", "mixed_5d"])
def test_backward_from_output(target, case: str, kind: str, dtype: torch.dtype) -> None:
    """Fused reversible backward against its eager twin, and the twin against autograd of the forward."""
    backend, device = target
    x, t, r = make_inputs(case, dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, device)
    with fastflow.backend("eager"):
        y, _ = forward(kind, x, t, r)
        eager = from_output(kind, y, t, r, gy, gl)
        exact = from_output(kind, *_upcast(y, t, r, gy), gl)
        autograd = _grads(kind, *_upcast(eager[0], t, r, gy), gl)
    with fastflow.backend(backend):
        fused = from_output(kind, y, t, r, gy, gl)
    assert len(fused) == (3 if kind == "additive" else 4)
    for f, e, ex in zip(fused, eager, exact):
        assert f.dtype == dtype and f.shape == x.shape
        assert_matches(f, e, ex)
    if dtype != torch.bfloat16:
        for e, a in zip(eager[1:], autograd):
            torch.testing.assert_close(e, a, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def _strided_copies(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Copies of ``tensors`` that are strided views: every other channel of a buffer twice their size, in each
    tensor's memory format (channels-last buffers for channels-last tensors)."""
    copies = []
    for v in tensors:
        buffer = torch.zeros(v.shape[0], 2 * v.shape[1], *v.shape[2:], dtype=v.dtype, device=v.device)
        if v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous():
            buffer = buffer.contiguous(memory_format=torch.channels_last)
        copies.append(buffer[:, 1::2].copy_(v))
    return copies


def _in_place(backend: str, y, t, r, gy, gl, kind: str) -> tuple[torch.Tensor, ...]:
    """``(x, gx, gt, gr)`` of :func:`C.affine_coupling_backward_from_output_` on ``backend``, written over
    :func:`_strided_copies` of ``(y, gy, t, r)``."""
    y_b, shift, raw, grad_y = _strided_copies(y, t, r, gy)
    with fastflow.backend(backend):
        assert C.affine_coupling_backward_from_output_(y_b, shift, raw, grad_y, gl, kind) is None
    return y_b, grad_y, shift, raw


@pytest.mark.parametrize("gl_given", [True, False], ids=["grad_logdet", "no_grad_logdet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["sigmoid", "exp", "sigmoid2"])
@pytest.mark.parametrize("case", ["odd", "channel_slice", "channels_last"])
def test_backward_from_output_in_place_is_the_eager_twin_bit_for_bit(
    case: str, kind: str, dtype: torch.dtype, gl_given: bool
) -> None:
    """The in-place reversible backward writes exactly the eager twin's ``(x, gx, gt, gr)`` over
    ``(y, gy, t, r)``, on any layout (its inputs need not be contiguous). The twin runs on inputs of the same
    strides: ATen's elementwise kernels round alike only where they walk memory alike (on an AMD EPYC host, two
    elements of a channels-last ``gr`` differed by one ulp from the twin's on NCHW views)."""
    x, t, r = make_inputs(case, dtype, "cpu")
    gy = _randn(x.shape, dtype, "cpu")
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, "cpu") if gl_given else None
    with fastflow.backend("eager"):
        y, _ = forward(kind, x, t, r)
        expected = from_output(kind, *_strided_copies(y, t, r, gy), gl)
    for got, want in zip(_in_place("eager", y, t, r, gy, gl, kind), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["sigmoid", "exp", "sigmoid2"])
def test_backward_from_output_in_place_on_the_kernels(target, kind: str, dtype: torch.dtype) -> None:
    """On the kernel backends (and for half dtypes eagerly) the fused op's results are copied over the inputs,
    the shift gradient first (for ``"exp"`` it is the upstream gradient that is then overwritten)."""
    backend, device = target
    x, t, r = make_inputs("odd", dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float32, device)
    y, _ = forward(kind, x, t, r)
    for name in (backend, "eager"):
        with fastflow.backend(name):  # type: ignore[arg-type]
            expected = from_output(kind, y, t, r, gy, gl)
        for got, want in zip(_in_place(name, y, t, r, gy, gl, kind), expected):
            assert torch.equal(got, want)


def test_backward_from_output_in_place_checks_its_arguments() -> None:
    y, t, r = (torch.randn(2, 3) for _ in range(3))
    with pytest.raises(ValueError, match="shift and y_b share memory"):
        C.affine_coupling_backward_from_output_(y, y, r, torch.randn(2, 3), None, "sigmoid")
    buffer = torch.randn(3, 8, 5)  # partly overlapping channel slices (before: only equal starts were refused)
    shift, raw = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="grad_y and y_b share memory"):
        C.affine_coupling_backward_from_output_(buffer[:, 0:4], shift, raw, buffer[:, 2:6], None, "sigmoid")
    with pytest.raises(ValueError, match="grad_y"):
        C.affine_coupling_backward_from_output_(y, t, r, y[:1].clone(), None, "sigmoid2")
    # grad_logdet is read after y_b is written ("exp": y_b - shift first): a view of y_b gave a wrong raw gradient
    h, shift, raw = (torch.randn(2, 3, 4) for _ in range(3))
    with pytest.raises(ValueError, match="grad_logdet and y_b share memory"):
        C.affine_coupling_backward_from_output_(h, shift, raw, h.clone(), h[:, 0, 0], "exp")
    with pytest.raises(ValueError, match="scale"):
        C.affine_coupling_backward_from_output_(y, t, r, y.clone(), None, "tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="raw requires grad"):
        C.affine_coupling_backward_from_output_(y, t, r.requires_grad_(), y.clone(), None, "sigmoid2")


def test_kernel_reads_common_layouts_without_copies(target) -> None:
    from fastflow.kernels import coupling as K

    _, device = target
    for case, runs in (("channel_slice", 2), ("channels_last", 2), ("transposed", 3), ("mixed_5d", None)):
        inputs = list(make_inputs(case, torch.float32, device))
        prepared, order, found = K._prepare(inputs, None)
        assert found == K._runs(prepared, order, None)
        if runs is None:
            assert found.ndim == 1 and all(p is not i for p, i in zip(prepared, inputs))
        else:
            assert found.ndim == runs and found.channel == -1 and all(p is i for p, i in zip(prepared, inputs))
    h = torch.randn(3, 10, 7, 9, device=device)
    assert K._runs([h[:, :5], h[:, 5:]], K._inner_order(h), None).ndim == 1


def test_channel_split_keeps_the_channel_dim_a_run_of_its_own(target) -> None:
    """The whole activation with a channel split: channels x pixels (NCHW), pixels x channels (channels_last),
    channels x rows x columns (a spatial crop), read in place; the ``NB``-channel shift may be laid out
    differently. Beyond three runs each tensor is copied in its own shape."""
    from fastflow.kernels import coupling as K

    _, device = target
    for case, ndim in (("split_nchw", 2), ("split_channels_last", 2), ("split_mixed", 2), ("split_cropped", 3)):
        x, t, r, _ = make_split_inputs(case, torch.float32, device)
        prepared, order, runs = K._prepare([x, t, r], 1)
        assert runs == K._runs(prepared, order, 1)
        assert all(p is i for p, i in zip(prepared, (x, t, r)))
        assert runs.ndim == ndim and runs.sizes[runs.channel] == x.shape[1]
        assert runs.channel == (1 if x.stride(1) == 1 else 0)
    x, t, r, _ = make_split_inputs("split_copied", torch.float32, device)
    prepared, _, runs = K._prepare([x, t, r], 1)
    assert runs == K._runs(prepared, K._inner_order(prepared[0]), 1)
    assert [p.shape for p in prepared] == [x.shape, t.shape, r.shape] and all(p.is_contiguous() for p in prepared)


def test_output_layout_follows_input(target) -> None:
    backend, device = target
    x, t, r = make_inputs("channels_last", torch.float32, device)
    with fastflow.backend(backend):
        y, _ = C.affine_coupling(x, t, r)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x, t, r = make_inputs("channel_slice", torch.float32, device)
    with fastflow.backend(backend):
        y, _ = C.affine_coupling(x, t, r)
    assert y.is_contiguous()


def test_channel_split_output_layout_follows_input(target) -> None:
    backend, device = target
    x, t, r, _ = make_split_inputs("split_channels_last", torch.float32, device)
    for b_start in (0, 1, x.shape[1] - t.shape[1]):  # the transformed part first, inside, last
        with fastflow.backend(backend):
            y, _ = C.affine_coupling(x, t, r, "sigmoid", b_start)
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_empty_batch(target) -> None:
    backend, device = target
    x = torch.zeros(0, 3, 4, device=device)
    with fastflow.backend(backend):
        y, logdet = C.affine_coupling(x, x, x)
    assert y.shape == x.shape and logdet.shape == (0,)


@pytest.mark.parametrize("split", [False, True], ids=["half", "split"])
def test_torch_compile_inductor_forward_backward(target, split: bool) -> None:
    torch._dynamo.reset()
    if split:
        x, t, r, b_start = make_split_inputs("split_nchw", torch.float32, target[1])
    else:
        (x, t, r), b_start = make_inputs("channel_slice", torch.float32, target[1]), None

    def step(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return C.affine_coupling(x, t, r, "sigmoid", b_start)

    backend, _ = target
    inputs = [a.detach().requires_grad_() for a in (x, t, r)]
    gy, gl = torch.randn_like(x), torch.randn(x.shape[0], device=x.device)
    with fastflow.backend(backend):
        y, logdet = torch.compile(step, fullgraph=True)(*inputs)
        grads = torch.autograd.grad((y, logdet), inputs, (gy, gl))
    with fastflow.backend("eager"):
        y_ref, logdet_ref = step(*inputs)
        grads_ref = torch.autograd.grad((y_ref, logdet_ref), inputs, (gy, gl))
    for a, b in zip((y, logdet, *grads), (y_ref, logdet_ref, *grads_ref)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_torch_compile_traces_every_op_without_graph_breaks(target) -> None:
    torch._dynamo.reset()

    def loss(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y, logdet = C.affine_coupling(x, t, r, "exp")
        x2, neg_logdet = C.affine_coupling_inverse(y * 0.5, t, r, "sigmoid")
        z, zero = C.additive_coupling(x2, t)
        w, _ = C.additive_coupling_inverse(z, r)
        return (w * w).sum() + logdet.sum() + neg_logdet.sum() + zero.sum()

    x, t, r = make_inputs("odd", torch.float32, target[1])
    backend, _ = target
    inputs = [a.detach().requires_grad_() for a in (x, t, r)]
    with fastflow.backend(backend):
        out = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs)
        grads = torch.autograd.grad(out, inputs)
    with fastflow.backend("eager"):
        out_ref = loss(*inputs)
        grads_ref = torch.autograd.grad(out_ref, inputs)
    torch.testing.assert_close(out, out_ref, atol=1e-3, rtol=1e-5)
    for g, rg in zip(grads, grads_ref):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


def _split_loss(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Every op with a channel split (channels [2, 5) of 5), forward and inverse."""
    y, logdet = C.affine_coupling(x, t, r, "sigmoid", 2)
    x2, neg_logdet = C.affine_coupling_inverse(y * 0.5, t, r, "exp", 2)
    z, zero = C.additive_coupling(x2, t, 2)
    w, _ = C.additive_coupling_inverse(z, r, 2)
    return (w * w).sum() + logdet.sum() + neg_logdet.sum() + zero.sum()


@pytest.mark.parametrize("on_kernels", [False, True], ids=["eager", "kernels"])
def test_torch_compile_traces_channel_split_without_graph_breaks(target, on_kernels: bool) -> None:
    """``torch._dynamo.explain`` finds one graph and no break on the eager backend and on the kernels (opaque
    custom ops on the interpreter); compiled forward and backward match eager."""
    torch._dynamo.reset()
    backend = target[0] if on_kernels else "eager"
    x, t, r, _ = make_split_inputs("split_nchw", torch.float32, target[1])
    inputs = [a.detach().requires_grad_() for a in (x, t, r)]
    with fastflow.backend(backend):
        explanation = torch._dynamo.explain(_split_loss)(*inputs)
        out = torch.compile(_split_loss, fullgraph=True, backend="aot_eager")(*inputs)
        grads = torch.autograd.grad(out, inputs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    with fastflow.backend("eager"):
        out_ref = _split_loss(*inputs)
        grads_ref = torch.autograd.grad(out_ref, inputs)
    torch.testing.assert_close(out, out_ref, atol=1e-3, rtol=1e-5)
    for g, rg in zip(grads, grads_ref):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def fallback_ops() -> C._CouplingOps:
    """The ``custom_op`` registration (torch < 2.6, the interpreter) under a namespace of its own."""
    return C._define_ops("fastflow_fallback_test", traceable=False)


def _op_results(ops: C._CouplingOps, kind: str, x, t, r, b_start: int | None) -> list[torch.Tensor]:
    """Forward, inverse, both backwards and the autograd gradients of ``ops``."""
    raw = None if kind == "additive" else r
    inputs = [v.detach().requires_grad_() for v in (x, t, r)]
    y, logdet = ops.fwd(inputs[0], inputs[1], None if raw is None else inputs[2], kind, b_start)
    gy, gl = torch.ones_like(y), torch.ones_like(logdet)
    grads = torch.autograd.grad((y, logdet), inputs, (gy, gl), allow_unused=True, materialize_grads=True)
    results = [y, logdet, *ops.inv(y.detach(), t, raw, kind, b_start), *grads]
    results += ops.bwd(y.detach(), t, raw, gy, gl, kind, True, b_start)
    if kind != "additive":
        results += ops.bwd(x, t, raw, gy, gl, kind, False, b_start)
    return results


def test_fallback_registration_matches_the_package_ops(target, fallback_ops) -> None:
    """The ``custom_op`` fallback, built by the same helper under another namespace, and the direct twins that
    eager calls take give the same results and gradients as the package's ops; the fallback has the same
    schemas, and its fake kernels give the real shapes, strides and dtypes (on the interpreter the package's
    ops are that fallback; where Triton compiles they are triton ops)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("coupling_fwd", "coupling_inv", "coupling_bwd"):
        package = str(getattr(torch.ops.fastflow, name).default._schema)
        fallback = str(getattr(torch.ops.fastflow_fallback_test, name).default._schema)
        assert fallback.replace("fastflow_fallback_test::", "fastflow::") == package
    _, device = target
    for case in ("split_nchw", "split_channels_last"):
        x, t, r, b_start = make_split_inputs(case, torch.float32, device)
        for kind in KINDS:
            raw = None if kind == "additive" else r
            for split in (b_start, None):
                u = x if split is not None else x[:, 2:]
                package = _op_results(C._OPS, kind, u, t, r, split)
                for other in (fallback_ops, C._DIRECT):
                    results = _op_results(other, kind, u, t, r, split)
                    assert len(package) == len(results)
                    for p, f in zip(package, results):
                        torch.testing.assert_close(f, p, atol=0, rtol=0)
                y, logdet = package[:2]
                real = [y, logdet, *C._OPS.bwd(y, t, raw, y, logdet, kind, True, split)]
                with FakeTensorMode() as mode:
                    fy, ft, fr = (None if v is None else mode.from_tensor(v) for v in (y, t, raw))
                    fakes = [*fallback_ops.fwd(mode.from_tensor(u), ft, fr, kind, split)]
                    fakes += fallback_ops.bwd(fy, ft, fr, fy, mode.from_tensor(logdet), kind, True, split)
                assert len(fakes) == len(real)
                for fake, want in zip(fakes, real):
                    assert (fake.shape, fake.stride(), fake.dtype) == (want.shape, want.stride(), want.dtype)


TRITON_OP_CHECK = """
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.fake_tensor import FakeTensorMode

from fastflow.kernels import coupling as K
from fastflow.ops import coupling as C

# without a GPU torch cannot ask Triton which pointers a kernel stores to: it warns and takes them all
traced_ops = C._define_ops("fastflow_traced", traceable=True)  # what a CUDA build registers as fastflow::
for name, kernel in (("fwd", K.coupling_fwd_kernel), ("inv", K.coupling_fwd_kernel), ("bwd", K.coupling_bwd_kernel)):
    assert get_triton_kernels_for_op(f"fastflow_traced::coupling_{name}") == [kernel], name
fallback = C._define_ops("fastflow_fallback", traceable=False)
for name in ("coupling_fwd", "coupling_inv", "coupling_bwd"):
    schema = str(getattr(torch.ops.fastflow_fallback, name).default._schema).replace("fastflow_fallback::", "")
    assert schema == str(getattr(torch.ops.fastflow_traced, name).default._schema).replace("fastflow_traced::", "")


def kernels_in(graph):
    # the side table keeps each launch as an Autotuner over the launch options, around the kernel
    return [
        kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn
        for node in graph.graph.nodes
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target)
    ]


for kind in ("sigmoid", "exp", "sigmoid2", "additive"):
    for b_start, fmt in ((None, torch.contiguous_format), (2, torch.contiguous_format), (2, torch.channels_last)):
        graphs = []

        def keep(graph, example_inputs):
            graphs.append(graph)
            return make_boxed_func(graph)

        def run(ops, x, t, r):
            raw = None if kind == "additive" else r
            return ops.fwd(x, t, raw, kind, b_start)[0] * 2.0, ops.inv(x, t, raw, kind, b_start)[1]

        def grads_of(outputs, inputs):
            loss = outputs[0].sum() + outputs[1].sum()
            return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)

        with FakeTensorMode():
            x = torch.randn(3, 5 if b_start else 3, 4, 4).to(memory_format=fmt).requires_grad_()
            t, r = (torch.randn(3, 3, 4, 4).to(memory_format=fmt).requires_grad_() for _ in range(2))
            traced = aot_function(lambda *a: run(traced_ops, *a), fw_compiler=keep, bw_compiler=keep)(x, t, r)
            grads = grads_of(traced, (x, t, r))
            opaque = run(fallback, x, t, r)
            grads_opaque = grads_of(opaque, (x, t, r))
            raw = None if kind == "additive" else r
            rebuilt = [
                ops.bwd(x, t, raw, x, None, kind, True, b_start) for ops in (traced_ops, fallback)
            ]  # fake kernels: the triton op's own code vs the fallback's
        for a, b in zip((*traced, *rebuilt[0]), (*opaque, *rebuilt[1])):
            assert (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype), (kind, b_start, a.stride())
        for a, b in zip(grads, grads_opaque):  # autograd promises no strides
            assert (a.shape, a.dtype) == (b.shape, b.dtype), (kind, b_start)
        forward, backward = graphs
        assert kernels_in(forward) == [K.coupling_fwd_kernel] * 2, forward.code
        assert kernels_in(backward) == ([] if kind == "additive" else [K.coupling_bwd_kernel]), backward.code
        for graph in graphs:
            assert "fastflow_traced" not in graph.code, graph.code
print("traced")
"""


@pytest.mark.skipif(
    not (triton_available() and hasattr(torch.library, "triton_op")), reason="needs triton and torch >= 2.6"
)
def test_triton_op_registration_is_traced_into_kernel_launches() -> None:
    """Where Triton compiles its kernels (here: a fresh interpreter with TRITON_INTERPRET=0, no GPU needed) the
    ops are triton ops: torch finds their kernels (compile caches key on them), AOTAutograd traces forward and
    backward into the kernel launches (no opaque op left), with the shapes, strides and schemas of the
    ``custom_op`` fallback."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", TRITON_OP_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "traced" in proc.stdout, proc.stderr[-4000:]


SPLIT_CASES = [
    (case, dtype)
    for case in ("split_nchw", "split_parity1", "split_channels_last")
    for dtype in (torch.float32, torch.float64, torch.bfloat16)
] + [
    (case, torch.float32) for case in ("split_batch1", "split_mixed", "split_vectors", "split_cropped", "split_copied")
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("case", "dtype"), SPLIT_CASES, ids=[f"{c}-{d}" for c, d in SPLIT_CASES])
def test_channel_split_forward_and_inverse_match_eager(target, case: str, kind: str, dtype: torch.dtype) -> None:
    """The whole output in one pass: transformed channels as the eager twin, the others copied bit for bit."""
    backend, device = target
    x, t, r, b_start = make_split_inputs(case, dtype, device)
    with fastflow.backend(backend):
        y, logdet = split_forward(kind, x, t, r, b_start)
        x_back, neg_logdet = split_inverse(kind, y, t, r, b_start)
    with fastflow.backend("eager"):
        y_ref, logdet_ref = split_forward(kind, x, t, r, b_start)
        x_ref, neg_logdet_ref = split_inverse(kind, y, t, r, b_start)
        y_exact, logdet_exact = split_forward(kind, *_upcast(x, t, r), b_start)
        x_exact, neg_logdet_exact = split_inverse(kind, *_upcast(y, t, r), b_start)
    assert y.shape == x.shape and y.dtype == dtype and logdet.shape == (x.shape[0],)
    if case == "split_channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    keep = [c for c in range(x.shape[1]) if not b_start <= c < b_start + t.shape[1]]
    assert torch.equal(y[:, keep], x[:, keep]) and torch.equal(x_back[:, keep], y[:, keep])
    assert_matches(y, y_ref, y_exact)
    assert_logdet_matches(logdet, logdet_ref, logdet_exact, dtype)
    assert_matches(x_back, x_ref, x_exact)
    torch.testing.assert_close(neg_logdet, -logdet, atol=0, rtol=0)
    assert_logdet_matches(neg_logdet, neg_logdet_ref, neg_logdet_exact, dtype)


def _split_grads(kind: str, x, t, r, b_start: int, gy, gl, fn=split_forward) -> list[torch.Tensor]:
    inputs = _differentiable(kind, x, t, r)
    y, logdet = fn(kind, *inputs, *([None] if kind == "additive" else []), b_start)
    pairs = [(out, grad) for out, grad in zip((y, logdet), (gy, gl)) if out.requires_grad]
    outputs, grads = zip(*pairs)
    return list(torch.autograd.grad(outputs, inputs, grads))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["split_nchw", "split_parity1", "split_channels_last", "split_vectors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fn", [split_forward, split_inverse], ids=["forward", "inverse"])
def test_channel_split_backward_matches_eager_autograd(target, fn, dtype, case: str, kind: str) -> None:
    """Whole ``grad_x`` (pass-through channels included) and the shift / raw gradients, against eager."""
    backend, device = target
    x, t, r, b_start = make_split_inputs(case, dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, device)
    with fastflow.backend(backend):
        fused = _split_grads(kind, x, t, r, b_start, gy, gl, fn)
    with fastflow.backend("eager"):
        eager = _split_grads(kind, x, t, r, b_start, gy, gl, fn)
    for f, e in zip(fused, eager):
        assert f.dtype == dtype and f.shape == e.shape
        torch.testing.assert_close(f, e, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_channel_split_gradcheck_float64(target, kind: str, direction: str) -> None:
    backend, device = target
    x = _randn((2, 5, 2, 3), torch.float64, device)
    net = _randn((2, 4, 2, 3), torch.float64, device)
    fn = split_forward if direction == "forward" else split_inverse

    def call(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fn(kind, *args, *([None] if kind == "additive" else []), 2)

    with fastflow.backend(backend):
        assert torch.autograd.gradcheck(call, _differentiable(kind, x, net[:, :2], net[:, 2:]), atol=1e-8, rtol=1e-6)


def split_from_output(kind: str, y, t, r, gy, gl, b_start: int) -> tuple[torch.Tensor, ...]:
    if kind == "additive":
        return C.additive_coupling_backward_from_output(y, t, gy, b_start)
    return C.affine_coupling_backward_from_output(y, t, r, gy, gl, kind, b_start)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "case", ["split_nchw", "split_parity1", "split_channels_last", "split_cropped", "split_copied"]
)
def test_channel_split_backward_from_output(target, case: str, kind: str, dtype: torch.dtype) -> None:
    """Reversible backward on the whole tensors: rebuilt ``x`` and ``grad_x`` whole, against the eager twin
    and (in float32/float64) against autograd of the split forward."""
    backend, device = target
    x, t, r, b_start = make_split_inputs(case, dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, device)
    with fastflow.backend("eager"):
        y, _ = split_forward(kind, x, t, r, b_start)
        eager = split_from_output(kind, y, t, r, gy, gl, b_start)
        exact = split_from_output(kind, *_upcast(y, t, r, gy), gl, b_start)
        autograd = _split_grads(kind, *_upcast(eager[0], t, r), b_start, *_upcast(gy), gl)
    with fastflow.backend(backend):
        fused = split_from_output(kind, y, t, r, gy, gl, b_start)
    assert len(fused) == (3 if kind == "additive" else 4)
    assert fused[0].shape == fused[1].shape == x.shape and fused[2].shape == t.shape
    for f, e, ex in zip(fused, eager, exact):
        assert f.dtype == dtype
        assert_matches(f, e, ex)
    if dtype != torch.bfloat16:
        for e, a in zip(eager[1:], autograd):
            torch.testing.assert_close(e, a, atol=TOL[dtype][0], rtol=TOL[dtype][1])


class _Launches(TorchDispatchMode):
    """The ATen and fastflow ops that run a kernel, by name (views and allocations excluded)."""

    FREE = ("view", "slice", "narrow", "detach", "empty", "expand", "alias", "as_strided", "permute", "t")

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name not in self.FREE and not name.startswith("empty"):
            self.names.append(f"{func.namespace}.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_channel_split_runs_one_launch_each_way(target, kind: str) -> None:
    """Forward: the fused op alone (no torch.cat); backward: the fused op alone (no slice_backward zero-fill
    and copy), and nothing at all for the additive coupling, whose gradients are the upstream one (its
    constant log-det's gradient is not even materialised). One output alone still gets the right gradients."""
    backend, device = target
    x, t, r, b_start = make_split_inputs("split_nchw", torch.float32, device)
    inputs = _differentiable(kind, x, t, r)
    with fastflow.backend(backend), _Launches() as forward:
        y, logdet = split_forward(kind, *inputs, *([None] if kind == "additive" else []), b_start)
    gy, gl = torch.randn_like(y), torch.randn_like(logdet)
    outputs = (y,) if kind == "additive" else (y, logdet)  # the additive log-det is a constant
    with _Launches() as backward:
        grads = torch.autograd.grad(outputs, inputs, (gy, gl)[: len(outputs)])
    assert forward.names == ["fastflow.coupling_fwd"]
    assert backward.names == ([] if kind == "additive" else ["fastflow.coupling_bwd"])
    with fastflow.backend("eager"):
        ref = split_forward(kind, *inputs, *([None] if kind == "additive" else []), b_start)[: len(outputs)]
        for g, e in zip(grads, torch.autograd.grad(ref, inputs, (gy, gl)[: len(outputs)])):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    if kind != "additive":
        for fn in (split_forward, split_inverse):
            alone = {}
            for name in (backend, "eager"):
                with fastflow.backend(name):
                    logdet = fn(kind, *inputs, b_start)[1]  # independent of x (eager: unused)
                    alone[name] = torch.autograd.grad(logdet, inputs, gl, allow_unused=True, materialize_grads=True)
            for g, e in zip(alone[backend], alone["eager"]):
                torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def _shared_input_parts(kind: str, v: torch.Tensor, split: bool) -> tuple[list[torch.Tensor], int | None]:
    """``x``, ``shift`` (and ``raw``) all cut from the one tensor ``v``: their gradients meet in ``v``."""
    if split:  # x whole, shift and raw overlapping both the pass-through and the transformed channels
        parts = [v, v[:, 1:4], 0.5 * v[:, 2:5]]
        return parts[: 2 if kind == "additive" else 3], 2
    return [v, v, 0.5 * v][: 2 if kind == "additive" else 3], None


@pytest.mark.parametrize("split", [False, True], ids=["half", "split"])
@pytest.mark.parametrize("kind", KINDS)
def test_shift_gradient_is_stored_once_and_adds_into_a_shared_input(target, kind: str, split: bool) -> None:
    """``grad_shift`` is the very ``grad_x`` (Glow, Jet, NICE) or ``grad_y`` (RealNVP) tensor, or a view of its
    transformed channels: one store, not two. Where the gradients meet in one upstream tensor they still add up
    as in eager (autograd does not accumulate in place into the shared buffer)."""
    backend, device = target
    v0 = _randn((3, 5, 4, 3), torch.float64, device)
    gy = _randn(v0.shape, torch.float64, device)
    gl = _randn((3,), torch.float64, device)
    shared = {}
    for name in (backend, "eager"):
        v = v0.clone().requires_grad_()
        with fastflow.backend(name):
            parts, b_start = _shared_input_parts(kind, v, split)
            y, logdet = split_forward(kind, *parts, *([None] if kind == "additive" else []), b_start)
            loss = (y * gy).sum() + (0 if kind == "additive" else (logdet * gl).sum())
            shared[name] = torch.autograd.grad(loss, v)[0]
    torch.testing.assert_close(shared[backend], shared["eager"], atol=1e-12, rtol=1e-12)

    x, t, r, b_start = make_split_inputs("split_nchw", torch.float32, device)
    if not split:
        x, b_start = x[:, 2:].contiguous(), None
    inputs = _differentiable(kind, x, t, r)
    gy = torch.randn(x.shape, device=device)
    with fastflow.backend(backend):
        y, _ = split_forward(kind, *inputs, *([None] if kind == "additive" else []), b_start)
    grad_x, grad_shift = torch.autograd.grad(y, inputs[:2], gy)
    owner = gy if kind == "exp" else grad_x
    assert grad_shift.data_ptr() == owner[:, b_start or 0 :].data_ptr()
    assert grad_shift.untyped_storage().data_ptr() == owner.untyped_storage().data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_forward_writes_every_slot_of_uninitialised_buffers(target, kind: str, monkeypatch) -> None:
    """The log-det partial sums (like the outputs) live in ``torch.empty`` buffers, never zero-filled, because
    the kernel writes every slot, ragged last tiles (in samples and in columns) included: with every new
    buffer pre-filled with NaN the results are unchanged, and an affine forward calls no ``torch.zeros`` (the
    additive one's log-det is its zero vector)."""
    backend, device = target
    empty = torch.empty

    def nan_empty(*args, **kwargs) -> torch.Tensor:
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def no_zeros(*args, **kwargs) -> torch.Tensor:
        raise AssertionError("the affine coupling forward zero-fills a buffer")

    cases = [((5, 3, 7, 9), None), ((37, 1), None), ((2, 3, 25, 25), None), ((5, 5, 7, 9), 2)]
    for shape, b_start in cases:
        x = _randn(shape, torch.float32, device)
        t_shape = x.shape if b_start is None else (shape[0], 3, *shape[2:])
        t, r = _randn(t_shape, torch.float32, device), _randn(t_shape, torch.float32, device, 3.0)
        with fastflow.backend("eager"):
            expected = split_forward(kind, x, t, r, b_start), split_inverse(kind, x, t, r, b_start)
        with monkeypatch.context() as patch, fastflow.backend(backend):
            patch.setattr(torch, "empty", nan_empty)
            if kind != "additive":
                patch.setattr(torch, "zeros", no_zeros)
            found = split_forward(kind, x, t, r, b_start), split_inverse(kind, x, t, r, b_start)
        for got, want in zip(found, expected):
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


def _assert_bad_inputs_raise(device: str) -> None:
    x, t, r = make_inputs("odd", torch.float32, device)
    with pytest.raises(ValueError, match="shift"):
        C.affine_coupling(x, t[:, :2], r)
    with pytest.raises(ValueError, match="raw"):
        C.affine_coupling(x, t, r[:2])
    with pytest.raises(TypeError, match="x_b"):
        C.affine_coupling(x.to(torch.int32), t, r)
    with pytest.raises(TypeError, match="shift"):
        C.affine_coupling(x, t.double(), r)
    with pytest.raises(ValueError, match="scale"):
        C.affine_coupling(x, t, r, "tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 2"):
        C.additive_coupling(x[0, 0, 0], t[0, 0, 0])
    with pytest.raises(TypeError, match="y_b"):
        C.affine_coupling_inverse(x.long(), t, r)
    with pytest.raises(ValueError, match="grad_y"):
        C.affine_coupling_backward_from_output(x, t, r, x[:1], None)
    with pytest.raises(ValueError, match="grad_logdet"):
        C.affine_coupling_backward_from_output(x, t, r, x, torch.zeros(5, device=device))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        C.additive_coupling_backward_from_output(x, t, [1.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="b_start must put the 3 channels of shift inside the 5 of x_b"):
        C.affine_coupling(x, t[:, :3], r[:, :3], "sigmoid", 3)
    with pytest.raises(TypeError, match="b_start must be an int"):
        C.additive_coupling(x, t[:, :3], 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shift must have the shape of y_b .* but for dim 1"):
        C.affine_coupling_inverse(x, t[:, :3, :2], r[:, :3, :2], "exp", 1)
    with pytest.raises(ValueError, match="raw must have the shape of shift"):
        C.affine_coupling_backward_from_output(x, t[:, :3], r[:, :2], x, None, "sigmoid", 1)
    with pytest.raises(TypeError, match="shift must have the dtype of x_b"):
        C.affine_coupling(x, t[:, :3].double(), r[:, :3].double(), "sigmoid", 1)


def test_bad_inputs_raise_on_eager() -> None:
    with fastflow.backend("eager"):
        _assert_bad_inputs_raise("cpu")


def test_bad_inputs_raise_on_kernel_backend(target) -> None:
    backend, device = target
    with fastflow.backend(backend):
        _assert_bad_inputs_raise(device)


def test_host_launch_arithmetic_matches_triton() -> None:
    triton = pytest.importorskip("triton")
    from fastflow.kernels.launch import cdiv, next_power_of_2

    for n in range(0, 1100):
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_empty_in_order_follows_the_memory_order(layout: str) -> None:
    pytest.importorskip("triton")
    from fastflow.kernels import coupling as K

    x = torch.empty(2, 3, 4, 5)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last), "transposed": x.mT}[layout]
    out = K.empty_in_order(x)
    assert out.shape == x.shape and out.stride() == x.stride()
    wide = K.empty_in_order(x, torch.float64, (2, 6, *x.shape[2:]))
    assert wide.dtype == torch.float64 and wide.shape == (2, 6, *x.shape[2:])
    assert K._inner_order(wide) == K._inner_order(x)
