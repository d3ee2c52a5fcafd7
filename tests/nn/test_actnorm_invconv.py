"""Tests for fastflow/nn/actnorm_invconv.py: an ActNorm followed by an InvConv1x1 runs as one op in every container,
a FlowStep or a chain built by hand, standard or reversible, on images and vectors."""

from __future__ import annotations

import pytest
import torch

import fastflow
import fastflow.nn.actnorm_invconv as pair_module
from fastflow.backend import interpreter_enabled
from fastflow.nn import ActNorm, AffineCoupling, FlowSequential, FlowStep, InvConv1x1, InvertibleLinear, Squeeze
from fastflow.nn.actnorm_invconv import ActNormInvConv, chain_units
from tests.helpers import perturb_parameters

_NEEDS_INTERPRETER = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)")
BACKENDS = ["eager", pytest.param("interpret", marks=_NEEDS_INTERPRETER)]
SHAPES = {"image": (2, 4, 3, 2), "vector": (3, 4)}


def _by_hand(channels: int, vectors: bool) -> FlowSequential:
    mix = InvertibleLinear(channels) if vectors else InvConv1x1(channels)
    return FlowSequential(ActNorm(channels), mix, AffineCoupling(channels, hidden=8, vectors=vectors))


def _run(module: torch.nn.Module, x: torch.Tensor, backend: str) -> list[torch.Tensor]:
    """Output, log-det, input and parameter gradients, and the inverse, of ``module`` at ``x`` on ``backend``."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with fastflow.backend(backend):
        y, logdet = module(x)
        (y.square().sum() + (logdet * torch.arange(1.0, x.shape[0] + 1, dtype=x.dtype)).sum()).backward()
        x_back, inverse_logdet = module.inverse(y.detach())
    return [y, logdet, x.grad, *(p.grad for p in module.parameters()), x_back, inverse_logdet]


class _Calls:
    """Counts the calls of the fused ops (by the pair unit) and of ActNorm's and InvConv1x1's own forwards."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: dict[str, int] = {}
        for owner, name in (
            (pair_module, "actnorm_invconv"),
            (pair_module, "actnorm_invconv_inverse"),
            (pair_module, "stacked_weights"),
            (ActNorm, "forward"),
            (InvConv1x1, "forward"),
            (ActNorm, "inverse"),
            (InvConv1x1, "inverse"),
        ):
            key = f"{getattr(owner, '__name__', owner)}.{name}"
            monkeypatch.setattr(owner, name, self._counted(key, getattr(owner, name)))

    def _counted(self, key: str, fn):
        def counted(*args, **kwargs):
            self.counts[key] = self.counts.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counted


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(SHAPES))
def test_chain_built_by_hand_is_a_flow_step(kind, backend):
    """``FlowSequential(ActNorm, InvConv1x1, coupling)`` with a FlowStep's weights gives its outputs, log-dets,
    gradients and inverse (float64: to rounding), the ActNorm init included, on the eager and fused paths."""
    torch.manual_seed(0)
    vectors = kind == "vector"
    step = FlowStep(4, hidden=8, vectors=vectors).double().train()
    chain = _by_hand(4, vectors).double().train()
    assert list(chain.state_dict()) == list(step.state_dict())
    chain.load_state_dict(step.state_dict())
    x = 1.5 + 2.0 * torch.randn(*SHAPES[kind], dtype=torch.float64)
    with fastflow.backend(backend):
        first = [*step(x), *chain(x)]  # the data-dependent init, on each
    torch.testing.assert_close(first[2:], first[:2], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(chain.state_dict(), step.state_dict(), atol=0, rtol=0)
    perturb_parameters(step, 0.2)
    chain.load_state_dict(step.state_dict())
    for got, want in zip(_run(chain, x, backend), _run(step, x, backend), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reversible", [False, True])
def test_chain_built_by_hand_runs_the_fused_op(monkeypatch, backend, reversible):
    """The pair runs as the one op (folded on the kernels), never as ActNorm's and InvConv1x1's own forwards, in
    standard and reversible training (where its backward is in closed form: no rebuild through the op, no
    recompute); a chain's pairs compute their weights in one batched call per direction (reversible training: the
    forward, and in backward the rebuild's and the gradients')."""
    torch.manual_seed(0)
    chain = FlowSequential(*_by_hand(4, False).layers, *_by_hand(4, False).layers, reversible=reversible).train()
    x = torch.randn(*SHAPES["image"])
    chain(x)  # ActNorm init: each pair then computes its own weights
    perturb_parameters(chain, 0.1)
    calls = _Calls(monkeypatch)
    _run(chain, x, backend)
    # each pair runs forward and in the chain's inverse; reversible: the weights are batched for the forward, the
    # backward's rebuild and its gradients, and the chain's inverse
    assert calls.counts == {
        "fastflow.nn.actnorm_invconv.actnorm_invconv": 2,
        "fastflow.nn.actnorm_invconv.actnorm_invconv_inverse": 2,
        "fastflow.nn.actnorm_invconv.stacked_weights": 1 + 1 + 1 + 1 if reversible else 1 + 1,
    }


@_NEEDS_INTERPRETER
def test_pair_folds_actnorm_into_one_channel_mix(monkeypatch):
    """On the kernels the pair is one ``channel_mix`` with the folded weight and bias, and no ActNorm pass."""
    import fastflow.ops.actnorm_invconv as ops

    mixes = []
    channel_mix = ops.channel_mix
    monkeypatch.setattr(ops, "channel_mix", lambda x, w, b=None: mixes.append(b is not None) or channel_mix(x, w, b))
    monkeypatch.setattr(ops, "actnorm_ref", None)  # the eager twin's ActNorm pass must not run
    chain = FlowSequential(ActNorm(4), InvConv1x1(4)).eval()
    with fastflow.backend("interpret"):
        chain.inverse(chain(torch.randn(2, 4, 3, 3))[0])
    assert mixes == [True, True]


def test_units_pair_only_an_actnorm_directly_before_an_invconv_of_its_width():
    actnorm, conv, coupling = ActNorm(4), InvConv1x1(4), AffineCoupling(4, hidden=8)
    units = chain_units([Squeeze(), actnorm, conv, coupling, InvConv1x1(4), ActNorm(4), ActNorm(2), InvConv1x1(4)])
    kinds = [type(unit).__name__ for unit in units]
    assert kinds == ["Squeeze", "ActNormInvConv", "AffineCoupling", "InvConv1x1", "ActNorm", "ActNorm", "InvConv1x1"]
    assert isinstance(units[1], ActNormInvConv) and units[1].actnorm is actnorm and units[1].invconv is conv
    assert units[1].parameters() == [*actnorm.parameters(), *conv.parameters()]


def test_a_pair_with_hooks_or_its_own_forward_runs_as_its_layers():
    """The fused unit reads the layers' parameters, it does not call them: a layer with a hook, or a subclass with a
    forward of its own, is not fused (its hook fires, its forward runs)."""

    class Clamped(ActNorm):
        def forward(self, x, context=None):
            y, logdet = super().forward(x, context)
            return y.clamp(-1, 1), logdet

    assert isinstance(chain_units([ActNorm(4), InvertibleLinear(4)])[0], ActNormInvConv)
    assert [type(u).__name__ for u in chain_units([Clamped(4), InvConv1x1(4)])] == ["Clamped", "InvConv1x1"]
    seen = []
    hooked = InvConv1x1(4)
    hooked.register_forward_hook(lambda module, args, out: seen.append(out[0].shape))
    chain = FlowSequential(ActNorm(4), hooked).eval()
    assert [type(u).__name__ for u in chain_units(chain.layers)] == ["ActNorm", "InvConv1x1"]
    chain(torch.randn(2, 4, 3, 3))
    assert seen == [torch.Size([2, 4, 3, 3])]
    chain = FlowSequential(Clamped(4), InvConv1x1(4)).eval()
    x = 4 * torch.randn(2, 4, 3, 3)
    by_hand = chain.layers[1](chain.layers[0](x)[0])[0]
    torch.testing.assert_close(chain(x)[0], by_hand)


def test_level_of_chains_built_by_hand_batches_their_weights(monkeypatch):
    """A level nesting chains built by hand computes all their pairs' weights in one call, like FlowSteps'."""
    level = FlowSequential(Squeeze(), *(_by_hand(8, False) for _ in range(3))).eval()
    calls = _Calls(monkeypatch)
    y, _ = level(torch.randn(2, 2, 4, 6))
    level.inverse(y)
    assert calls.counts["fastflow.nn.actnorm_invconv.stacked_weights"] == 2


def test_pair_checks_its_input():
    chain = FlowSequential(ActNorm(4), InvConv1x1(4)).eval()
    with pytest.raises(ValueError, match="channel mismatch"):
        chain(torch.randn(2, 3, 4, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        chain.inverse([1.0, 2.0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(SHAPES))
def test_pair_backward_from_output_is_the_autograd_backward(kind, backend):
    """The pair's closed-form reversible backward (unfolded on images on the eager backend, folded elsewhere)
    rebuilds the input and gives autograd's gradients w.r.t. the input, ActNorm's parameters and the LU factors,
    log-det included (float64, to rounding)."""
    torch.manual_seed(0)
    channels = SHAPES[kind][1]
    actnorm = ActNorm(channels).double()
    mix = (InvertibleLinear(channels) if kind == "vector" else InvConv1x1(channels)).double()
    x = torch.randn(*SHAPES[kind], dtype=torch.float64)
    pair = ActNormInvConv(actnorm, mix)
    with fastflow.backend(backend):
        pair(x)  # ActNorm init
        perturb_parameters(actnorm, 0.3)
        perturb_parameters(mix, 0.3)
        x = x.requires_grad_(True)
        y, logdet = pair(x)
        grad_y, grad_logdet = torch.randn_like(y), torch.randn_like(logdet)
        torch.autograd.backward([y, logdet], [grad_y, grad_logdet])
        want = [x.grad, *(p.grad.clone() for p in pair.parameters())]
        for p in pair.parameters():
            p.grad = None
        rebuilt, grad_x = pair.backward_from_output(y.detach(), grad_y, grad_logdet)
    torch.testing.assert_close(rebuilt, x.detach(), atol=1e-12, rtol=1e-12)
    for got, expected in zip([grad_x, *(p.grad for p in pair.parameters())], want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_backward_from_output_checks_grad_y(backend):
    """The closed-form backward refuses an upstream gradient that does not fit the output, on the unfolded eager
    path (which runs the mixes' unchecked twins) as on the folded one: a transposed one would give wrong values."""
    pair = ActNormInvConv(ActNorm(4), InvConv1x1(4))
    y = torch.randn(2, 4, 3, 5)
    with fastflow.backend(backend):
        pair(y)  # ActNorm init
        for bad in (y.transpose(2, 3), y[:1], y[:, :3]):
            with pytest.raises(ValueError, match="grad_y must have the shape of y"):
                pair.backward_from_output(y, bad, torch.zeros(2))
        with pytest.raises(TypeError, match="grad_y must be float16"):
            pair.backward_from_output(y, y.long(), torch.zeros(2))
        with pytest.raises(ValueError, match="grad_y must be on cpu"):
            pair.backward_from_output(y, y.to("meta"), torch.zeros(2))


def test_fused_pair_calls_a_subclass_initialize_once_every_forward():
    """A subclass that keeps ActNorm's forward is fused with its 1x1 convolution; its own ``initialize_once`` still
    runs on every forward, as ActNorm's forward would call it."""
    calls = []

    class CountingActNorm(ActNorm):
        def initialize_once(self, x: torch.Tensor) -> None:
            calls.append(x.shape[0])
            super().initialize_once(x)

    chain = FlowSequential(CountingActNorm(3), InvertibleLinear(3))
    assert isinstance(chain_units(chain.layers)[0], ActNormInvConv)
    for batch in (8, 5, 4):
        chain(torch.randn(batch, 3))
    assert calls == [8, 5, 4]
