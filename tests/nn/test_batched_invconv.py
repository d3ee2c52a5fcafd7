"""Tests for InvConv1x1.batched_weights: the standalone invertible 1x1 convolutions and linear maps of a chain (those
not paired with an ActNorm) assemble their weights together, and give what each gives alone."""

from __future__ import annotations

import math

import pytest
import torch

import fastflow.nn.invconv as invconv_module
import fastflow.ops.invconv as invconv_ops
from fastflow.models import NSF
from fastflow.nn import ActNorm, AffineCoupling, FlowSequential, InvConv1x1, InvertibleLinear, Squeeze
from fastflow.nn.invconv import InvConvWeights, assembles_as_written
from tests.helpers import perturb_parameters


def _chain(vectors: bool, lu: bool = True, reversible: bool = False) -> FlowSequential:
    """Three 4-wide convolutions between couplings, all LU or (``lu`` False) the middle one plain."""
    conv = InvertibleLinear if vectors else InvConv1x1
    layers = [
        conv(4),
        AffineCoupling(4, hidden=8, scale="exp", vectors=vectors),
        conv(4, lu=lu),
        AffineCoupling(4, hidden=8, scale="exp", vectors=vectors),
        conv(4),
    ]
    torch.manual_seed(0)
    chain = FlowSequential(*layers, reversible=reversible).double()
    with torch.no_grad():
        perturb_parameters(chain, 0.1)
    return chain


