"""When a fused op goes through ``torch.library`` and when through its direct twin
(:mod:`fastflow.ops._registration`): both launch the same kernels and give the same gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow
from fastflow.ops import channel_mix as channel_mix_module
from fastflow.ops._registration import direct_autograd, use_library_op
from fastflow.ops.channel_mix import channel_mix, channel_mix_ref
from fastflow.ops.coupling import affine_coupling
from fastflow.ops.spline import rq_spline, rq_spline_inverse


class _OpNames(TorchDispatchMode):
    """Records the name of every op dispatched under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_library_op_only_while_tracing_or_under_a_dispatch_mode() -> None:
    assert not use_library_op()
    with _OpNames():
        assert use_library_op()
    with FakeTensorMode():
        assert use_library_op()
    assert not use_library_op()
    seen = []
    torch.compile(lambda x: seen.append(use_library_op()) or x + 1, backend="eager", fullgraph=True)(torch.ones(1))
    assert seen == [True]
    torch.func.vmap(lambda x: seen.append(use_library_op()) or x)(torch.ones(2))  # functorch needs setup_context
    assert seen == [True, True]


def test_direct_twin_completes_defaults_and_sets_up_its_context() -> None:
    """The twin's forward fills omitted trailing arguments from the op's defaults (bound once, not per call)
    and hands ``setup_context`` the completed inputs and the output."""
    contexts = []

    def scale(x: torch.Tensor, factor: float = 3.0) -> torch.Tensor:
        return x * factor

    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        contexts.append((inputs[1:], output.shape))
        ctx.factor = inputs[1]

    apply = direct_autograd(scale, setup_context, lambda ctx, grad: (grad * ctx.factor, None))
    x = torch.ones(2, requires_grad=True)
    (grad,) = torch.autograd.grad(apply(x).sum(), x)
    assert torch.equal(grad, torch.full((2,), 3.0)) and contexts == [((3.0,), (2,))]
    (grad,) = torch.autograd.grad(apply(x, 0.5).sum(), x)
    assert torch.equal(grad, torch.full((2,), 0.5))
    with pytest.raises(TypeError, match="positional parameters only"):
        direct_autograd(lambda x, *, factor: x, setup_context, lambda ctx, grad: grad)


