"""The ViT's MLP that recomputes GELU in backward (fastflow/nn/gelu_mlp.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastflow.nn.gelu_mlp import gelu_mlp


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 20), nn.GELU(), nn.Linear(20, 5)).to(dtype)


def test_gradcheck_float64_of_input_weights_and_biases() -> None:
    mlp = _mlp(torch.float64)
    names = [name for name, _ in mlp.named_parameters()]
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in mlp.parameters()]

    def run(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(_Fused(mlp), dict(zip(["mlp." + n for n in names], params)), (x,))

    assert torch.autograd.gradcheck(run, (x, *params))


class _Fused(nn.Module):
    def __init__(self, mlp: nn.Sequential) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(x, self.mlp[0], self.mlp[2])


@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6), (1, 1, 1, 6), (0, 6), (2, 0, 6)])
def test_matches_the_sequential_mlp(shape: tuple[int, ...]) -> None:
    mlp = _mlp()
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(*shape[:-1], 5)
    want = mlp(x)
    want_grads = torch.autograd.grad(want, [x, *mlp.parameters()], grad)
    got = gelu_mlp(x, mlp[0], mlp[2])
    got_grads = torch.autograd.grad(got, [x, *mlp.parameters()], grad)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def _saved_bytes(fn) -> int:
    sizes = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values())


def test_keeps_one_hidden_size_tensor_for_backward_not_two() -> None:
    mlp = _mlp()
    x = torch.randn(64, 6, requires_grad=True)
    hidden_bytes = 64 * 20 * 4
    saved_plain, saved = _saved_bytes(lambda: mlp(x)), _saved_bytes(lambda: gelu_mlp(x, mlp[0], mlp[2]))
    assert saved_plain - saved == hidden_bytes


def test_bf16_autocast_computes_low_and_returns_gradients_in_the_parameters_dtype() -> None:
    mlp = _mlp()
    x = torch.randn(2, 3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = gelu_mlp(x, mlp[0], mlp[2]), mlp(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got.float().sum(), [x, *mlp.parameters()])
    want_grads = torch.autograd.grad(want.float().sum(), [x, *mlp.parameters()])
    for g, w, p in zip(grads, want_grads, [x, *mlp.parameters()]):
        assert g.dtype == p.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


def test_float64_under_autocast_stays_float64_as_the_plain_mlp() -> None:
    """Autocast casts no float64 tensor; gelu_mlp cast them all, so a float64 model's MLP ran in bfloat16."""
    mlp = _mlp().double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = gelu_mlp(x, mlp[0], mlp[2]), mlp(x)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.sum(), [x, *mlp.parameters()])
    for g, w in zip(grads, torch.autograd.grad(want.sum(), [x, *mlp.parameters()])):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_needs_biases() -> None:
    with pytest.raises(ValueError, match="biases"):
        gelu_mlp(torch.randn(2, 6), nn.Linear(6, 20, bias=False), nn.Linear(20, 5))


def test_compiles_forward_and_backward() -> None:
    mlp = _mlp()
    x = torch.randn(4, 6, requires_grad=True)
    compiled = torch.compile(lambda x: gelu_mlp(x, mlp[0], mlp[2]), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), mlp(x))
    (g,) = torch.autograd.grad(compiled(x).sum(), [x])
    (w,) = torch.autograd.grad(mlp(x).sum(), [x])
    torch.testing.assert_close(g, w)


def test_skips_the_gradients_no_input_needs() -> None:
    mlp = _mlp()
    mlp[0].weight.requires_grad_(False)
    x = torch.randn(5, 6)  # no gradient wanted for the input either
    gelu_mlp(x, mlp[0], mlp[2]).sum().backward()
    want = [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
    mlp.zero_grad(set_to_none=True)
    mlp(x).sum().backward()
    assert mlp[0].weight.grad is None
    for g, w in zip(want, [p.grad for p in mlp.parameters() if p.requires_grad]):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_second_backward_raises_and_functorch_runs_the_plain_mlp() -> None:
    mlp = _mlp(torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(gelu_mlp(x, mlp[0], mlp[2]).sum(), [x], create_graph=True)
    got = torch.func.grad(lambda v: gelu_mlp(v, mlp[0], mlp[2]).sum())(x.detach())
    want = torch.func.grad(lambda v: mlp(v).sum())(x.detach())
    torch.testing.assert_close(got, want)


def test_compiles_with_inductor() -> None:
    mlp = _mlp()
    x = torch.randn(4, 6, requires_grad=True)
    compiled = torch.compile(lambda x: gelu_mlp(x, mlp[0], mlp[2]), fullgraph=True)
    (g,) = torch.autograd.grad(compiled(x).sum(), [x])
    (w,) = torch.autograd.grad(mlp(x).sum(), [x])
    torch.testing.assert_close(g, w)


def test_batched_backward_matches_the_sequential_mlp() -> None:
    """vmap over the backward (``is_grads_batched``, ``jacobian(vectorize=True)``) has no out= products: the fused
    backward takes its out-of-place branch and agrees with the plain composition."""
    mlp = _mlp(torch.float64)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    grads = torch.randn(4, 3, 5, dtype=torch.float64)
    inputs = [x, mlp[0].weight, mlp[2].bias]
    fused = torch.autograd.grad(gelu_mlp(x, mlp[0], mlp[2]), inputs, grads, is_grads_batched=True)
    plain = torch.autograd.grad(mlp(x), inputs, grads, is_grads_batched=True)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)
    jacobian = torch.autograd.functional.jacobian(lambda v: gelu_mlp(v, mlp[0], mlp[2]), x.detach(), vectorize=True)
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(mlp, x.detach(), vectorize=True))
