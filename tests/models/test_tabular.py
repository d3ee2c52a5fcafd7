"""TabularFlow: brute-force log-det, exact encode/decode, log_prob / sample / rsample with and without a context,
reversible training, learning a conditional density, clear errors."""

from __future__ import annotations

import inspect

import pytest
import torch

from fastflow.models import FlowModel, TabularFlow
from tests.helpers import (
    assert_conditional_objective_compiles_whole,
    assert_vector_log_prob_is_the_change_of_variables,
    nll_and_grads,
    perturb_parameters,
)


def _model(features: int = 3, context: int = 0, **kwargs) -> TabularFlow:
    torch.manual_seed(1)
    model = TabularFlow(features, context, transforms=3, hidden=8, **kwargs).double().train()
    x = torch.randn(32, features, dtype=torch.float64) * 2 + 1
    model.log_prob(x, torch.randn(32, context, dtype=torch.float64) if context else None)  # ActNorm init
    perturb_parameters(model, 0.2)
    return model.eval()


def _context(n: int, context: int) -> torch.Tensor | None:
    return torch.randn(n, context, dtype=torch.float64) if context else None


def test_signature_is_the_public_contract():
    parameters = inspect.signature(TabularFlow).parameters
    assert list(parameters)[:4] == ["features", "context", "transforms", "hidden"]
    assert parameters["context"].default == 0
    assert isinstance(TabularFlow(2), FlowModel)


def test_linear_maps_start_as_the_identity_then_reversals():
    """So the couplings start on the data's own coordinates, alternating halves (a random rotation measured worse)."""
    model = TabularFlow(4, transforms=3)
    weights = [step.layers[1].weight_and_logdet()[0] for step in model.blocks[0].layers]
    eye = torch.eye(4)
    for weight, want in zip(weights, [eye, eye.flip(0), eye.flip(0)], strict=True):
        torch.testing.assert_close(weight, want, rtol=0, atol=0)


@pytest.mark.parametrize("context", [0, 2])
def test_log_prob_is_the_change_of_variables_with_the_brute_force_logdet(context):
    model = _model(3, context)
    assert_vector_log_prob_is_the_change_of_variables(
        model, torch.randn(4, 3, dtype=torch.float64), _context(4, context)
    )


@pytest.mark.parametrize("context", [0, 2])
def test_decode_inverts_encode(context):
    model = _model(4, context)
    x, c = torch.randn(5, 4, dtype=torch.float64), _context(5, context)
    torch.testing.assert_close(model.decode(model.encode(x, c), c), x, atol=1e-12, rtol=1e-12)


def test_the_density_depends_on_the_context():
    model = _model(3, 2)
    x, c = torch.randn(4, 3, dtype=torch.float64), _context(4, 2)
    assert (model.log_prob(x, c) - model.log_prob(x, c + 1)).abs().max() > 1e-3


