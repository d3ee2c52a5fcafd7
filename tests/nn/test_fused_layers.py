"""Layers and models on the Triton kernels (interpreter on the CPU) against their eager twins: same
state_dict, same outputs, log-dets and gradients; reversible backprop through the fused paths."""

from __future__ import annotations

import copy

import pytest
import torch

import fastflow
from fastflow.backend import interpreter_enabled
from fastflow.models import Glow, RealNVP
from fastflow.nn import ActNorm, AdditiveCoupling, AffineCoupling, FlowSequential, FlowStep, InvConv1x1, Squeeze
from tests.helpers import loss_and_grads, perturb_parameters

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)")


def _outputs_and_grads(module, x, backend):
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with fastflow.backend(backend):
        y, logdet = module(x)
        (y.square().sum() + logdet.sum()).backward()
        x_back, inv_logdet = module.inverse(y.detach())
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return y.detach(), logdet.detach(), x.grad, grads, x_back, inv_logdet


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlowStep(6, hidden=8),
        lambda: FlowStep(5, hidden=8, scale="exp", lu=False),
        lambda: FlowStep(6, hidden=8, coupling="additive"),
        lambda: AffineCoupling(3, hidden=8, scale="exp", mask="checkerboard"),
        lambda: AdditiveCoupling(4, hidden=8, parity=1),
    ],
)
def test_fused_layer_matches_eager(make):
    module = make().train()
    x = torch.randn(3, module.layers[0].num_channels if hasattr(module, "layers") else module.num_channels, 6, 5)
    module(x)  # ActNorm init
    perturb_parameters(module, 0.1)
    eager = _outputs_and_grads(module, x, "eager")
    fused = _outputs_and_grads(module, x, "interpret")
    for name, e, f in zip(("y", "logdet", "grad_x"), eager[:3], fused[:3]):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5, msg=name)
    for name, g in eager[3].items():
        torch.testing.assert_close(fused[3][name], g, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(fused[4], x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[5], -fused[1], atol=1e-4, rtol=1e-5)


def test_fused_flow_step_is_a_drop_in_for_the_eager_layer_chain():
    step = FlowStep(4, hidden=8).train()
    chain = FlowSequential(ActNorm(4), InvConv1x1(4), AffineCoupling(4, hidden=8)).train()
    x = torch.randn(2, 4, 4, 4)
    step(x)
    perturb_parameters(step, 0.1)
    assert list(step.state_dict()) == list(chain.state_dict())
    chain.load_state_dict(step.state_dict())
    with fastflow.backend("eager"):
        y_chain, logdet_chain = chain(x)
    with fastflow.backend("interpret"):
        y_step, logdet_step = step(x)
    torch.testing.assert_close(y_step, y_chain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet_step, logdet_chain, atol=1e-4, rtol=1e-5)


def test_actnorm_init_is_the_same_on_the_fused_path():
    torch.manual_seed(3)
    fused, eager = FlowStep(4, hidden=8).train(), FlowStep(4, hidden=8).train()
    eager.load_state_dict(fused.state_dict())
    x = 2.0 + 3.0 * torch.randn(8, 4, 4, 4)
    with fastflow.backend("interpret"):
        fused(x)
    with fastflow.backend("eager"):
        eager(x)
    torch.testing.assert_close(fused.actnorm.bias, eager.actnorm.bias)
    torch.testing.assert_close(fused.actnorm.logs, eager.actnorm.logs)


def _flat(results):
    """The tensors of :func:`_outputs_and_grads`, parameter gradients in parameter order."""
    y, logdet, grad_x, grads, x_back, inv_logdet = results
    return [y, logdet, grad_x, *grads.values(), x_back, inv_logdet]


class _OneByOne(torch.nn.Module):
    """The layers of ``chain`` run one at a time, each FlowStep computing its own weights."""

    def __init__(self, chain: FlowSequential) -> None:
        super().__init__()
        self.chain = chain

    def forward(self, x):
        total = 0
        for layer in self.chain.layers:
            x, logdet = layer(x)
            total = total + logdet
        return x, total

    def inverse(self, y):
        total = 0
        for layer in reversed(self.chain.layers):
            y, logdet = layer.inverse(y)
            total = total + logdet
        return y, total


def _level() -> FlowSequential:
    """A Glow level: a squeeze, then three FlowSteps."""
    return FlowSequential(Squeeze(), *[FlowStep(8, hidden=4) for _ in range(3)])


def test_level_folds_every_step_at_once_after_actnorm_init():
    """On the kernels a level folds the ActNorms of all its steps into their weights in one batched computation
    (float64: the steps' own folds to rounding), and only once each ActNorm has initialised from its input."""
    level = _level().double().train()
    reference = _OneByOne(copy.deepcopy(level))
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    with fastflow.backend("interpret"):
        first, first_ref = level(x), reference(x)  # the first batch initialises every ActNorm
    for got, want in zip((*first, *level.parameters()), (*first_ref, *reference.parameters())):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    perturb_parameters(level, 0.2)
    reference.chain.load_state_dict(level.state_dict())
    batched, one_by_one = (_flat(_outputs_and_grads(m, x, "interpret")) for m in (level, reference))
    for got, want in zip(batched, one_by_one):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "interpret"])
def test_level_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) traces a level of FlowSteps (batched weights, fused or eager mixes and
    couplings) forward and inverse without a graph break; the compiled forward and backward match eager."""
    level = _level().train()
    x = torch.randn(2, 2, 4, 6)
    level(x)  # ActNorm init: a one-off host read
    perturb_parameters(level, 0.1)
    with fastflow.backend(backend):
        for fn, arg in ((level, x), (level.inverse, torch.randn(2, 8, 2, 3))):
            explanation = torch._dynamo.explain(fn)(arg)
            assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(level, fullgraph=True, backend="aot_eager")
    for got, want in zip(*(_flat(_outputs_and_grads(m, x, backend)) for m in (compiled, level))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [lambda: Glow(2, 4, levels=2, steps=3, hidden=8), lambda: RealNVP(2, 4, scales=2, hidden=8)],
)
def test_model_reversible_on_kernels_matches_standard_eager(make):
    torch.manual_seed(0)
    model = make().train()
    x = torch.rand(3, *model.image_shape) - 0.5
    model.log_prob(x)
    perturb_parameters(model, 0.05)
    results = {
        "eager": loss_and_grads(model, x, "eager", reversible=False),
        "interpret": loss_and_grads(model, x, "interpret", reversible=True),
    }
    torch.testing.assert_close(results["interpret"][0], results["eager"][0], rtol=1e-5, atol=0)
    for g_fused, g_eager in zip(results["interpret"][1], results["eager"][1]):
        torch.testing.assert_close(g_fused, g_eager, rtol=1e-3, atol=1e-5)
