"""Reversible backprop of any stack of layers on vectors or images, custom conditioners and a context included:
the loss and the gradients w.r.t. the input, the context and every parameter equal standard backprop (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastflow.backend import interpreter_enabled
from fastflow.nn import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowSequential,
    FlowStep,
    InvertibleLinear,
    Permutation,
    Squeeze,
)
from fastflow.nn.tiling import Tiling
from tests.helpers import HaloConv, chain_loss_and_grads, perturb_parameters, tanh_mlp


def _vector_chain() -> FlowSequential:
    """Every vector layer, fused backward (couplings, FlowStep) or recompute (the rest), a nested chain too."""
    return FlowSequential(
        ActNorm(5),
        FlowStep(5, 8, context_features=3, vectors=True),
        Permutation(5, "random"),
        AffineCoupling(5, scale="exp", subnet=tanh_mlp, context_features=3, vectors=True, parity=1),
        InvertibleLinear(5, lu=False),
        FlowSequential(AdditiveCoupling(5, 8, context_features=3, vectors=True), FlowStep(5, 8, vectors=True)),
    )


def _image_chain() -> FlowSequential:
    return FlowSequential(
        AffineCoupling(2, 8, scale="exp", mask="checkerboard", context_features=3),
        Squeeze(),
        FlowStep(8, 8, context_features=3),
        AdditiveCoupling(8, subnet=HaloConv, context_features=3, parity=1),
        Permutation(8, "random"),
    )


CHAINS = {
    "vectors": (_vector_chain, (4, 5), (4, 3)),
    "vectors_flattened_context": (_vector_chain, (4, 5), (4, 1, 3)),
    "images": (_image_chain, (3, 2, 4, 6), (3, 3)),
}


def _initialised(make, x, context) -> FlowSequential:
    chain = make().double().train()
    with torch.no_grad():
        chain(x, context)  # ActNorm's data-dependent init
    perturb_parameters(chain, 0.2)
    return chain


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_reversible_gradients_with_context_equal_standard_backprop(name):
    make, x_shape, c_shape = CHAINS[name]
    x, context = torch.randn(*x_shape, dtype=torch.float64), torch.randn(*c_shape, dtype=torch.float64)
    chain = _initialised(make, x, context)
    standard = chain_loss_and_grads(chain, x, context, reversible=False)
    reversible = chain_loss_and_grads(chain, x, context, reversible=True)
    assert standard[2].abs().max() > 1e-6, "the context gradient must not be trivially zero"
    for i, (got, want) in enumerate(zip(reversible, standard)):
        assert got is not None, f"gradient {i} missing"
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8, msg=lambda m, i=i: f"result {i}: {m}")


def test_reversible_tiled_image_chain_with_context_equals_standard():
    make, x_shape, c_shape = CHAINS["images"]
    x, context = torch.randn(*x_shape, dtype=torch.float64), torch.randn(*c_shape, dtype=torch.float64)
    chain = _initialised(make, x, context)
    standard = chain_loss_and_grads(chain, x, context, reversible=False)
    for module in chain.modules():
        if isinstance(module, (AffineCoupling, AdditiveCoupling)):
            module.tiling = Tiling(tile_size=2)
    tiled = chain_loss_and_grads(chain, x, context, reversible=True)
    for got, want in zip(tiled, standard):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_autograd_grad_reaches_the_context_through_a_reversible_chain():
    make, x_shape, c_shape = CHAINS["vectors"]
    x, context = torch.randn(*x_shape, dtype=torch.float64), torch.randn(*c_shape, dtype=torch.float64)
    chain = _initialised(make, x, context)
    grads = {}
    for reversible in (False, True):
        chain.reversible = reversible
        leaf = context.clone().requires_grad_(True)
        y, logdet = chain(x, leaf)
        (grads[reversible],) = torch.autograd.grad(y.sum() + logdet.sum(), leaf)
    torch.testing.assert_close(grads[True], grads[False], atol=1e-10, rtol=1e-8)


def test_a_context_without_grad_and_a_chain_that_ignores_it():
    chain = FlowSequential(FlowStep(4, 8, vectors=True), Permutation(4), reversible=True).double().train()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    context = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y, logdet = chain(x, context)  # no layer uses it: ignored, and it gets no gradient
    (y.sum() + logdet.sum()).backward()
    assert x.grad is not None and context.grad is None
    conditional = FlowSequential(FlowStep(4, 8, context_features=2, vectors=True), reversible=True).double()
    y, logdet = conditional(x, context.detach())
    (y.sum() + logdet.sum()).backward()


class _OldStyleLayer(nn.Module):
    """A user layer written before contexts: ``forward(x)`` and ``inverse(y)`` only."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, x):
        return x * self.log_scale.exp(), (self.log_scale * x.shape[1]).expand(x.shape[0])

    def inverse(self, y):
        return y * (-self.log_scale).exp(), -(self.log_scale * y.shape[1]).expand(y.shape[0])


def test_a_layer_without_context_arguments_still_runs_in_an_unconditional_chain():
    chain = FlowSequential(_OldStyleLayer(), FlowStep(4, 8, vectors=True).double()).train()
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        chain(x)
    results = {}
    for reversible in (False, True):
        chain.reversible = reversible
        chain.zero_grad(set_to_none=True)
        y, logdet = chain(x)
        (y.square().sum() - logdet.sum()).backward()
        results[reversible] = [p.grad.clone() for p in chain.parameters()]
    for got, want in zip(results[True], results[False]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)")
def test_reversible_vector_chain_with_context_on_the_kernels_equals_standard_eager():
    make, x_shape, c_shape = CHAINS["vectors"]
    x, context = torch.randn(*x_shape, dtype=torch.float64), torch.randn(*c_shape, dtype=torch.float64)
    chain = _initialised(make, x, context)
    eager = chain_loss_and_grads(chain, x, context, reversible=False)
    fused = chain_loss_and_grads(chain, x, context, reversible=True, backend="interpret")
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)
