"""SplineCoupling and MaskedAutoregressiveSpline: identity at initialisation, brute-force log-det (float64), inverse
round trips, the autoregressive structure, reversible == standard gradients, the kernels (interpreter) against
eager, custom conditioners and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastflow
from fastflow.backend import interpreter_enabled
from fastflow.nn import (
    FlowSequential,
    InvertibleLinear,
    MaskedAutoregressiveSpline,
    Permutation,
    SplineCoupling,
    Squeeze,
)
from fastflow.nn.autoregressive import MADE, default_made_hidden, min_made_hidden
from fastflow.nn.spline_coupling import identity_derivative_raw, start_at_identity
from fastflow.nn.tiling import Tiling
from fastflow.ops.spline import MAX_LAYER_BINS, rq_spline
from tests.helpers import HaloConv, brute_force_logdet, chain_loss_and_grads, perturb_parameters, tanh_mlp

# name -> (layer factory, x shape, context shape or None); perturbations keep raw parameters O(1)
LAYERS = {
    "vectors": (lambda: SplineCoupling(5, 8, bins=4, vectors=True), (3, 5), None),
    "vectors_parity1_context": (
        lambda: SplineCoupling(5, 8, bins=3, bound=2.0, parity=1, context_features=2, vectors=True),
        (3, 5),
        (3, 2),
    ),
    "vectors_custom_subnet": (lambda: SplineCoupling(4, bins=5, subnet=tanh_mlp, vectors=True), (3, 4), None),
    "images_context": (lambda: SplineCoupling(3, 6, bins=4, context_features=2), (2, 3, 3, 4), (2, 2)),
    "images_parity1": (lambda: SplineCoupling(4, 6, bins=2, parity=1), (2, 4, 2, 3), None),
    "images_checkerboard": (
        lambda: SplineCoupling(3, 6, bins=4, mask="checkerboard", context_features=2),
        (2, 3, 3, 4),
        (2, 2),
    ),
    "images_checkerboard_parity1": (
        lambda: SplineCoupling(1, 6, bins=3, parity=1, mask="checkerboard"),
        (2, 1, 4, 5),
        None,
    ),
    "autoregressive": (lambda: MaskedAutoregressiveSpline(4, 16, bins=4), (3, 4), None),
    "autoregressive_context": (
        lambda: MaskedAutoregressiveSpline(3, 12, bins=5, bound=2.0, context_features=2),
        (3, 3),
        (3, 2),
    ),
}


def _perturbed(name: str, scale: float = 0.3) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    make, x_shape, c_shape = LAYERS[name]
    layer = make().double()
    perturb_parameters(layer, scale)
    x = 1.5 * torch.randn(*x_shape, dtype=torch.float64)  # some of it beyond the bound: the identity tails
    context = None if c_shape is None else torch.randn(*c_shape, dtype=torch.float64)
    return layer, x, context


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_starts_at_the_identity(name):
    make, x_shape, c_shape = LAYERS[name]
    layer = make()
    x = 2 * torch.randn(*x_shape)
    context = None if c_shape is None else torch.randn(*c_shape)
    y, logdet = layer(x, context)
    if name == "vectors_custom_subnet":  # its last Linear is not zero: a real map
        assert (y - x).abs().max() > 1e-3
        return
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(logdet, torch.zeros_like(logdet), atol=1e-5, rtol=0)


def test_identity_derivative_raw_gives_unit_derivatives():
    r = torch.tensor(identity_derivative_raw(), dtype=torch.float64)
    torch.testing.assert_close(1e-3 + nn.functional.softplus(r), torch.tensor(1.0, dtype=torch.float64))


def test_start_at_identity_sets_only_zero_output_layers():
    zero = nn.Linear(3, 2 * 5)
    nn.init.zeros_(zero.weight)  # its bias stays random: set too
    assert start_at_identity(zero, 2, 2, parameter_major=False)
    assert torch.equal(zero.bias.view(2, 5)[:, :4], torch.zeros(2, 4))
    assert torch.allclose(zero.bias.view(2, 5)[:, 4], torch.tensor(identity_derivative_raw()))
    assert not start_at_identity(nn.Linear(3, 10), 2, 2, parameter_major=False)  # random weights: left alone
    assert not start_at_identity(nn.ReLU(), 2, 2, parameter_major=False)


def test_a_conditioner_with_a_lazy_output_layer_is_taken_as_it_is():
    """start_at_identity read the bias of an nn.LazyLinear before its first forward: an error at construction,
    where AffineCoupling takes lazy conditioners."""
    layer = SplineCoupling(
        6, vectors=True, subnet=lambda i, o: nn.Sequential(nn.Linear(i, 16), nn.ReLU(), nn.LazyLinear(o))
    )
    x = torch.randn(5, 6)
    y, logdet = layer(x)
    assert y.shape == x.shape and logdet.shape == (5,)
    torch.testing.assert_close(layer.inverse(y)[0], x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logdet_matches_the_brute_force_jacobian(name):
    layer, x, context = _perturbed(name, 0.1 if name.startswith("images") else 0.3)
    y, logdet = layer(x, context)
    rows = [None if context is None else context[i : i + 1] for i in range(x.shape[0])]
    expected = torch.cat([brute_force_logdet(lambda v, r=r: layer(v, r)[0], x[i : i + 1]) for i, r in enumerate(rows)])
    assert (y - x).abs().max() > 1e-2, "the perturbed layer must not be the identity"
    torch.testing.assert_close(logdet, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inverse_round_trip_and_negated_logdet(name):
    layer, x, context = _perturbed(name, 0.1 if name.startswith("images") else 0.3)
    y, logdet = layer(x, context)
    x_back, inverse_logdet = layer.inverse(y, context)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-10, rtol=1e-10)


def test_the_coupling_passes_the_conditioning_half_through():
    layer, x, context = _perturbed("vectors_parity1_context")
    y, _ = layer(x, context)
    assert torch.equal(y[:, 3:], x[:, 3:])  # parity 1: the last C // 2 = 2 features condition
    image, x, context = _perturbed("images_context", 0.1)
    y, _ = image(x, context)
    assert torch.equal(y[:, :1], x[:, :1])


@pytest.mark.parametrize("parity", [0, 1])
def test_the_checkerboard_passes_the_masked_positions_through(parity):
    """Under the mask every element goes through the spline with the identity's raw parameters: out to float64
    rounding, and the log-det is that of the unmasked positions alone (brute force over them)."""
    layer = SplineCoupling(2, 6, bins=4, parity=parity, mask="checkerboard").double()
    perturb_parameters(layer, 0.1)
    x = 1.5 * torch.randn(2, 2, 3, 4, dtype=torch.float64)
    y, logdet = layer(x)
    masked = layer._checkerboard(x).bool().expand_as(x)
    torch.testing.assert_close(y[masked], x[masked], atol=1e-14, rtol=1e-14)
    assert (y[~masked] - x[~masked]).abs().max() > 1e-2
    for i in range(x.shape[0]):

        def unmasked(v, i=i):
            full = x[i : i + 1].clone()
            full[~masked[i : i + 1]] = v
            return layer(full)[0][~masked[i : i + 1]]

        jac = torch.autograd.functional.jacobian(unmasked, x[i : i + 1][~masked[i : i + 1]])
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1], atol=1e-12, rtol=1e-12)


def test_made_is_autoregressive_with_the_context_reaching_every_feature():
    torch.manual_seed(0)
    made = MADE(4, 2, hidden=12, params=3, depth=2).double()
    perturb_parameters(made, 0.5)
    inputs = torch.randn(6, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(made, inputs).view(4, 3, 6)  # (feature, param, input)
    # which inputs reach which outputs through the masks (the Jacobian at one point may miss a dead ReLU's path)
    masks = [m.mask for m in made if hasattr(m, "mask")]
    reach = masks[0]
    for mask in masks[1:]:
        reach = mask @ reach
    reach = reach.view(4, 3, 6) > 0
    for i in range(4):
        assert torch.all(jac[i, :, i:4] == 0), f"feature {i}'s parameters see x_{i} or later"
        assert not reach[i, :, i:4].any()
        assert reach[i, :, :i].all(), f"feature {i}'s parameters miss an earlier x"
        assert reach[i, :, 4:].all(), f"feature {i}'s parameters miss the context"


def _reach(made: MADE) -> torch.Tensor:
    """Which inputs reach which outputs through the masks: ``(outputs, inputs)`` bools."""
    masks = [m.mask for m in made if hasattr(m, "mask")]
    reach = masks[0]
    for mask in masks[1:]:
        reach = mask @ reach
    return reach > 0


@torch.no_grad()
def _positive_weights(made: MADE) -> None:
    """Positive weights and biases: on positive inputs every ReLU is active, so each path the masks leave shows in
    the Jacobian (at the narrowest width one dead unit would hide a whole degree)."""
    for layer in made:
        if hasattr(layer, "mask"):
            layer.weight.uniform_(0.1, 0.4)
            layer.bias.fill_(0.1)


def _strictly_lower(features: int, params: int) -> torch.Tensor:
    """``(features, params, features)``: output block ``i`` connected to inputs ``j < i``."""
    return torch.ones(features, features, dtype=torch.bool).tril(-1)[:, None, :].expand(-1, params, -1)


@pytest.mark.parametrize(("features", "context"), [(7, 0), (5, 2)])
def test_made_at_its_narrowest_is_fully_autoregressive(features, context):
    """At the narrowest ``hidden`` it takes (``features - 1``, or ``features`` with a context) every output block
    ``i`` depends on every input ``j < i`` (and on the context) and on no other: through the masks, and in the
    Jacobian."""
    torch.manual_seed(0)
    hidden = min_made_hidden(features, context)
    assert hidden == (features if context else features - 1)
    made = MADE(features, context, hidden=hidden, params=2, depth=2).double()
    _positive_weights(made)
    total = features + context
    jac = torch.autograd.functional.jacobian(made, torch.rand(total, dtype=torch.float64)).view(features, 2, total)
    reach = _reach(made).view(features, 2, total)
    lower = _strictly_lower(features, 2)
    assert torch.equal(reach[..., :features], lower) and torch.equal(jac[..., :features] != 0, lower)
    assert reach[..., features:].all() and (jac[..., features:] != 0).all()


def test_made_warns_of_a_hidden_width_that_drops_dependencies():
    """Narrower than ``features - 1`` the hidden units cycle through degrees 1..hidden only, so later features
    never see the inputs beyond ``hidden``: a warning naming ``hidden``, ``features`` and the minimum (not an
    error: such a MADE is a valid flow, and NSF models with one were saved)."""
    with pytest.warns(UserWarning, match="hidden should be >= 9 for 10 features .* got 4"):
        MADE(10, 0, hidden=4, params=1)
    with pytest.warns(UserWarning, match="hidden should be >= 10 for 10 features and a context .* got 9"):
        MADE(10, 2, hidden=9, params=1)
    with pytest.warns(UserWarning, match="hidden should be >= 9 for 10 features"):
        MaskedAutoregressiveSpline(10, hidden=8)
    assert min_made_hidden(1, 0) == 1 and min_made_hidden(1, 3) == 1
    assert default_made_hidden(10, 0) == 64 and default_made_hidden(100, 0) == 99 and default_made_hidden(100, 2) == 100


def test_masked_autoregressive_spline_jacobian_is_full_lower_triangular():
    """At the narrowest ``hidden``, ``y_i`` depends on ``x_i`` and, through its raw parameters, on every ``x_j``,
    ``j < i``; on no later one. The default width (64, or ``features - 1`` where wider) covers any number of
    features: at 100 the masks connect every earlier input (64 hidden units, the old default, reached 64 of them)."""
    torch.manual_seed(0)
    layer = MaskedAutoregressiveSpline(6, hidden=5, bins=4).double()
    _positive_weights(layer.net)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], torch.rand(1, 6, dtype=torch.float64))
    assert torch.equal(jac.view(6, 6) != 0, torch.ones(6, 6, dtype=torch.bool).tril())
    wide = MaskedAutoregressiveSpline(100)
    assert wide.hidden == 99
    assert torch.equal(_reach(wide.net).view(100, -1, 100), _strictly_lower(100, 3 * 8 - 1))


@pytest.mark.parametrize(
    "make", [lambda: SplineCoupling(4, 8, bins=500, vectors=True), lambda: MaskedAutoregressiveSpline(2, 8, bins=500)]
)
def test_the_most_bins_a_layer_takes_keep_learnable_widths_and_heights(make):
    """At ``MAX_LAYER_BINS`` = 500 the minimum sizes (1e-3 of the range each) fix half of ``[-bound, bound]``: the
    raw widths and heights still get gradients. At 1000 bins, the old cap, every bin is the minimum and their
    gradients are exactly 0 (``1 - 1000 * 1e-3 = 0``)."""
    assert MAX_LAYER_BINS == 500 and MAX_LAYER_BINS * 1e-3 <= 0.5
    torch.manual_seed(0)
    layer = make().double()
    perturb_parameters(layer, 0.1)
    x = torch.randn(8, 4 if isinstance(layer, SplineCoupling) else 2, dtype=torch.float64)
    y, logdet = layer(x)
    out = [m for m in layer.net.modules() if isinstance(m, nn.Linear)][-1]
    (grad,) = torch.autograd.grad(0.5 * y.square().sum() - logdet.sum(), out.bias)
    grad = grad.view(-1, 3 * 500 - 1)
    assert grad[:, :500].abs().max() > 1e-8 and grad[:, 500:1000].abs().max() > 1e-8
    raw = torch.randn(4, 2, 3 * 1000 - 1, dtype=torch.float64, requires_grad=True)
    y, logdet = rq_spline(torch.randn(4, 2, dtype=torch.float64), raw, 1000)
    (grad,) = torch.autograd.grad(y.sum() + logdet.sum(), raw)
    assert not grad[..., :2000].any() and grad[..., 2000:].any()


def _stack(kind: str) -> FlowSequential:
    if kind == "vectors":
        return FlowSequential(
            InvertibleLinear(5),
            SplineCoupling(5, 8, bins=4, context_features=3, vectors=True),
            Permutation(5, "random"),
            SplineCoupling(5, bins=3, parity=1, subnet=tanh_mlp, context_features=3, vectors=True),
            MaskedAutoregressiveSpline(5, 12, bins=3, context_features=3),
        )
    return FlowSequential(
        SplineCoupling(2, 6, bins=4, context_features=3),
        Squeeze(),
        SplineCoupling(8, bins=3, parity=1, subnet=HaloConv, context_features=3),
        SplineCoupling(8, 6, bins=3, mask="checkerboard", context_features=3),
        Permutation(8, "random"),
    )


STACKS = {"vectors": ((4, 5), (4, 3)), "images": ((3, 2, 4, 6), (3, 3))}


def _chain(kind: str, scale: float) -> tuple[FlowSequential, torch.Tensor, torch.Tensor]:
    x_shape, c_shape = STACKS[kind]
    chain = _stack(kind).double().train()
    perturb_parameters(chain, scale)
    return chain, 1.5 * torch.randn(*x_shape, dtype=torch.float64), torch.randn(*c_shape, dtype=torch.float64)


@pytest.mark.parametrize("kind", sorted(STACKS))
def test_reversible_gradients_equal_standard_backprop(kind):
    chain, x, context = _chain(kind, 0.2 if kind == "vectors" else 0.1)
    standard = chain_loss_and_grads(chain, x, context, reversible=False)
    reversible = chain_loss_and_grads(chain, x, context, reversible=True)
    assert standard[2].abs().max() > 1e-6, "the context gradient must not be trivially zero"
    for i, (got, want) in enumerate(zip(reversible, standard)):
        assert got is not None, f"gradient {i} missing"
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8, msg=lambda m, i=i: f"result {i}: {m}")


def test_reversible_tiled_image_stack_equals_standard():
    chain, x, context = _chain("images", 0.1)
    standard = chain_loss_and_grads(chain, x, context, reversible=False)
    for module in chain.modules():
        if isinstance(module, SplineCoupling):
            module.tiling = Tiling(tile_size=2)
    tiled = chain_loss_and_grads(chain, x, context, reversible=True)
    for got, want in zip(tiled, standard):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


needs_interpreter = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)")


@needs_interpreter
@pytest.mark.parametrize(
    "name", ["vectors_parity1_context", "images_context", "images_checkerboard", "autoregressive_context"]
)
def test_the_kernels_match_eager(name):
    """float32 forward, inverse and gradients on the kernels (interpreter) against the eager twin."""
    layer, x, context = _perturbed(name, 0.1 if name.startswith("images") else 0.3)
    layer = layer.float()
    x, context = x.float(), None if context is None else context.float()
    results = {}
    for backend in ("eager", "interpret"):
        layer.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        with fastflow.backend(backend):
            y, logdet = layer(leaf, context)
            (y.square().sum() - logdet.sum()).backward()
            with torch.no_grad():
                x_back, inverse_logdet = layer.inverse(y, context)
        results[backend] = [y, logdet, x_back, inverse_logdet, leaf.grad, *(p.grad for p in layer.parameters())]
    for got, want in zip(results["interpret"], results["eager"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_interpreter
def test_reversible_vector_stack_on_the_kernels_equals_standard_eager():
    chain, x, context = _chain("vectors", 0.2)
    eager = chain_loss_and_grads(chain, x, context, reversible=False)
    fused = chain_loss_and_grads(chain, x, context, reversible=True, backend="interpret")
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: SplineCoupling(4, bins=1, vectors=True), ValueError, "bins must be >= 2"),  # one bin: the identity
        (lambda: SplineCoupling(4, bins=2.0, vectors=True), TypeError, "bins must be an int"),
        (lambda: SplineCoupling(4, bins=1001, vectors=True), ValueError, "bins must be <= 1000"),
        (lambda: MaskedAutoregressiveSpline(3, bins=1001), ValueError, "bins must be <= 1000"),
        (lambda: SplineCoupling(4, bound=-1.0, vectors=True), ValueError, "bound must be finite and > 0"),
        (lambda: SplineCoupling(4, bound="3", vectors=True), TypeError, "bound must be a float"),
        (lambda: SplineCoupling(1, vectors=True), ValueError, "num_channels >= 2"),
        (lambda: SplineCoupling(4, parity=2, vectors=True), ValueError, "parity must be 0 or 1"),
        (lambda: SplineCoupling(4, subnet=3, vectors=True), TypeError, "subnet must be an nn.Module"),
        (lambda: MaskedAutoregressiveSpline(0), ValueError, "features must be >= 1"),
        (lambda: MaskedAutoregressiveSpline(3, bins=1.5), TypeError, "bins must be an int"),
        (lambda: MaskedAutoregressiveSpline(3, bound=float("inf")), ValueError, "bound must be finite"),
        (lambda: MaskedAutoregressiveSpline(3, context_features=-1), ValueError, "context_features must be"),
        (lambda: MaskedAutoregressiveSpline(3, depth=0), ValueError, "depth must be >= 1"),
        (lambda: MaskedAutoregressiveSpline(3, depth=1.5), TypeError, "depth must be an int, got float 1.5"),
    ],
)
def test_bad_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: SplineCoupling(4, 8, vectors=True)(torch.randn(2, 4, 3, 3)), ValueError, r"vectors \(B, D\)"),
        (lambda: SplineCoupling(4, 8)(torch.randn(2, 4)), ValueError, r"images \(B, C, H, W\)"),
        (lambda: SplineCoupling(4, 8, vectors=True)(torch.randn(2, 5)), ValueError, "5 features .* built for 4"),
        (
            lambda: SplineCoupling(4, 8, context_features=2, vectors=True)(torch.randn(2, 4)),
            ValueError,
            "context is required",
        ),
        (lambda: MaskedAutoregressiveSpline(4)(torch.randn(2, 4, 1, 1)), ValueError, r"vectors \(B, D\)"),
        (lambda: MaskedAutoregressiveSpline(4).inverse(torch.randn(2, 3)), ValueError, "3 features .* built for 4"),
        (
            lambda: MaskedAutoregressiveSpline(4, context_features=2)(torch.randn(2, 4), torch.randn(2, 3)),
            ValueError,
            "context has 3 features",
        ),
        (lambda: MaskedAutoregressiveSpline(4)(torch.ones(2, 4, dtype=torch.int64)), TypeError, "floating-point"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    "make", [lambda: SplineCoupling(4, bins=501, vectors=True), lambda: MaskedAutoregressiveSpline(3, bins=501)]
)
def test_more_bins_than_half_the_range_allows_warn(make):
    """Above MAX_LAYER_BINS the minimum bin sizes fix more than half of the range: a warning, not an error (layers
    saved with up to 1000 bins, the earlier limit, still load)."""
    with pytest.warns(UserWarning, match="bins should be <= 500: .* more than half"):
        make()