def test_sample_has_the_feature_shape_and_unit_temperature_by_default():
    model = _model(3, 2)
    c = _context(1, 2)
    torch.manual_seed(0)
    samples = model.sample(6, c)  # a context of batch 1 is shared by the n draws
    torch.manual_seed(0)
    z = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(samples, model.decode([z], c.expand(6, 2)))
    assert samples.shape == (6, 3) and not samples.requires_grad
    assert model.sample(4, _context(4, 2)).shape == (4, 3)
    # from a generator: its normal draws, the global RNG untouched
    z = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    state = torch.get_rng_state()
    samples = model.sample(6, c, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(samples, model.decode([z], c.expand(6, 2)))
    assert torch.equal(torch.get_rng_state(), state)


def test_rsample_is_reparameterised_and_differentiable():
    """``rsample`` is ``f^-1(temperature * eps)``: the same draw as decoding the noise, and its gradients w.r.t. the
    parameters and the context are those of that decoding (nonzero)."""
    model = _model(3, 2)
    c = _context(5, 2).requires_grad_(True)
    torch.manual_seed(0)
    x = model.rsample(5, c, temperature=0.5)
    x.square().sum().backward()
    got = [c.grad.clone(), *(p.grad.clone() for p in model.parameters())]
    model.zero_grad(set_to_none=True)
    c.grad = None
    torch.manual_seed(0)
    want_x = model.decode([0.5 * torch.randn(5, 3, dtype=torch.float64)], c)
    want_x.square().sum().backward()
    torch.testing.assert_close(x, want_x)
    assert got[0].abs().max() > 1e-6
    for g, w in zip(got, [c.grad, *(p.grad for p in model.parameters())]):
        torch.testing.assert_close(g, w)


def test_a_flow_trained_by_rsample_alone_keeps_its_actnorms_at_its_first_log_prob():
    """Training through ``rsample`` runs only inverses, so no ActNorm initialised; the first ``log_prob`` in training
    mode then overwrote the trained ActNorm parameters with statistics of its batch (the flow's samples changed)."""
    torch.manual_seed(0)
    model = TabularFlow(2, transforms=2, hidden=8).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        (model.rsample(64) - torch.tensor([3.0, -2.0])).square().mean().backward()
        optimizer.step()
    trained = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("initialized")}
    with torch.no_grad():
        model.log_prob(torch.randn(32, 2))
    for key, value in model.state_dict().items():
        if key.endswith("initialized"):
            assert bool(value), key
        else:
            assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize("context", [0, 3])
def test_reversible_training_gives_standard_gradients(context):
    model = _model(4, context)
    model.train()
    x, c = torch.randn(6, 4, dtype=torch.float64), _context(6, context)
    standard, reversible = (nll_and_grads(model, x, c, reversible) for reversible in (False, True))
    for got, want in zip(reversible, standard):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_a_conditional_density_is_learned():
    """x = 3 * c + N(0, 0.1^2) per feature, c ~ U(-1, 1): the true conditional NLL is
    log(0.1 * sqrt(2 pi e)) = -0.88 nats per feature, while a context-blind model cannot go below the marginal's
    (log 6 + 2 * -0.88) / 2 = 0.46; a few hundred Adam steps must get below -0.5."""
    torch.manual_seed(0)
    model = TabularFlow(2, context=1, transforms=3, hidden=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n):
        c = torch.rand(n, 1) * 2 - 1
        return 3 * c + 0.1 * torch.randn(n, 2), c

    for _ in range(300):
        x, c = batch(256)
        loss = -model.log_prob(x, c).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, c = batch(2000)
    with torch.no_grad():
        nll = -model.log_prob(x, c).mean() / 2
    assert nll < -0.5, f"held-out NLL {float(nll):.3f} nats per feature"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.log_prob(torch.randn(2, 4, dtype=torch.float64), _context(2, 2)), ValueError, r"\(B, 3\)"),
        (lambda m: m.log_prob(torch.randn(2, 3, dtype=torch.float64)), ValueError, "context is required"),
        (
            lambda m: m.log_prob(torch.randn(2, 3, dtype=torch.float64), _context(2, 3)),
            ValueError,
            "context has 3 features .* built for 2",
        ),
        (
            lambda m: m.log_prob(torch.randn(2, 3, dtype=torch.float64), _context(3, 2)),
            ValueError,
            r"context must have shape \(2, ...\)",
        ),
        (lambda m: m.sample(3), ValueError, "context is required"),
        (lambda m: m.sample(3, _context(2, 2)), ValueError, r"context must have shape \(3, ...\)"),
        (lambda m: m.bits_per_dim(torch.randn(2, 3, dtype=torch.float64), _context(2, 2)), ValueError, "n_bins"),
        (lambda m: m.set_tiling(tile_size=4), ValueError, "receptive-field halo"),
        (lambda m: m.log_prob(torch.randn(2, 3), _context(2, 2)), TypeError, "x is torch.float32 but"),
        # another device failed deep in a layer (torch.cat, autocast) without naming the argument
        (
            lambda m: m.log_prob(torch.randn(2, 3, dtype=torch.float64), _context(2, 2).to("meta")),
            ValueError,
            "context is on meta but the model is on cpu",
        ),
        (lambda m: m.log_prob(torch.randn(2, 3, dtype=torch.float64, device="meta")), ValueError, "x is on meta"),
        (
            lambda m: m.decode([torch.randn(2, 3, dtype=torch.float64, device="meta")]),
            ValueError,
            "latents\\[-1\\] is on",
        ),
        (lambda m: m.sample(3, _context(1, 2).to("meta")), ValueError, "context is on meta"),
        # a 1-D context (zuko's c of shape (F,)) was expanded to (n,) and refused as "(n,)"
        (
            lambda m: m.sample(5, _context(1, 2)[0]),
            ValueError,
            r"got \(2,\): one context vector c of shape \(2,\) .* c\.expand\(5, -1\)",
        ),
        (lambda m: m.sample(5, _context(1, 1)[0]), ValueError, r"got \(1,\): one context vector"),
        # the hint was c[None], which log_prob refuses again (one row per x); (B,) is one feature per sample
        (
            lambda m: m.log_prob(torch.randn(4, 3, dtype=torch.float64), _context(1, 2)[0]),
            ValueError,
            r"must have shape \(4, 2\) .* got \(2,\): one context vector c of shape \(2,\) shared by every sample is "
            r"c\.expand\(4, -1\)",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(_model(3, 2))


def test_a_one_feature_context_of_one_entry_per_sample_is_hinted_as_a_column():
    """(B,) for a one-feature context is one column: c[:, None] (offered only where the context is one feature
    wide; for two it would be refused again)."""
    model = TabularFlow(3, context=1, transforms=1, hidden=4).double()
    x, c = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"one feature per sample is c\[:, None\]; one context vector"):
        model.log_prob(x, c)
    model.log_prob(x, c[:, None])  # the hint works
    with pytest.raises(ValueError) as info:
        _model(3, 2).log_prob(torch.randn(2, 3, dtype=torch.float64), _context(1, 2)[0])
    assert "c[:, None]" not in str(info.value)


