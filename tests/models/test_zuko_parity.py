"""Interop parity with zuko 1.6: one vector flow built in fastflow (from its layers) and in zuko, with the same
weights, gives the same ``log_prob`` (and the same inverse) to float64 rounding.

The conventions, read from zuko's source, and how each side is made to agree:

- Couplings. zuko's ``CouplingTransform`` mask is True on the constant part ``x_a``; its hyper-network sees
  ``cat(x_a, context)`` (fastflow's conditioner too) and its output is unflattened to ``(D_b, 2)``: per
  transformed feature, shift then raw scale, interleaved. fastflow's conditioner outputs all shifts, then all
  raw scales (``chunk(2)``): the last linear layer's rows are reordered on copy.
- Masks. zuko's RealNVP alternates checkered masks (``arange(D) % 2 == i % 2``: the even features constant
  first); fastflow's channel mask keeps the first (``parity=0``) or last (``parity=1``) ``D // 2`` features.
  Against the stock RealNVP, ``Permutation`` layers gather zuko's ``x_a`` first and scatter back (this needs
  ``|x_a| = D // 2``, so an even ``D``: for odd ``D`` zuko's even-``i`` masks keep ``ceil(D / 2)``); against a
  zuko ``Flow`` of ``GeneralCouplingTransform`` (any ``D``), zuko is given fastflow's masks.
- Affine transform: the one mismatch. zuko's ``MonotonicAffineTransform(shift, a)`` is ``y = x exp(l) + shift``
  with a soft-bounded log-scale ``l = a / (1 + |a| / L)``, ``L = -log(slope) = log(1000)``; fastflow's
  ``scale="exp"`` has ``l = tanh(r)`` and ``scale="sigmoid"`` is ``y = (x + t) sigmoid(r + 2)``. No weights make
  zuko's bound a tanh (it saturates at ``L``, tanh at 1), so the stock univariate cannot match. zuko takes the
  univariate as an argument: the zuko flow here uses its own ``MonotonicAffineTransform`` with the raw scale
  ``a = l / (1 - |l| / L)`` (the bound's inverse) of fastflow's log-scale ``l``, and shift ``t`` (``"exp"``) or
  ``t * sigmoid(r + 2)`` (``"sigmoid"``). The networks, masks, composition and base are zuko's own.
- ``InvertibleLinear``: ``y = W x`` with ``W = P L U``; zuko's ``LULinearTransform`` is ``y = L U x`` with L lower
  (its diagonal included) and U unit upper, no pivoting: the zuko side takes the LU factors of ``W`` with the
  diagonal moved into L, then a ``PermutationTransform`` for P.
- ``ActNorm``: ``y = (x + bias) exp(logs)`` is zuko's ``MonotonicAffineTransform(bias * exp(logs), a(logs))``.
- Base: both a standard diagonal normal.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

pytest.importorskip("zuko")  # a test extra; the GPU machine's image lacks it, and a failed import stopped every shard
from zuko.distributions import DiagNormal  # noqa: E402
from zuko.flows import Flow, GeneralCouplingTransform, RealNVP, UnconditionalDistribution, UnconditionalTransform  # noqa: E402
from zuko.nn import MLP  # noqa: E402
from zuko.transforms import LULinearTransform, MonotonicAffineTransform, PermutationTransform  # noqa: E402

from fastflow.models import TabularFlow  # noqa: E402
from fastflow.nn import ActNorm, AffineCoupling, FlowSequential, FlowStep, InvConv1x1, InvertibleLinear, Permutation  # noqa: E402

ZUKO_LOG_SCALE_BOUND = -math.log(1e-3)  # MonotonicAffineTransform's default slope
TOL = {"rtol": 1e-11, "atol": 1e-11}


def zuko_raw_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """The raw scale ``a`` for which zuko's soft bound ``a / (1 + |a| / L)`` gives ``log_scale`` (|.| < L)."""
    return log_scale / (1 - log_scale.abs() / ZUKO_LOG_SCALE_BOUND)


