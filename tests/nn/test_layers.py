"""Every flow layer: brute-force Jacobian log-det, exact inverse, inverse log-det, clear errors."""

from __future__ import annotations

import pytest
import torch

from fastflow.nn import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    FlowSequential,
    FlowStep,
    InvConv1x1,
    Split,
    Squeeze,
)
from tests.helpers import brute_force_logdet, perturb_parameters

LAYERS = {
    "actnorm": lambda: ActNorm(3),
    "invconv_lu": lambda: InvConv1x1(3, lu=True),
    "invconv_plain": lambda: InvConv1x1(3, lu=False),
    "affine_sigmoid": lambda: AffineCoupling(3, hidden=8, scale="sigmoid"),
    "affine_exp": lambda: AffineCoupling(3, hidden=8, scale="exp"),
    "affine_exp_parity1": lambda: AffineCoupling(3, hidden=8, scale="exp", parity=1),
    "affine_checkerboard": lambda: AffineCoupling(3, hidden=8, scale="exp", mask="checkerboard"),
    "additive": lambda: AdditiveCoupling(3, hidden=8),
    "additive_checkerboard": lambda: AdditiveCoupling(3, hidden=8, mask="checkerboard", parity=1),
    "squeeze": lambda: Squeeze(),
    "flow_step": lambda: FlowStep(3, hidden=8),
    "flow_step_additive_plain": lambda: FlowStep(3, hidden=8, lu=False, coupling="additive"),
    "sequential": lambda: FlowSequential(FlowStep(3, hidden=8), FlowStep(3, hidden=8, scale="exp")),
}


def _layer(name: str, scale: float = 0.3) -> torch.nn.Module:
    layer = LAYERS[name]().double()
    perturb_parameters(layer, scale)
    return layer.eval()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logdet_matches_brute_force_jacobian(name):
    layer = _layer(name)
    x = torch.randn(2, 3, 4, 2, dtype=torch.float64)
    _, logdet = layer(x)
    expected = brute_force_logdet(lambda v: layer(v)[0], x)
    assert logdet.shape == (2,)
    torch.testing.assert_close(logdet, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inverse_recovers_input_and_negates_logdet(name):
    layer = _layer(name, scale=0.1).float()
    x = torch.randn(3, 3, 6, 4)
    y, logdet = layer(x)
    x_back, inv_logdet = layer.inverse(y)
    torch.testing.assert_close(x_back, x, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-4, rtol=1e-5)
    assert logdet.dtype == torch.float32


def test_half_input_gives_float32_logdet():
    layer = AffineCoupling(4, hidden=8).to(torch.bfloat16)
    _, logdet = layer(torch.randn(2, 4, 4, 4, dtype=torch.bfloat16))
    assert logdet.dtype == torch.float32


def test_actnorm_data_dependent_init_normalises_first_batch_once():
    layer = ActNorm(5).train()
    x = 3.0 + 2.0 * torch.randn(64, 5, 8, 8)
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert bool(layer.initialized)
    bias = layer.bias.detach().clone()
    layer(torch.randn(4, 5, 8, 8))
    torch.testing.assert_close(layer.bias.detach(), bias)


def test_actnorm_init_is_exact_for_a_large_mean_in_float64():
    """Two-pass statistics in the layer's dtype: a one-pass E[x^2] - E[x]^2 in float32 gives std ~1e4 or ~0.02."""
    torch.manual_seed(0)
    layer = ActNorm(4).double().train()
    y, _ = layer(1000 + 0.01 * torch.randn(8, 4, 8, 8, dtype=torch.float64))
    assert y.dtype == torch.float64
    torch.testing.assert_close(
        y.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_actnorm_init_is_accurate_for_a_large_mean_in_float32():
    torch.manual_seed(0)
    layer = ActNorm(4).train()
    y, _ = layer(1000 + torch.randn(16, 4, 16, 16))
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_actnorm_single_valued_channel_keeps_scale_one_and_warns_naming_the_layer():
    from fastflow.models import Glow

    model = Glow(1, 4, levels=2, steps=1, hidden=8).train()
    with pytest.warns(RuntimeWarning, match=r"blocks\.1\.layers\.1\.layers\.0: channel.*single value"):
        model.log_prob(torch.rand(1, 1, 4, 4) - 0.5)  # batch 1: the second level is 1x1
    top = model.blocks[1].layers[1].layers[0]
    assert isinstance(top, ActNorm) and top.logs.abs().max() == 0
    x = torch.rand(8, 1, 4, 4) - 0.5
    assert torch.isfinite(model.eval().bits_per_dim(x)).all()
    assert model.bits_per_dim(x).mean() < 100


def test_actnorm_initialized_flag_survives_state_dict():
    trained = ActNorm(2).train()
    trained(torch.randn(8, 2, 4, 4) * 5)
    fresh = ActNorm(2).train()
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(8, 2, 4, 4)
    torch.testing.assert_close(fresh(x)[0], trained(x)[0])


def test_lu_invconv_logdet_is_sum_of_log_s_times_pixels():
    layer = InvConv1x1(6, lu=True)
    perturb_parameters(layer)
    weight, weight_logdet = layer.weight_and_logdet()
    torch.testing.assert_close(weight_logdet, torch.linalg.slogdet(weight)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.inverse_weight() @ weight, torch.eye(6), atol=1e-5, rtol=1e-5)


def test_split_round_trip_and_prior():
    split = Split(6).double()
    perturb_parameters(split)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    z_keep, z_out, log_p = split(x)
    assert z_keep.shape == (2, 3, 3, 3) and z_out.shape == (2, 3, 3, 3) and log_p.shape == (2,)
    torch.testing.assert_close(split.inverse(z_keep, z_out), x)
    sampled = split.inverse(z_keep, temperature=0.5)
    torch.testing.assert_close(sampled[:, :3], z_keep)


@pytest.mark.parametrize(
    "make, bad, error, match",
    [
        (lambda: ActNorm(3), torch.randn(2, 3, 4), ValueError, "rank 3"),
        (lambda: ActNorm(3), torch.randn(2, 4, 4, 4), ValueError, "channel mismatch"),
        (lambda: InvConv1x1(3), torch.randn(2, 5, 4, 4), ValueError, "channel mismatch"),
        (lambda: AffineCoupling(4, hidden=8), torch.randn(2, 3, 4, 4), ValueError, "channel mismatch"),
        (lambda: AffineCoupling(4, hidden=8), torch.randint(0, 3, (2, 4, 4, 4)), TypeError, "floating"),
        (lambda: Squeeze(), torch.randn(2, 3, 5, 4), ValueError, "even height and width"),
        (lambda: Squeeze(), torch.randn(3, 4, 4), ValueError, "rank 3"),
        (lambda: FlowStep(4, hidden=8), [1.0, 2.0], TypeError, "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, bad, error, match):
    with pytest.raises(error, match=match):
        make()(bad)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AffineCoupling(1, hidden=8), "num_channels >= 2"),
        (lambda: AffineCoupling(4, hidden=8, scale="tanh"), "scale must be one of"),
        (lambda: AffineCoupling(4, hidden=8, mask="checkerboard"), "needs scale='exp'"),
        (lambda: AffineCoupling(4, hidden=8, mask="stripes"), "mask must be"),
        (lambda: FlowStep(4, hidden=8, coupling="spline"), "coupling must be"),
        (lambda: ActNorm(0), "num_channels must be >= 1"),
        (lambda: FlowSequential(torch.nn.ReLU()), "not invertible"),
    ],
)
def test_bad_constructor_arguments_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
