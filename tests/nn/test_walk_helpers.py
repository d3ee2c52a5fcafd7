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

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return super().__torch_function__(func, types, args, kwargs or {})


def _spied(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of the engine entry point and of the public function, both still doing their work."""
    from fastflow.nn import nested_backward as module

    calls = {"engine": 0, "public": 0}
    engine, public = module._ENGINE_RUN_BACKWARD, torch.autograd.backward

    def counted(name, fn):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(module, "_ENGINE_RUN_BACKWARD", counted("engine", engine))
    monkeypatch.setattr(torch.autograd, "backward", counted("public", public))
    return calls


def test_nested_backward_calls_the_engine_for_tensors_and_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spied(monkeypatch)
    weight = nn.Parameter(torch.randn(3))
    x = torch.randn(3, requires_grad=True)
    nested_backward([x * 2], [torch.ones(3)], [x])
    nested_backward([weight], [torch.ones(3)])  # the walk hands parameters their gradients as outputs
    assert calls == {"engine": 2, "public": 0}
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    torch.testing.assert_close(weight.grad, torch.ones(3))


def test_nested_backward_hands_subclasses_and_non_tensor_gradients_to_the_public_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _spied(monkeypatch)
    x = torch.randn(3, requires_grad=True)
    nested_backward([(x * 2).as_subclass(_Logged)], [torch.ones(3)])
    # once, or twice where torch's backward dispatches to __torch_function__ itself (newer torch), which calls it again
    assert calls["engine"] == 0 and calls["public"] >= 1
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))
    public = calls["public"]
    nested_backward([(x * 3).sum()], [None])  # type: ignore[list-item]  # a scalar's None: torch's ones
    assert calls == {"engine": 0, "public": public + 1}
    torch.testing.assert_close(x.grad, torch.full((3,), 5.0))


def test_nested_backward_refuses_empty_inputs_as_torch_does() -> None:
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inputs"):
        torch.autograd.backward([x * 2], [torch.ones(3)], inputs=[])
    with pytest.raises(RuntimeError, match="must not be empty"):
        nested_backward([x * 2], [torch.ones(3)], [])
    assert x.grad is None


class _OwnParameters(nn.Module):
    """A module that says itself which tensors are its parameters (and its modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.extra = torch.zeros(2, requires_grad=True)  # no registered parameter

    def parameters(self, recurse: bool = True):  # type: ignore[no-untyped-def]
        yield from super().parameters(recurse)
        yield self.extra

    def modules(self):  # type: ignore[no-untyped-def]
        yield self


def test_walks_take_a_module_s_own_parameters_and_modules() -> None:
    own = _OwnParameters()
    assert trainable_parameters(own)[-1] is own.extra
    assert [id(p) for p in trainable_parameters(own)] == [id(p) for p in own.parameters()]
    assert submodules(own) == [own]


def test_nested_backward_hands_a_subclass_among_the_inputs_to_the_public_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _spied(monkeypatch)
    x = torch.randn(3).as_subclass(_Logged).requires_grad_()
    nested_backward([x.as_subclass(torch.Tensor) * 2], [torch.ones(3)], [x])
    assert calls["engine"] == 0 and calls["public"] >= 1
    torch.testing.assert_close(x.grad.as_subclass(torch.Tensor), torch.full((3,), 2.0))


def test_nested_backward_under_a_torch_func_transform_raises_as_torch_does() -> None:
    def f(w: torch.Tensor) -> torch.Tensor:  # the private engine would run here and free the graph
        y = w * 2
        nested_backward([y], [torch.ones(3)])
        return y.sum()

    with pytest.raises(RuntimeError, match="functorch transform"):
        torch.func.grad(f)(torch.randn(3))


def test_nested_backward_frees_the_graph_as_backward_does() -> None:
    x = torch.randn(4, requires_grad=True)
    y = x.exp()
    nested_backward([y], [torch.ones(4)])
    with pytest.raises(RuntimeError, match="second time"):
        nested_backward([y], [torch.ones(4)])


def test_nested_backward_refuses_a_gradient_the_engine_would_sum_down() -> None:
    x = torch.randn(4, 1, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"gradient 0 has shape \(4, 2\), its output \(4, 1\)"):
        nested_backward([x * 3], [torch.ones(4, 2)])  # the engine alone would sum (4, 2) down to (4, 1)
    assert x.grad is None


def test_nested_backward_counts_gradients_against_outputs() -> None:
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="2 outputs but 1 gradients"):
        nested_backward([x * 2, x * 3], [torch.ones(3)])
