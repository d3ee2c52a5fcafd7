"""The reversible walk's helpers: module-tree walks and the nested backward call, against torch's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastflow.nn.module_walk import submodules, trainable_parameters
from fastflow.nn.nested_backward import nested_backward


def _awkward_tree() -> nn.Module:
    """Shared submodules and parameters, a None parameter and child, frozen parameters, nesting."""
    shared = nn.Linear(3, 3)
    inner = nn.Sequential(nn.Linear(3, 4), shared, nn.ReLU())
    root = nn.Module()
    root.first = inner
    root.again = shared  # a module reached twice
    root.frozen = nn.Linear(4, 2)
    root.frozen.weight.requires_grad_(False)
    root.empty = None
    root.register_parameter("absent", None)
    root.tied = nn.Linear(3, 3)
    root.tied.weight = shared.weight  # a parameter reached twice
    root.own = nn.Parameter(torch.ones(2))
    return root


def test_submodules_are_modules_in_order() -> None:
    root = _awkward_tree()
    assert [id(m) for m in submodules(root)] == [id(m) for m in root.modules()]


def test_trainable_parameters_are_those_of_parameters_in_order() -> None:
    root = _awkward_tree()
    want = [p for p in root.parameters() if p.requires_grad]
    assert [id(p) for p in trainable_parameters(root)] == [id(p) for p in want]
    assert all(id(p) != id(root.frozen.weight) for p in trainable_parameters(root))


def _graph() -> tuple[torch.Tensor, torch.Tensor, nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    return x, out, layer, (out * out).sum(1), torch.randn(4, 2, dtype=torch.float64)


@pytest.mark.parametrize("restricted", [False, True])
def test_nested_backward_accumulates_as_autograd_backward(restricted: bool) -> None:
    grads = []
    for call in (torch.autograd.backward, nested_backward):
        x, out, layer, square, grad_out = _graph()
        x.grad = torch.ones_like(x)  # accumulated into, not replaced
        inputs = [x, layer.weight] if restricted else None
        if call is torch.autograd.backward:
            call([out, square], [grad_out, torch.ones(4, dtype=torch.float64)], inputs=inputs)
        else:
            call([out, square], [grad_out, torch.ones(4, dtype=torch.float64)], inputs)
        grads.append([x.grad, layer.weight.grad, layer.bias.grad])
    for got, want in zip(grads[1], grads[0]):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (grads[1][2] is None) == restricted  # the bias is no input of the restricted call


def test_nested_backward_refuses_a_gradient_of_another_shape() -> None:
    _, out, _, _, _ = _graph()
    with pytest.raises(RuntimeError, match=r"gradient 0 has shape \(4, 1\), its output \(4, 2\)"):
        nested_backward([out], [torch.ones(4, 1, dtype=torch.float64)])


class _Logged(torch.Tensor):
    """A tensor subclass that overrides torch functions: nested_backward hands it to torch.autograd.backward."""

    calls: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        cls.calls.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_nested_backward_hands_subclasses_to_the_public_function() -> None:
    x = torch.randn(3, requires_grad=True)
    out = (x * 2).as_subclass(_Logged)
    _Logged.calls.clear()
    nested_backward([out], [torch.ones(3)])
    assert "backward" in _Logged.calls
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
