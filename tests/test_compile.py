"""torch.compile traces every model preset whole, forward and backward, standard and reversible (issue 13, item 4).

On the CPU with Dynamo's own backends (no C++ compiler needed): ``torch._dynamo.explain`` counts the graph
breaks of the training objective (an ``autograd.Function`` whose backward Dynamo cannot trace breaks the
graph at its call, so the count covers the backward's tracing too), and ``torch.compile(fullgraph=True)``
with the ``aot_eager`` backend, which traces the joint forward+backward graph, must give eager's loss and
gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch._dynamo.utils import counters

from fastflow.models import NICE, FlowModel, Glow, Jet, RealNVP
from tests.helpers import perturb_parameters

PRESETS: dict[str, Callable[[bool], tuple[FlowModel, torch.Tensor]]] = {
    "glow": lambda reversible: (Glow(3, 8, levels=2, steps=2, hidden=8, reversible=reversible), torch.rand(2, 3, 8, 8)),
    "realnvp": lambda reversible: (RealNVP(3, 8, scales=2, hidden=8, reversible=reversible), torch.rand(2, 3, 8, 8)),
    "jet": lambda reversible: (
        Jet(3, 8, patch_size=2, couplings=3, width=8, depth=1, heads=2, reversible=reversible),
        torch.rand(2, 3, 8, 8),
    ),
    "nice": lambda reversible: (
        NICE(1, 4, couplings=2, hidden=8, depth=2, reversible=reversible),
        torch.rand(2, 1, 4, 4),
    ),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _model(preset: str, reversible: bool) -> tuple[FlowModel, torch.Tensor]:
    """A tiny preset in training mode, ActNorm initialised (and the first-batch range check done) eagerly."""
    torch.manual_seed(0)
    model, x = PRESETS[preset](reversible)
    x = x - 0.5
    model.train()
    with torch.no_grad():
        model.bits_per_dim(x)
    return model, x


def _objective(model: FlowModel) -> Callable[[torch.Tensor], torch.Tensor]:
    def objective(x: torch.Tensor) -> torch.Tensor:
        return model.bits_per_dim(x).mean()

    return objective


def _break_reasons(explanation: object) -> str:
    """Where and why Dynamo broke the graph: explain's reasons (with the user frame), or, where explain
    records none (a break while speculating an ``autograd.Function``'s backward), Dynamo's counters."""
    reasons = [
        f"{reason.reason.splitlines()[0]} at {reason.user_stack[-1] if reason.user_stack else '?'}"
        for reason in explanation.break_reasons  # type: ignore[attr-defined]
    ]
    reasons += [
        f"{count}x {reason.splitlines()[0]} {reason.splitlines()[1:2]}"
        for reason, count in counters["graph_break"].items()
    ]
    return "\n".join(reasons)


# Reversible mode is not traced whole yet: the chain's backward recomputes each layer with torch.autograd.backward,
# which Dynamo skips (7 to 9 breaks per model), and on torch 2.13 fullgraph first fails on the handed output's
# version check (a data-dependent guard). strict: the mark must go when that is fixed.
REVERSIBLE_BREAKS = pytest.mark.xfail(
    strict=True, reason="reversible backward: torch.autograd.backward and the output's version check break graphs"
)
MODES = pytest.mark.parametrize(
    "reversible", [False, pytest.param(True, marks=REVERSIBLE_BREAKS)], ids=["standard", "reversible"]
)


@MODES
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_objective_traces_without_graph_breaks(preset, reversible):
    model, x = _model(preset, reversible)
    explanation = torch._dynamo.explain(_objective(model))(x)
    assert explanation.graph_break_count == 0, _break_reasons(explanation)
    assert explanation.graph_count == 1


@MODES
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fullgraph_compile_gives_eager_loss_and_gradients(preset, reversible):
    model, x = _model(preset, reversible)
    with torch.no_grad():  # off the identity start: zero-initialised conditioner outputs pass no gradient back
        perturb_parameters(model, 0.05)
    objective = _objective(model)
    want = objective(x)
    want.backward()
    want_grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    zero = [name for (name, _), g in zip(model.named_parameters(), want_grads) if g is None or not g.abs().max() > 0]
    assert not zero, f"parameters without a gradient to compare: {zero}"
    model.zero_grad(set_to_none=True)

    got = torch.compile(objective, backend="aot_eager", fullgraph=True)(x)
    got.backward()

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for (name, p), want_grad in zip(model.named_parameters(), want_grads):
        assert (p.grad is None) == (want_grad is None), name
        if want_grad is not None:
            torch.testing.assert_close(p.grad, want_grad, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_a_compiled_reversible_chain_does_not_break_on_its_anchor():
    """The chain's forward reads its anchor's ``grad_fn`` (whether a backward takes the parameters' gradients)
    only eagerly: Dynamo cannot trace a ``grad_fn``, which broke every compiled chain's graph once more."""
    model, x = _model("glow", True)
    explanation = torch._dynamo.explain(_objective(model))(x)
    assert "grad_fn" not in _break_reasons(explanation)


def test_a_compiled_reversible_backward_does_not_break_on_the_batched_gradient_check():
    """The chain's backward asks whether its gradients are autograd's batched ones (is_grads_batched), through a
    functorch query Dynamo cannot trace: it broke every compiled chain's graph twice more (the census's reference
    step, compiled and reversible, went from 3 breaks to 14)."""
    model, x = _model("glow", True)
    explanation = torch._dynamo.explain(_objective(model))(x)
    assert "is_legacy_batchedtensor" not in _break_reasons(explanation)


def test_compiling_the_model_compiles_its_log_prob():
    """``torch.compile(model)`` compiles ``forward`` only: a FlowModel's forward is its log_prob (before, there was
    none, and ``compiled.log_prob`` ran eagerly, compiling nothing)."""
    model, x = _model("glow", False)
    want = model.log_prob(x)
    torch.testing.assert_close(model(x), want, atol=0, rtol=0)
    explanation = torch._dynamo.explain(torch.compile(model, backend="aot_eager", fullgraph=True))(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