def _coupling_and_mix(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y, logdet = affine_coupling(x, t, r, "sigmoid", b_start=2)
    return channel_mix(y, w).square().sum() + logdet.sum()


def test_direct_twins_match_the_library_ops_and_dispatch_modes_see_the_ops() -> None:
    """On the interpreter: the eager call (direct twins) and the call under a dispatch mode (the library ops)
    give bitwise equal values and gradients, and the mode sees the fused ops whole, forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 4, generator=g, requires_grad=True)
    t, r = (torch.randn(2, 3, 3, 4, generator=g, requires_grad=True) for _ in range(2))
    w = (torch.eye(5) + 0.1 * torch.randn(5, 5, generator=g)).requires_grad_()
    with fastflow.backend("interpret"):
        direct = _coupling_and_mix(x, t, r, w)
        direct_grads = torch.autograd.grad(direct, (x, t, r, w))
        with _OpNames() as mode:
            library = _coupling_and_mix(x, t, r, w)
            library_grads = torch.autograd.grad(library, (x, t, r, w))
    for a, b in zip((direct, *direct_grads), (library, *library_grads)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for name in ("fastflow.coupling_fwd", "fastflow.coupling_bwd", "fastflow.channel_mix.", "channel_mix_backward"):
        assert any(name in seen for seen in mode.names), (name, mode.names)


def test_direct_ieee_mix_matches_the_library_op_and_is_twice_differentiable(monkeypatch) -> None:
    monkeypatch.setattr(channel_mix_module, "tf32_applies", lambda x: True)  # CPU tensors on CUDA's IEEE path
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(channel_mix_ref, (x, weight, bias))
    direct = channel_mix_ref(x, weight, bias)
    with _OpNames() as mode:
        library = channel_mix_ref(x, weight, bias)
    assert any("conv1x1_ieee" in name for name in mode.names)
    torch.testing.assert_close(direct, library, atol=0, rtol=0)


@pytest.mark.parametrize("library", [False, True])
@pytest.mark.parametrize("loss", ["square", "linear"])
def test_fused_backward_is_not_differentiated_again(library: bool, loss: str) -> None:
    """A double backward through a fused op raises (the library op at its second backward, the direct twin
    already when the first runs with create_graph=True), never gives a silent zero or constant gradient: also
    for a loss linear in the outputs, whose incoming gradients are constants (the first gradient still depends
    on the inputs, through the saved tensors)."""
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    t, r = (torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with fastflow.backend("interpret"), _OpNames() if library else contextlib.nullcontext():
        y, logdet = affine_coupling(x, t, r, "sigmoid", b_start=2)
        total = y.square().sum() + logdet.sum() if loss == "square" else logdet.sum()
        with pytest.raises(RuntimeError, match="no double backward|no autograd formula"):
            (grad_x,) = torch.autograd.grad(total, x, create_graph=True)
            torch.autograd.grad(grad_x.square().sum(), (x, t, r), allow_unused=True)


def test_fused_spline_log_det_gradient_is_not_differentiated_again() -> None:
    """A gradient penalty on the spline's log-det (the review's case: its first gradient came back without a
    graph on the kernel path, so the penalty's gradient was silently dropped)."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    with fastflow.backend("interpret"):
        _, logdet = rq_spline(x, raw, 3)
        with pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.grad(logdet.sum(), x, create_graph=True)


def _batched_jacobian_cases() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(0)
    x, t, r = (torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    raw = torch.randn(2, 4, 3 * 4 - 1, generator=gen, dtype=torch.float64)
    image, weight = torch.randn(2, 3, 2, 2, generator=gen, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    return {
        "coupling": (lambda v: affine_coupling(v, t, r)[0], x),
        "rq_spline": (lambda v: rq_spline(v, raw, 4, 3.0)[0], x),
        "channel_mix": (lambda v: channel_mix(v, weight, None), image),
        "rq_spline_inverse": (lambda v: rq_spline_inverse(v, raw, 4, 3.0)[0], x),  # a fused backward too
    }


@pytest.mark.parametrize("op", ["coupling", "rq_spline", "rq_spline_inverse", "channel_mix"])
def test_batched_gradients_through_a_fused_op_name_the_way_out(op: str) -> None:
    """autograd's batched gradients (jacobian(vectorize=True), is_grads_batched=True) reached the kernels, which
    failed with 'Cannot access storage of BatchedTensorImpl' (or a missing batching rule); now a RuntimeError
    names the op and what works: torch.func.jacrev (the ops run their eager twins under it) gives the eager
    Jacobian."""
    fn, inp = _batched_jacobian_cases()[op]
    with fastflow.backend("eager"):
        want = torch.autograd.functional.jacobian(fn, inp, vectorize=True)
    with fastflow.backend("interpret"):
        with pytest.raises(RuntimeError, match=f"fused {op} has no batched backward.*torch.func.jacrev"):
            torch.autograd.functional.jacobian(fn, inp, vectorize=True)
        torch.testing.assert_close(torch.func.jacrev(fn)(inp), want)
        torch.testing.assert_close(torch.autograd.functional.jacobian(fn, inp), want)  # unbatched: the kernels


def test_an_unbatched_backward_error_is_not_blamed_on_batching() -> None:
    """The batched-gradient message is for batched gradients only: any other backward error passes unchanged."""

    def backward(ctx, grad):
        raise RuntimeError("boom from the kernel")

    apply = direct_autograd(lambda x: x * 2, lambda ctx, inputs, output: None, backward, name="toy")
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="^boom from the kernel$"):
        torch.autograd.grad(apply(x).sum(), x)


def test_compiled_fused_ops_follow_a_new_size(target) -> None:
    """``torch.compile``'s dynamic shapes (a second size marks a dimension dynamic) reach the ops' fake kernels and
    launch geometry as SymInts: they specialise (a guard) instead of failing on the geometry cache."""
    backend, device = target
    torch._dynamo.reset()

    def objective(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y, logdet = affine_coupling(x, t, r)
        z, spline_logdet = rq_spline(y.flatten(1), r.flatten(1)[:, :, None].expand(-1, -1, 23).contiguous(), 8)
        return channel_mix(z.view_as(x), w).square().sum() + logdet.sum() + spline_logdet.sum()

    compiled = torch.compile(objective, backend="aot_eager", fullgraph=True)
    for side in (3, 5, 6):
        inputs = [torch.randn(2, 4, side, side, device=device) for _ in range(3)] + [torch.randn(4, 4, device=device)]
        with fastflow.backend(backend):
            got = compiled(*inputs)
            with fastflow.backend("eager"):
                want = objective(*inputs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


_SYMBOLIC_TRACE = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from fastflow.ops import channel_mix as M, coupling as C, spline as S
c, s, m = (ops._define_ops(name, traceable=True) for ops, name in ((C, "t_c"), (S, "t_s"), (M, "t_m")))
image = lambda: torch.randn(2, 3, 5, 5)
for fn, args in (
    (lambda a, b, r: c.fwd(a, b, r, "sigmoid", None), [image() for _ in range(3)]),
    (lambda a, b, r, g, l: c.bwd(a, b, r, g, l, "exp", True, None), [image() for _ in range(4)] + [torch.randn(2)]),
    (lambda a, r: s.fwd(a, r, 3.0, 1e-3, 1e-3, 1e-3), [torch.randn(4, 3), torch.randn(4, 3, 23)]),
    (lambda x, w, b: m.mix(x, w, b), [image(), torch.randn(3, 3), torch.randn(3)]),
    (lambda g, x, w: m.backward(g, x, w), [image(), image(), torch.randn(3, 3)]),
):
    make_fx(fn, tracing_mode="symbolic")(*args)
print("traced")
"""


def test_the_triton_op_registration_traces_with_symbolic_shapes() -> None:
    """What a CUDA build registers (``torch.library.triton_op``, whose fake kernel is the op's own launch code)
    traces with every size symbolic; without the interpreter (no GPU needed to trace), in a fresh process."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    if not hasattr(torch.library, "triton_op"):
        pytest.skip("torch.library.triton_op needs torch >= 2.6")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", _SYMBOLIC_TRACE], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "traced" in result.stdout, result.stderr[-3000:]


def test_functorch_transforms_run_the_eager_twins(target) -> None:
    """``torch.func.grad`` / ``jacrev`` / ``vmap`` through the public ops on a kernel backend give eager's results:
    the ops resolve to their eager twins under the transforms (a fused op's autograd wrapper refuses grad
    transforms)."""
    backend, device = target
    x, t, r = torch.randn(3, 2, 4, 3, 3, device=device, dtype=torch.float64).unbind(0)
    weight = torch.randn(4, 4, device=device, dtype=torch.float64)

    def coupling_loss(v: torch.Tensor) -> torch.Tensor:
        y, logdet = affine_coupling(x, v, r)
        return y.square().sum() + logdet.sum()

    def mixed(v: torch.Tensor) -> torch.Tensor:
        return channel_mix(v[None], weight)[0]

    results = {}
    for name in ("eager", backend):
        with fastflow.backend(name):
            results[name] = (
                torch.func.grad(coupling_loss)(t),
                torch.func.jacrev(lambda v: rq_spline(v, r.flatten(1)[:, :, None].expand(-1, -1, 8), 3)[1])(
                    x.flatten(1)
                ),
                torch.func.vmap(mixed)(x),
            )
    for got, want in zip(results[backend], results["eager"]):
        torch.testing.assert_close(got, want)