def fastflow_affine(shift: torch.Tensor, raw: torch.Tensor, scale: str) -> MonotonicAffineTransform:
    """zuko's affine transform computing fastflow's ``scale`` kind from the conditioner's ``(shift, raw)``."""
    if scale == "exp":
        return MonotonicAffineTransform(shift, zuko_raw_scale(torch.tanh(raw)))
    log_s = nn.functional.logsigmoid(raw + 2)
    return MonotonicAffineTransform(shift * log_s.exp(), zuko_raw_scale(log_s))


def interleaved_rows(features_b: int) -> torch.Tensor:
    """Row order taking zuko's interleaved ``(shift_j, raw_j)`` outputs to fastflow's ``(shifts, raws)``."""
    return torch.arange(2 * features_b).view(features_b, 2).t().flatten()


def last_linear(net: nn.Module) -> nn.Module:
    return [m for m in net.modules() if hasattr(m, "weight")][-1]


def copy_conditioner(source: nn.Module, target: nn.Module, rows: torch.Tensor) -> None:
    """``target`` := ``source`` (same layout), the last layer's output rows taken in the order ``rows``."""
    target.load_state_dict(source.state_dict())
    last = last_linear(target)
    with torch.no_grad():
        last.weight.copy_(last.weight[rows])
        last.bias.copy_(last.bias[rows])


def randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Every floating parameter of ``module`` drawn from N(0, std^2) (fastflow's zero-init last layers too)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def zuko_mlp(hidden: int, in_features: int, out_features: int) -> nn.Module:
    """zuko's own MLP as fastflow's conditioner: ``subnet(in_features, out_features)``."""
    return MLP(in_features, out_features, hidden_features=(hidden, hidden))


def fastflow_log_prob(flow: FlowSequential, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    z, logdet = flow(x, context)
    return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + logdet


def zuko_base(features: int) -> UnconditionalDistribution:
    return UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)


def zuko_transforms_of(layer: nn.Module, context: int, hidden: int) -> list[nn.Module]:
    """zuko lazy transforms computing what the fastflow ``layer`` computes, with its weights."""
    if isinstance(layer, ActNorm):
        logs, bias = layer.logs.detach().flatten(), layer.bias.detach().flatten()
        return [UnconditionalTransform(MonotonicAffineTransform, bias * logs.exp(), zuko_raw_scale(logs), buffer=True)]
    if isinstance(layer, FlowStep):
        return [
            t
            for part in (layer.actnorm, layer.invconv, layer.coupling)
            for t in zuko_transforms_of(part, context, hidden)
        ]
    if isinstance(layer, InvConv1x1):  # InvertibleLinear, or a FlowStep's mix on vectors
        weight = layer.weight_and_logdet()[0].detach()
        pivots, lower, upper = torch.linalg.lu(weight)
        diag = torch.diagonal(upper)
        packed = torch.tril(lower * diag) + torch.triu(upper / diag[:, None], diagonal=1)
        order = pivots.argmax(dim=1)  # (P v)_i = v[order[i]]
        return [
            UnconditionalTransform(LULinearTransform, packed, buffer=True),
            UnconditionalTransform(PermutationTransform, order, buffer=True),
        ]
    if isinstance(layer, Permutation):
        return [UnconditionalTransform(PermutationTransform, layer.perm.clone(), buffer=True)]
    if isinstance(layer, AffineCoupling):
        features, kept = layer.num_channels, layer.cond_channels
        mask = torch.zeros(features, dtype=torch.bool)
        mask[:kept] = True
        if layer.parity == 1:
            mask = mask.flip(0)
        coupling = GeneralCouplingTransform(
            features,
            context,
            mask=mask,
            univariate=partial(fastflow_affine, scale=layer.scale),
            hidden_features=(hidden, hidden),
        )
        rows = interleaved_rows(features - kept)
        copy_conditioner(layer.net, coupling.hyper, torch.argsort(rows))
        return [coupling]
    raise TypeError(f"no zuko twin for {type(layer).__name__}")


def assert_same_flow(ours: FlowSequential, theirs: Flow, features: int, context: int) -> None:
    """Same log_prob at data points, same inverse (sampling direction) at latent points, in float64."""
    x = 1.5 * torch.randn(64, features, dtype=torch.float64)
    c = torch.randn(64, context, dtype=torch.float64) if context else None
    ours, theirs = ours.double().eval(), theirs.double()
    with torch.no_grad():
        expected = theirs(c).log_prob(x)
        got = fastflow_log_prob(ours, x, c)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, **TOL)
        z = torch.randn(64, features, dtype=torch.float64)
        torch.testing.assert_close(ours.inverse(z, c)[0], theirs(c).transform.inv(z), **TOL)