def test_a_context_for_an_unconditional_flow_is_refused():
    with pytest.raises(ValueError, match="context was given but TabularFlow is unconditional"):
        _model(3).log_prob(torch.randn(2, 3, dtype=torch.float64), _context(2, 2))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"features": 1}, ValueError, "features must be >= 2"),
        ({"features": 3, "context": -1}, ValueError, "context must be >= 0"),
        ({"features": 3, "transforms": 0}, ValueError, "transforms must be >= 1"),
        ({"features": 3.0}, TypeError, "features must be an int"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        TabularFlow(**kwargs)


def test_the_conditional_objective_compiles_whole_with_eager_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TabularFlow(3, context=2, transforms=2, hidden=8).train()
    x, c = torch.randn(8, 3), torch.randn(8, 2)
    with torch.no_grad():
        model.log_prob(x, c)  # ActNorm init, eagerly
    assert_conditional_objective_compiles_whole(
        model, x, c, loss_tolerance={"atol": 1e-5, "rtol": 1e-5}, grad_tolerance={"atol": 1e-5, "rtol": 1e-4}
    )
    torch._dynamo.reset()


def test_shares_as_safetensors_and_reloads_with_the_same_density(tmp_path):
    model = TabularFlow(3, context=2, transforms=2, hidden=8)
    x, context = torch.randn(5, 3), torch.randn(5, 2)
    model.log_prob(x, context)  # initialises ActNorm
    perturb_parameters(model)
    model.eval().save_pretrained(tmp_path)
    loaded = FlowModel.from_pretrained(tmp_path)
    assert isinstance(loaded, TabularFlow) and loaded.config == model.config
    torch.testing.assert_close(loaded.log_prob(x, context), model.log_prob(x, context), atol=0, rtol=0)
