"""NSF (coupling and autoregressive): brute-force log-det, exact encode/decode, sampling with a context,
reversible training, learning a 2-D density, one graph under torch.compile, clear errors."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from fastflow.examples.toy_data import two_moons
from fastflow.models import NSF, FlowModel
from fastflow.nn import InvertibleLinear, MaskedAutoregressiveSpline, SplineCoupling
from tests.helpers import (
    assert_conditional_objective_compiles_whole,
    assert_vector_log_prob_is_the_change_of_variables,
    nll_and_grads,
    perturb_parameters,
)

VARIANTS = [False, True]  # autoregressive


def _model(features: int = 3, context: int = 0, autoregressive: bool = False, **kwargs) -> NSF:
    torch.manual_seed(1)
    model = NSF(features, context, transforms=3, bins=4, hidden=8, autoregressive=autoregressive, **kwargs)
    model = model.double()
    perturb_parameters(model, 0.2)
    return model.eval()


def _context(n: int, context: int) -> torch.Tensor | None:
    return torch.randn(n, context, dtype=torch.float64) if context else None


def test_signature_and_structure():
    parameters = inspect.signature(NSF).parameters
    assert list(parameters)[:7] == ["features", "context", "transforms", "bins", "hidden", "bound", "autoregressive"]
    assert [parameters[n].default for n in ("context", "transforms", "bins", "hidden", "bound")] == [0, 5, 8, None, 3.0]
    assert parameters["autoregressive"].default is False
    coupling, autoregressive = NSF(4, transforms=3), NSF(4, transforms=3, autoregressive=True)
    assert isinstance(coupling, FlowModel)
    assert sum(isinstance(m, SplineCoupling) for m in coupling.modules()) == 3
    assert sum(isinstance(m, MaskedAutoregressiveSpline) for m in autoregressive.modules()) == 3
    linears = [m.weight_and_logdet()[0] for m in coupling.modules() if isinstance(m, InvertibleLinear)]
    assert len(linears) == 3 and all(torch.equal(w, torch.eye(4)) for w in linears)
    assert coupling.config == dict(
        features=4, context=0, transforms=3, bins=8, hidden=64, bound=3.0, autoregressive=False, reversible=False
    )


@pytest.mark.parametrize("context", [0, 2])
def test_the_default_hidden_width_keeps_every_autoregressive_dependency(context):
    """``hidden=None``: 64 for couplings (narrow widths are fine there) and for a MADE of few features, else the
    narrowest MADE that keeps every dependency (``features - 1``, ``features`` with a context), so that
    ``NSF(100, autoregressive=True)`` is fully autoregressive (64 hidden units reached only the first 64 inputs)."""
    assert NSF(10, context, hidden=8).config["hidden"] == 8
    assert NSF(100, context).config["hidden"] == NSF(10, context, autoregressive=True).config["hidden"] == 64
    model = NSF(100, context, transforms=2, autoregressive=True)
    assert model.config["hidden"] == (100 if context else 99)
    for layer in (m for m in model.modules() if isinstance(m, MaskedAutoregressiveSpline)):
        masks = [m.mask for m in layer.net if hasattr(m, "mask")]
        reach = (masks[2] @ masks[1] @ masks[0] > 0).view(100, 3 * 8 - 1, 100 + context)
        lower = torch.ones(100, 100, dtype=torch.bool).tril(-1)[:, None, :].expand(-1, 3 * 8 - 1, -1)
        assert torch.equal(reach[..., :100], lower) and reach[..., 100:].all()


def test_the_most_bins_train_their_widths():
    """``bins=500``, the most a layer takes without a warning: the minimum sizes fix half of ``[-bound, bound]``
    and the raw widths still get gradients (at 1000 they got none)."""
    torch.manual_seed(0)
    model = NSF(2, transforms=1, bins=500, hidden=8).double()
    perturb_parameters(model, 0.1)
    out = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    (grad,) = torch.autograd.grad(-model.log_prob(torch.randn(8, 2, dtype=torch.float64)).sum(), out.bias)
    assert grad.view(-1, 3 * 500 - 1)[:, :500].abs().max() > 1e-8


@pytest.mark.parametrize("autoregressive", VARIANTS)
def test_starts_as_the_standard_normal(autoregressive):
    model = NSF(3, 2, transforms=2, hidden=8, autoregressive=autoregressive)
    x, c = torch.randn(5, 3), torch.randn(5, 2)
    want = -0.5 * (x.square() + math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(model.log_prob(x, c), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autoregressive", VARIANTS)
@pytest.mark.parametrize("context", [0, 2])
def test_log_prob_is_the_change_of_variables_with_the_brute_force_logdet(context, autoregressive):
    model = _model(3, context, autoregressive)
    assert_vector_log_prob_is_the_change_of_variables(
        model, 1.5 * torch.randn(4, 3, dtype=torch.float64), _context(4, context)
    )


@pytest.mark.parametrize("autoregressive", VARIANTS)
def test_decode_inverts_encode_and_samples_depend_on_the_context(autoregressive):
    model = _model(4, 2, autoregressive)
    x, c = 1.5 * torch.randn(5, 4, dtype=torch.float64), _context(5, 2)
    torch.testing.assert_close(model.decode(model.encode(x, c), c), x, atol=1e-10, rtol=1e-10)
    torch.manual_seed(0)
    samples = model.sample(5, c)
    torch.manual_seed(0)
    shifted = model.sample(5, c + 1)
    assert samples.shape == (5, 4) and (samples - shifted).abs().max() > 1e-3


@pytest.mark.parametrize("autoregressive", VARIANTS)
def test_reversible_training_gives_standard_gradients(autoregressive):
    model = _model(4, 3, autoregressive).train()
    x, c = 1.5 * torch.randn(6, 4, dtype=torch.float64), _context(6, 3)
    standard, reversible = (nll_and_grads(model, x, c, reversible) for reversible in (False, True))
    for got, want in zip(reversible, standard):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("autoregressive", VARIANTS)
def test_learns_two_moons(autoregressive):
    """Standardised two moons: the best Gaussian's NLL is 2.73 nats; 150 Adam steps of a 3-transform NSF must get
    below 1.8 on held-out points (1.37 and 1.36 when measured)."""
    torch.manual_seed(0)
    train, test = two_moons(4096, 0), two_moons(2048, 1)
    mean, std = train.mean(0), train.std(0)
    train, test = (train - mean) / std, (test - mean) / std
    model = NSF(2, transforms=3, hidden=32, autoregressive=autoregressive)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(150):
        loss = -model.log_prob(train[torch.randint(len(train), (128,))]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        nll = float(-model.log_prob(test).mean())
    assert nll < 1.8, f"held-out NLL {nll:.3f} nats"


@pytest.mark.parametrize("autoregressive", VARIANTS)
def test_the_conditional_objective_compiles_whole_with_eager_gradients(autoregressive):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NSF(3, context=2, transforms=2, hidden=8, autoregressive=autoregressive).train()
    assert_conditional_objective_compiles_whole(model, torch.randn(8, 3), torch.randn(8, 2))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"features": 1}, ValueError, "features must be >= 2"),  # a coupling splits the features
        ({"features": 0, "autoregressive": True}, ValueError, "features must be >= 1"),
        ({"features": 3, "context": -1}, ValueError, "context must be >= 0"),
        ({"features": 3, "transforms": 0}, ValueError, "transforms must be >= 1"),
        ({"features": 3, "bins": 1}, ValueError, "bins must be >= 2"),  # one bin is the identity
        ({"features": 3, "bins": 1001}, ValueError, "bins must be <= 1000"),
        ({"features": 3, "bins": 1001, "autoregressive": True}, ValueError, "bins must be <= 1000"),
        ({"features": 3, "hidden": 2.5}, TypeError, "hidden must be an int"),
        ({"features": 3, "bound": 0.0}, ValueError, "bound must be finite and > 0"),
        ({"features": 3, "bound": "3"}, TypeError, "bound must be a float"),
        ({"features": 3, "autoregressive": 1}, TypeError, "autoregressive must be a bool"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        NSF(**kwargs)


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
        (lambda m: m.sample(3), ValueError, "context is required"),
    ],
)
@pytest.mark.parametrize("autoregressive", VARIANTS)
def test_bad_inputs_raise_clear_errors(call, error, match, autoregressive):
    with pytest.raises(error, match=match):
        call(_model(3, 2, autoregressive))


def test_shares_as_safetensors_and_reloads_with_the_same_density(tmp_path):
    for autoregressive in (False, True):
        model = NSF(2, context=1, transforms=2, bins=4, hidden=8, autoregressive=autoregressive)
        x, context = torch.randn(6, 2), torch.randn(6, 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model.eval().save_pretrained(tmp_path / str(autoregressive))
        loaded = FlowModel.from_pretrained(tmp_path / str(autoregressive))
        assert isinstance(loaded, NSF) and loaded.config == model.config
        torch.testing.assert_close(loaded.log_prob(x, context), model.log_prob(x, context), atol=0, rtol=0)


def test_a_narrow_autoregressive_nsf_saved_before_the_warning_still_loads(tmp_path):
    """An autoregressive NSF whose MADE is narrower than ``features - 1`` (the old default, hidden=64, at more than
    65 features) warns when built and still saves and loads: a valid flow with fewer dependencies."""
    with pytest.warns(UserWarning, match="hidden should be >= 9 for 10 features"):
        model = NSF(10, hidden=8, autoregressive=True, transforms=1)
        model.save_pretrained(str(tmp_path / "narrow"))
        loaded = NSF.from_pretrained(str(tmp_path / "narrow"))
    x = torch.randn(3, 10)
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x))


def test_an_autoregressive_nsf_of_one_feature_is_a_conditional_density():
    """zuko's NSF(1, context) works; this one was refused (features >= 2, which only couplings need)."""
    torch.manual_seed(0)
    model = NSF(1, context=2, transforms=2, hidden=8, autoregressive=True).double()
    perturb_parameters(model)
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64).unsqueeze(1)
    for context in torch.randn(2, 2, dtype=torch.float64):
        density = model.log_prob(grid, context.expand(len(grid), 2)).exp()
        assert abs(torch.trapezoid(density.squeeze(), grid.squeeze()).item() - 1) < 1e-4
    inside = torch.linspace(-1, 1, 5, dtype=torch.float64).unsqueeze(1)  # within the splines' bound
    first, second = (model.log_prob(inside, c.expand(5, 2)) for c in torch.randn(2, 2, dtype=torch.float64))
    assert not torch.allclose(first, second), "the context must shape the density"
    assert model.sample(3, torch.randn(1, 2, dtype=torch.float64)).shape == (3, 1)