@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("scale", ["exp", "sigmoid"])
def test_fastflow_couplings_match_zuko_realnvp(scale, context):
    """zuko's stock RealNVP (checkered masks, its MLP conditioners, given fastflow's affine as its univariate)
    against fastflow couplings between Permutation layers, with zuko's weights copied in."""
    features, hidden, transforms = 6, 16, 4
    theirs = RealNVP(
        features,
        context,
        transforms=transforms,
        univariate=partial(fastflow_affine, scale=scale),
        hidden_features=(hidden, hidden),
    )
    layers = []
    for coupling in theirs.transform.transforms:
        randomize(coupling.hyper)
        mask = coupling.mask
        gather = torch.cat([mask.nonzero().flatten(), (~mask).nonzero().flatten()])
        ours = AffineCoupling(
            features,
            hidden,
            scale=scale,
            parity=0,
            subnet=partial(zuko_mlp, hidden),
            context_features=context,
            vectors=True,
        )
        copy_conditioner(coupling.hyper, ours.net, interleaved_rows(features - int(mask.sum())))
        layers += [Permutation(features, gather.tolist()), ours, Permutation(features, torch.argsort(gather).tolist())]
    assert_same_flow(FlowSequential(*layers), theirs, features, context)


@pytest.mark.parametrize("context", [0, 2])
@pytest.mark.parametrize("features", [5, 6])
def test_actnorm_linear_coupling_flow_matches_zuko(features, context):
    """TabularFlow's kind of step (ActNorm, invertible linear map, affine coupling of alternating parity, the
    default MLP conditioner) against a zuko Flow of the same transforms with the same weights."""
    hidden = 12
    layers = []
    for i in range(3):
        actnorm = ActNorm(features)
        with torch.no_grad():
            actnorm.bias.normal_(0.0, 0.5)
            actnorm.logs.normal_(0.0, 0.3)
        linear = InvertibleLinear(features)
        with torch.no_grad():
            for p in linear.parameters():
                p.add_(0.2 * torch.randn_like(p))
        coupling = AffineCoupling(features, hidden, scale="exp", parity=i % 2, context_features=context, vectors=True)
        layers += [actnorm, linear, randomize(coupling)]
    ours = FlowSequential(*layers).double()  # before the twins are made: zuko's LU factors W in float64
    theirs = Flow([t for layer in layers for t in zuko_transforms_of(layer, context, hidden)], zuko_base(features))
    assert_same_flow(ours, theirs, features, context)


@pytest.mark.parametrize("context", [0, 2])
def test_tabular_flow_matches_zuko(context):
    """The TabularFlow preset (its steps walked into zuko transforms, its weights copied): same log_prob, and
    ``decode`` is zuko's inverse."""
    features, hidden = 5, 12
    model = randomize(TabularFlow(features, context=context, transforms=3, hidden=hidden), std=0.2).double().eval()
    steps = list(model.blocks[0].layers)
    theirs = Flow([t for step in steps for t in zuko_transforms_of(step, context, hidden)], zuko_base(features))
    theirs = theirs.double()
    x = 1.5 * torch.randn(64, features, dtype=torch.float64)
    c = torch.randn(64, context, dtype=torch.float64) if context else None
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x, c), theirs(c).log_prob(x), **TOL)
        z = torch.randn(64, features, dtype=torch.float64)
        torch.testing.assert_close(model.decode([z], c), theirs(c).transform.inv(z), **TOL)