def _alone(chain: FlowSequential, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = None
    for layer in chain.layers:
        x, logdet = layer(x)
        total = logdet if total is None else total + logdet
    return x, total


def _outputs_and_gradients(chain: FlowSequential, run, x: torch.Tensor) -> list[torch.Tensor]:
    chain.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y, logdet = run(chain, x)
    (y.square().sum() + (logdet * torch.arange(1.0, x.shape[0] + 1, dtype=x.dtype)).sum()).backward()
    return [y, logdet, x.grad, *(p.grad for p in chain.parameters())]


SHAPES = {"vector": (3, 4), "image": (2, 4, 3, 5)}


@pytest.mark.parametrize("reversible", [False, True], ids=["standard", "reversible"])
@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_a_chain_batching_its_convolutions_equals_each_run_alone(kind, lu, reversible):
    chain = _chain(kind == "vector", lu, reversible)
    x = torch.randn(SHAPES[kind], dtype=torch.float64)
    got = _outputs_and_gradients(chain, lambda c, v: c(v), x)
    want = _outputs_and_gradients(chain, _alone, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        x_back, inverse_logdet = chain.inverse(got[0])
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(inverse_logdet, -got[1], rtol=1e-12, atol=1e-12)


def _counted_stacked_weights(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the groups :func:`~fastflow.nn.invconv.stacked_weights` is called with, from now on."""
    calls: list[int] = []
    stacked = invconv_module.stacked_weights
    monkeypatch.setattr(
        invconv_module,
        "stacked_weights",
        lambda convs, inverse=False: calls.append(len(convs)) or stacked(convs, inverse),
    )
    return calls


def test_convolutions_of_one_configuration_assemble_in_one_call(monkeypatch):
    """One stacked computation per group of two or more (width, lu, dtype, device); a group of one (here the plain
    convolution) and a convolution that does not assemble as written compute their own."""
    calls = _counted_stacked_weights(monkeypatch)
    chain = _chain(vectors=True, lu=False).eval()
    y, _ = chain(torch.randn(3, 4, dtype=torch.float64))
    chain.inverse(y)
    assert calls == [2, 2]
    convs = [chain.layers[i] for i in (0, 2, 4)]
    weights = InvConv1x1.batched_weights(convs, y)
    assert [type(w) for w in weights] == [InvConvWeights, type(None), InvConvWeights]
    for conv, w in zip(convs[::2], weights[::2]):
        want_weight, want_logdet = conv.weight_and_logdet()
        torch.testing.assert_close(w.weight, want_weight, rtol=0, atol=0)
        torch.testing.assert_close(w.weight_logdet, want_logdet, rtol=0, atol=0)
    with pytest.raises(TypeError, match="y must be a torch.Tensor"):
        InvConv1x1.batched_weights(convs, [1.0], inverse=True)


_LOG2 = math.log(2.0)


class _OwnWeightAndLogdet(InvertibleLinear):
    def weight_and_logdet(self):
        weight, logdet = super().weight_and_logdet()
        return 2 * weight, logdet + self.num_channels * _LOG2


class _OwnInverseWeight(InvertibleLinear):
    def inverse_weight(self):
        return super().inverse_weight() / 2


class _OwnWeightLogdet(InvertibleLinear):
    def weight_logdet(self):
        return super().weight_logdet() + self.num_channels * _LOG2


class _Scaled(_OwnWeightAndLogdet, _OwnInverseWeight, _OwnWeightLogdet):
    """All three weight methods its own: twice the LU weight (log-det + D log 2), inverse to match."""


class _SoftLogS(InvertibleLinear):
    """A subclass with its own ``log_s`` (which the weight methods read): ``tanh`` of the packed diagonal."""

    @property
    def log_s(self):
        return torch.tanh(torch.diagonal(self.lu_packed))


@pytest.mark.parametrize("own", [_Scaled, _SoftLogS], ids=["weight-methods", "log_s"])
@pytest.mark.parametrize("with_actnorm", [False, True], ids=["standalone", "after-actnorm"])
def test_a_convolution_with_its_own_weights_or_hooks_computes_them_itself(with_actnorm, own):
    """Batched (or fused with an ActNorm), a subclass's own weight methods or ``log_s`` would be skipped: a wrong
    answer. Such a convolution (two of them: a group), and one with a hook, run as they are."""
    torch.manual_seed(0)
    first, second, hooked = own(4), own(4), InvertibleLinear(4)
    with torch.no_grad():
        for conv in (first, second):
            conv.lu_packed.diagonal().fill_(2.0)
    seen = []
    hooked.register_forward_hook(lambda module, args, out: seen.append(True))
    assert not any(assembles_as_written(conv) for conv in (first, second, hooked))
    assert assembles_as_written(InvertibleLinear(4))
    layers = [ActNorm(4), first] if with_actnorm else [first]
    chain = FlowSequential(*layers, second, InvertibleLinear(4), hooked).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    y, logdet = chain(x)
    assert seen == [True]
    want_y, want_logdet = _alone(chain, x)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, want_logdet, rtol=1e-12, atol=1e-12)
    x_back, _ = chain.inverse(y)
    torch.testing.assert_close(x_back, x, rtol=1e-10, atol=1e-10)


def test_nsf_assembles_its_linear_maps_in_one_call(monkeypatch):
    """NSF's coupling form puts an LU linear map before each spline coupling: all of them assemble at once."""
    calls = _counted_stacked_weights(monkeypatch)
    model = NSF(3, transforms=4)
    model.log_prob(torch.randn(5, 3))
    model.sample(2)
    assert calls == [4, 4]


def test_a_chain_of_convolutions_compiles_without_graph_breaks():
    chain = _chain(vectors=True).float()
    try:
        explanation = torch._dynamo.explain(lambda x: chain(x)[1].sum())(torch.randn(3, 4))
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0


def _perturbed(conv: InvConv1x1, seed: int) -> InvConv1x1:
    torch.manual_seed(seed)
    with torch.no_grad():
        perturb_parameters(conv, 0.1)
    return conv


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("lu", [True, False], ids=["lu", "plain"])
def test_convolutions_of_different_dtypes_or_widths_assemble_apart(lu, inverse):
    """Each group is one width and dtype: every convolution gets its own weights, in its own dtype and shape."""
    specs = [(4, torch.float64), (4, torch.float32), (3, torch.float64)] * 2
    convs = [_perturbed(InvertibleLinear(c, lu=lu).to(dtype), i) for i, (c, dtype) in enumerate(specs)]
    weights = InvConv1x1.batched_weights(convs, torch.randn(2, 4), inverse=inverse)
    assert all(isinstance(w, InvConvWeights) for w in weights)  # every group has two members
    for conv, w in zip(convs, weights):
        want = conv.inverse_weight() if inverse else conv.weight_and_logdet()[0]
        assert w.weight.dtype == want.dtype and w.weight.shape == want.shape
        tol = 1e-12 if want.dtype == torch.float64 else 1e-6  # a batched inverse may differ by an ulp (torch 2.4)
        torch.testing.assert_close(w.weight, want, rtol=tol, atol=tol)
        want_logdet = conv.weight_logdet()
        assert w.weight_logdet.dtype == want_logdet.dtype
        torch.testing.assert_close(w.weight_logdet, want_logdet, rtol=1e-12, atol=1e-12)  # slogdet: an ulp apart


def test_convolutions_on_different_devices_assemble_apart():
    """``meta`` stands in for a second device."""
    devices = ["cpu", "meta", "cpu", "meta"]
    weights = InvConv1x1.batched_weights([InvertibleLinear(4).to(d) for d in devices], torch.randn(2, 4))
    assert [w.weight.device.type for w in weights] == devices
    assert [w.weight_logdet.device.type for w in weights] == devices


def test_a_multiscale_chain_built_by_hand_batches_each_width():
    chain = FlowSequential(InvConv1x1(4), InvConv1x1(4), Squeeze(), InvConv1x1(16), InvConv1x1(16)).double().eval()
    x = torch.randn(2, 4, 6, 4, dtype=torch.float64)
    y, logdet = chain(x)
    want_y, want_logdet = _alone(chain, x)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, want_logdet, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chain.inverse(y)[0], x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("own", [_OwnWeightAndLogdet, _OwnInverseWeight, _OwnWeightLogdet])
def test_a_convolution_overriding_any_one_weight_method_computes_its_own(own):
    torch.manual_seed(0)
    chain = FlowSequential(own(4), own(4), InvertibleLinear(4), InvertibleLinear(4)).double().eval()
    assert not assembles_as_written(chain.layers[0])
    with torch.no_grad():
        perturb_parameters(chain, 0.1)
    x = torch.randn(3, 4, dtype=torch.float64)
    for got, want in zip(chain(x), _alone(chain, x)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    y = chain(x)[0]
    for got, want in zip(chain.inverse(y), _inverse_alone(chain, y)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _inverse_alone(chain: FlowSequential, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = None
    for layer in reversed(chain.layers):
        y, logdet = layer.inverse(y)
        total = logdet if total is None else total + logdet
    return y, total


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_batched_weights_ignore_autocast(monkeypatch, inverse):
    """The stacked assembly runs with autocast off, as each convolution's own does: visible where the algebra runs
    in float32 (MPS), which the test stands in for on the CPU."""
    monkeypatch.setattr(invconv_ops, "_algebra_dtype", lambda device: torch.float32)
    convs = [_perturbed(InvertibleLinear(8), i) for i in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = InvConv1x1.batched_weights(convs, torch.randn(5, 8), inverse=inverse)
    for conv, w in zip(convs, weights):
        want = conv.inverse_weight() if inverse else conv.weight_and_logdet()[0]
        torch.testing.assert_close(w.weight, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 3, 5)], ids=["vector", "image"])
def test_a_convolution_runs_on_the_weights_it_is_given(shape):
    conv = InvConv1x1(4).double()
    x = torch.randn(shape, dtype=torch.float64)
    given = InvConvWeights(2 * torch.eye(4, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64))
    pixels = 1 if len(shape) == 2 else shape[2] * shape[3]
    y, logdet = conv(x, weights=given)
    torch.testing.assert_close(y, 2 * x)
    torch.testing.assert_close(logdet, torch.full((shape[0],), 0.25 * pixels, dtype=torch.float64))
    x_back, inverse_logdet = conv.inverse(x, weights=given)
    torch.testing.assert_close(x_back, 2 * x)  # the weights given are the inverse direction's
    torch.testing.assert_close(inverse_logdet, torch.full((shape[0],), -0.25 * pixels, dtype=torch.float64))


def test_a_convolution_with_a_forward_pre_hook_is_neither_fused_nor_batched():
    torch.manual_seed(0)
    fired = []
    paired, standalone = InvConv1x1(4), InvConv1x1(4)
    for conv in (paired, standalone):
        conv.register_forward_pre_hook(lambda module, args: fired.append(module))
    assert not assembles_as_written(paired)
    FlowSequential(ActNorm(4), paired, standalone, InvConv1x1(4)).eval()(torch.randn(2, 4, 3, 3))
    assert fired == [paired, standalone]
