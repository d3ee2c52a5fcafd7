"""Tests for ``fastflow/ops/coupling.py`` and ``kernels/coupling.py``: fused kernels against the eager twins.

The kernels run under Triton's CPU interpreter (``"interpret"`` backend) in CI and on CUDA (``"triton"``)
where ``FASTFLOW_TEST_GPU=1`` and a GPU exist.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

import fastflow
from fastflow.backend import interpreter_enabled, triton_available
from fastflow.ops import coupling as C

KINDS = ("sigmoid", "exp", "additive")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# float32/float64: (atol, rtol) of the fused result against the eager result in the same dtype
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)}
# float16/bfloat16 are three-way checked: |fused - float32 ref| <= 2 |eager - float32 ref| + atol
THREE_WAY_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Triton's interpreter truncates float32 -> bfloat16 where GPUs round to nearest even: allow one more ulp
INTERPRETER_BF16_ULPS = 1.0 if interpreter_enabled() else 0.0
LOGDET_ATOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _kernel_target() -> tuple[str, str] | None:
    if not triton_available():
        return None
    if interpreter_enabled():
        return "interpret", "cpu"
    if torch.cuda.is_available():
        return "triton", "cuda"
    return None


@pytest.fixture
def target() -> tuple[str, str]:
    """``(backend, device)`` that runs the Triton kernels here."""
    found = _kernel_target()
    if found is None:
        pytest.skip("needs triton with TRITON_INTERPRET=1, or a CUDA device")
    return found


@contextmanager
def _on(name: str) -> Iterator[None]:
    with fastflow.backend(name):  # type: ignore[arg-type]
        yield


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
    with _on(backend):
        y, logdet = forward(kind, x, t, r)
        x_back, neg_logdet = inverse(kind, y, t, r)
    with _on("eager"):
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
    with _on(backend):
        y, logdet = forward(kind, x, t, r)
        x_back, neg_logdet = inverse(kind, y, t, r)
    atol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(x_back, x, atol=atol, rtol=atol)
    torch.testing.assert_close(neg_logdet, -logdet, atol=0, rtol=0)


def test_extreme_raw_is_stable(target) -> None:
    backend, device = target
    raw = torch.linspace(-60.0, 60.0, 2 * 3 * 40, device=device).reshape(2, 3, 40)
    x, t = _randn(raw.shape, torch.float32, device), _randn(raw.shape, torch.float32, device)
    for kind in ("sigmoid", "exp"):
        with _on(backend):
            y, logdet = forward(kind, x, t, raw)
        with _on("eager"):
            y_exact, logdet_exact = forward(kind, x.double(), t.double(), raw.double())
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
        torch.testing.assert_close(y.double(), y_exact, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logdet.double(), logdet_exact, atol=1e-4, rtol=1e-6)


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
    with _on(backend):
        fused = _grads(kind, x, t, r, gy, gl, fn)
    with _on("eager"):
        eager = _grads(kind, x, t, r, gy, gl, fn)
        exact = _grads(kind, *_upcast(x, t, r, gy), gl, fn)
    for f, e, ex in zip(fused, eager, exact):
        assert f.dtype == dtype
        assert_matches(f, e, ex)


def _sum_loss_grads(backend: str, x, t, r) -> list[torch.Tensor]:
    with _on(backend):
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
    with _on(backend):
        assert torch.autograd.gradcheck(
            lambda *args: _call(fn, kind, *args), _differentiable(kind, *inputs), atol=1e-8, rtol=1e-6
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["odd", "channel_slice", "channels_last"])
def test_backward_from_output(target, case: str, kind: str, dtype: torch.dtype) -> None:
    """Fused reversible backward against its eager twin, and the twin against autograd of the forward."""
    backend, device = target
    x, t, r = make_inputs(case, dtype, device)
    gy = _randn(x.shape, dtype, device)
    gl = _randn((x.shape[0],), torch.float64 if dtype == torch.float64 else torch.float32, device)
    with _on("eager"):
        y, _ = forward(kind, x, t, r)
        eager = from_output(kind, y, t, r, gy, gl)
        exact = from_output(kind, *_upcast(y, t, r, gy), gl)
        autograd = _grads(kind, *_upcast(eager[0], t, r, gy), gl)
    with _on(backend):
        fused = from_output(kind, y, t, r, gy, gl)
    assert len(fused) == (3 if kind == "additive" else 4)
    for f, e, ex in zip(fused, eager, exact):
        assert f.dtype == dtype and f.shape == x.shape
        assert_matches(f, e, ex)
    if dtype != torch.bfloat16:
        for e, a in zip(eager[1:], autograd):
            torch.testing.assert_close(e, a, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_kernel_reads_common_layouts_without_copies(target) -> None:
    from fastflow.kernels import coupling as K

    _, device = target
    for case, runs in (("channel_slice", 2), ("channels_last", 2), ("transposed", 3), ("mixed_5d", None)):
        inputs = list(make_inputs(case, torch.float32, device))
        prepared, found = K._prepare(inputs)
        if runs is None:
            assert found.ndim == 1 and all(p is not i for p, i in zip(prepared, inputs))
        else:
            assert found.ndim == runs and all(p is i for p, i in zip(prepared, inputs))
    h = torch.randn(3, 10, 7, 9, device=device)
    assert K._prepare([h[:, :5], h[:, 5:]])[1].ndim == 1


def test_output_layout_follows_input(target) -> None:
    backend, device = target
    x, t, r = make_inputs("channels_last", torch.float32, device)
    with _on(backend):
        y, _ = C.affine_coupling(x, t, r)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x, t, r = make_inputs("channel_slice", torch.float32, device)
    with _on(backend):
        y, _ = C.affine_coupling(x, t, r)
    assert y.is_contiguous()


def test_empty_batch(target) -> None:
    backend, device = target
    x = torch.zeros(0, 3, 4, device=device)
    with _on(backend):
        y, logdet = C.affine_coupling(x, x, x)
    assert y.shape == x.shape and logdet.shape == (0,)


def test_torch_compile_inductor_forward_backward(target) -> None:
    torch._dynamo.reset()
    x, t, r = make_inputs("channel_slice", torch.float32, target[1])

    def step(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return C.affine_coupling(x, t, r, "sigmoid")

    backend, _ = target
    inputs = [a.detach().requires_grad_() for a in (x, t, r)]
    gy, gl = torch.randn_like(x), torch.randn(x.shape[0], device=x.device)
    with _on(backend):
        y, logdet = torch.compile(step, fullgraph=True)(*inputs)
        grads = torch.autograd.grad((y, logdet), inputs, (gy, gl))
    with _on("eager"):
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
    with _on(backend):
        out = torch.compile(loss, fullgraph=True, backend="aot_eager")(*inputs)
        grads = torch.autograd.grad(out, inputs)
    with _on("eager"):
        out_ref = loss(*inputs)
        grads_ref = torch.autograd.grad(out_ref, inputs)
    torch.testing.assert_close(out, out_ref, atol=1e-3, rtol=1e-5)
    for g, rg in zip(grads, grads_ref):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-5)


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


def test_bad_inputs_raise_on_eager() -> None:
    with _on("eager"):
        _assert_bad_inputs_raise("cpu")


def test_bad_inputs_raise_on_kernel_backend(target) -> None:
    backend, device = target
    with _on(backend):
        _assert_bad_inputs_raise(device)
