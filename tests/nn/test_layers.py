"""Every flow layer: brute-force Jacobian log-det, exact inverse, inverse log-det, clear errors."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastflow
from fastflow.backend import interpreter_enabled
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
from fastflow.nn.invconv import exact_dtype, stacked_weights
from fastflow.nn.squeeze import squeeze2d, unsqueeze2d
from fastflow.nn.tiling import Tiling
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_actnorm_refuses_to_initialise_from_a_nonfinite_batch_and_stays_uninitialised(bad):
    layer = ActNorm(3)
    x = torch.randn(4, 3, 2, 2)
    poisoned = x.clone()
    poisoned[1, 2, 0, 1] = bad
    with pytest.raises(ValueError, match=r"ActNorm: cannot initialise from a batch of shape \(4, 3, 2, 2\)"):
        layer(poisoned)
    assert not layer.is_initialized and not bool(layer.initialized)
    assert torch.equal(layer.logs, torch.zeros_like(layer.logs)) and torch.equal(
        layer.bias, torch.zeros_like(layer.bias)
    )
    y, _ = layer(x)  # the next batch initialises it
    assert layer.is_initialized and bool(torch.isfinite(y).all())


def test_layers_take_an_empty_batch_once_initialised_and_actnorm_refuses_to_initialise_from_one():
    step = FlowStep(4, 8, vectors=True)
    with pytest.raises(ValueError, match=r"cannot initialise from an empty batch \(shape \(0, 4\)\)"):
        step(torch.randn(0, 4))
    step(torch.randn(5, 4))
    for layer, x in ((step, torch.randn(0, 4)), (AffineCoupling(4, 8), torch.randn(0, 4, 4, 4))):
        y, logdet = layer(x)
        assert y.shape == x.shape and logdet.shape == (0,)


def test_actnorm_init_of_values_whose_float32_squares_overflow():
    layer = ActNorm(2)
    x = torch.randn(64, 2) * 1e20  # the variance, 1e40, overflows float32
    y, logdet = layer(x)
    assert bool(torch.isfinite(layer.logs).all()) and bool(torch.isfinite(logdet).all())
    torch.testing.assert_close(y.double().std(0), torch.ones(2, dtype=torch.float64), rtol=0.05, atol=0)


def test_actnorm_initialized_flag_survives_state_dict():
    trained = ActNorm(2).train()
    trained(torch.randn(8, 2, 4, 4) * 5)
    fresh = ActNorm(2).train()
    fresh.load_state_dict(trained.state_dict())
    x = torch.randn(8, 2, 4, 4)
    torch.testing.assert_close(fresh(x)[0], trained(x)[0])


def test_actnorm_keeps_parameters_moved_before_its_first_forward():
    """Parameters trained through the inverse alone (an rsample objective) or set by hand were overwritten by the
    data-dependent initialisation at the first training-mode forward; they are kept, the layer then initialised."""
    layer = ActNorm(2).train()
    x, _ = layer.inverse(torch.randn(16, 2))
    (x.square().mean() + x.mean()).backward()
    with torch.no_grad():
        for p in layer.parameters():
            p -= 0.1 * p.grad
    moved = [p.detach().clone() for p in layer.parameters()]
    layer(torch.randn(16, 2) * 5 + 3)
    assert layer.is_initialized and bool(layer.initialized)
    for p, before in zip(layer.parameters(), moved):
        assert torch.equal(p.detach(), before)
    by_hand = ActNorm(2).train()
    with torch.no_grad():
        by_hand.logs[0, 1] = 0.5  # the bias left at 0: one moved parameter is enough
    by_hand(torch.randn(16, 2) * 5 + 3)
    assert torch.equal(by_hand.logs.flatten(), torch.tensor([0.0, 0.5])) and not bool(by_hand.bias.any())
    fresh = ActNorm(2).train()  # construction values: initialised from the batch as before
    fresh(torch.randn(16, 2) * 5 + 3)
    assert bool(fresh.bias.any()) and bool(fresh.logs.any())


def test_lu_invconv_logdet_is_sum_of_log_s_times_pixels():
    layer = InvConv1x1(6, lu=True)
    perturb_parameters(layer)
    weight, weight_logdet = layer.weight_and_logdet()
    torch.testing.assert_close(weight_logdet, torch.linalg.slogdet(weight)[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.inverse_weight() @ weight, torch.eye(6), atol=1e-5, rtol=1e-5)


def _two_matrix_state(layer: InvConv1x1) -> dict[str, torch.Tensor]:
    """``layer``'s state dict in the first LU form: L's strict lower part and U's strict upper part as two
    ``C x C`` parameters, their unused triangles holding arbitrary values (which must be ignored), and ``log_s``."""
    state = dict(layer.state_dict())
    packed = state.pop("lu_packed")
    noise = torch.randn_like(packed)
    state["lower"] = torch.tril(packed, -1) + torch.triu(noise)
    state["upper"] = torch.triu(packed, 1) + torch.tril(noise)
    state["log_s"] = torch.diagonal(packed).clone()
    return state


def _separate_log_s_state(layer: InvConv1x1) -> dict[str, torch.Tensor]:
    """``layer``'s state dict in the second LU form: ``lu_packed`` with an unused (arbitrary) diagonal beside a
    separate ``log_s``."""
    state = dict(layer.state_dict())
    packed = state["lu_packed"]
    state["log_s"] = torch.diagonal(packed).clone()
    state["lu_packed"] = packed - torch.diag(torch.diagonal(packed)) + torch.diag(torch.randn(packed.shape[0]))
    return state


@pytest.mark.parametrize("lu", [True, False])
def test_invconv_starts_at_the_identity_or_the_reversal_when_asked(lu):
    eye = torch.eye(5)
    for init, want in (("identity", eye), ("reverse", eye.flip(0))):
        weight, logdet = InvConv1x1(5, lu=lu, init=init).weight_and_logdet()
        torch.testing.assert_close(weight, want, rtol=0, atol=0)
        torch.testing.assert_close(logdet, torch.tensor(0.0), rtol=0, atol=1e-7)
    rotation = InvConv1x1(5, lu=lu).weight_and_logdet()[0]
    torch.testing.assert_close(rotation @ rotation.T, eye, rtol=0, atol=1e-5)
    assert not torch.allclose(rotation.abs(), eye, atol=0.1)


@pytest.mark.parametrize("earlier", [_two_matrix_state, _separate_log_s_state])
def test_lu_invconv_loads_the_earlier_state_dicts(earlier):
    layer = InvConv1x1(5, lu=True)
    perturb_parameters(layer)
    fresh = InvConv1x1(5, lu=True)
    fresh.load_state_dict(earlier(layer))
    assert [name for name, _ in fresh.named_parameters()] == ["lu_packed"]
    for got, want in zip(fresh.weight_and_logdet(), layer.weight_and_logdet()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(fresh.inverse_weight(), layer.inverse_weight(), rtol=0, atol=0)


def test_lu_invconv_log_s_is_the_packed_diagonal_and_trains():
    layer = InvConv1x1(4, lu=True)
    assert layer.log_s.data_ptr() == layer.lu_packed.data_ptr()
    torch.testing.assert_close(layer.log_s, torch.diagonal(layer.lu_packed), rtol=0, atol=0)
    layer.weight_and_logdet()[1].backward()
    torch.testing.assert_close(layer.lu_packed.grad, torch.eye(4), rtol=0, atol=0)  # d sum(log_s): the diagonal


@pytest.mark.parametrize("lu", [True, False])
def test_stacked_weights_match_each_convolution(lu):
    convs = [InvConv1x1(5, lu=lu).double() for _ in range(3)]
    for conv in convs:
        perturb_parameters(conv)
    weights, logdets = stacked_weights(convs)
    inverses, inverse_logdets = stacked_weights(convs, inverse=True)
    exact = {"atol": 1e-12, "rtol": 1e-12}  # a batched solve, slogdet or inv may round differently
    for conv, weight, logdet, inverse, inverse_logdet in zip(convs, weights, logdets, inverses, inverse_logdets):
        torch.testing.assert_close(weight, conv.weight_and_logdet()[0], **exact)
        torch.testing.assert_close(logdet, conv.weight_and_logdet()[1], **exact)
        torch.testing.assert_close(inverse, conv.inverse_weight(), **exact)
        torch.testing.assert_close(inverse_logdet, conv.weight_logdet(), **exact)
    with pytest.raises(ValueError, match="one num_channels and lu"):
        stacked_weights([InvConv1x1(5, lu=lu), InvConv1x1(5, lu=not lu)])


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched inside the block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _one_by_one(layers, inverse=False):
    """The chain ``layers`` run layer by layer (each FlowStep computing its own weights)."""

    def run(x):
        total = 0
        for layer in reversed(layers) if inverse else layers:
            x, logdet = layer.inverse(x) if inverse else layer(x)
            total = total + logdet
        return x, total

    return run


@pytest.mark.parametrize("lu", [True, False])
def test_level_computes_its_step_weights_once_for_all_steps(lu):
    """A chain of FlowSteps (a Glow level) assembles, inverts and log-dets the 1x1 weights of all its steps in one
    batched computation, with the outputs, log-dets, gradients and inverse of the steps run one by one."""
    level = FlowSequential(Squeeze(), *[FlowStep(8, hidden=4, lu=lu) for _ in range(3)]).double().train()
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    level(x)  # ActNorm init
    perturb_parameters(level, 0.2)
    # an op each step's weight needs once (forward), and once or twice (inverse: two triangular solves)
    forward_op, inverse_op, per_step = (
        ("triu", "linalg_solve_triangular", 2) if lu else ("_linalg_slogdet", "linalg_inv_ex", 1)
    )
    results, counts = [], []
    for forward, inverse in ((level, level.inverse), (_one_by_one(level.layers), _one_by_one(level.layers, True))):
        level.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        with OpCounter() as forward_ops:
            y, logdet = forward(x_in)
        (y.square().sum() + (logdet * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum()).backward()
        with OpCounter() as inverse_ops:
            x_back, inverse_logdet = inverse(y.detach())
        results.append([y, logdet, x_in.grad, *(p.grad for p in level.parameters()), x_back, inverse_logdet])
        counts.append((forward_ops.counts[forward_op], inverse_ops.counts[inverse_op]))
    for batched, one_by_one in zip(*results):
        torch.testing.assert_close(batched, one_by_one, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(results[0][-2], x)
    assert counts == [(1, per_step), (3, 3 * per_step)]


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
        (lambda: squeeze2d, torch.randn(4, 4, 4), ValueError, r"x must have shape \(B, C, H, W\), got rank 3"),
        (lambda: unsqueeze2d, torch.randn(2, 3), ValueError, r"y must have shape \(B, C, H, W\), got rank 2"),
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
        (lambda: FlowStep(4, hidden=8, coupling="quadratic"), "coupling must be"),
        (lambda: ActNorm(0), "num_channels must be >= 1"),
        (lambda: ActNorm(2.5), "num_channels must be an int, got float 2.5"),
        (lambda: InvConv1x1(2.5), "num_channels must be an int, got float 2.5"),
        (lambda: AffineCoupling(4.0, hidden=8), "num_channels must be an int, got float 4.0"),
        (lambda: AffineCoupling(4, hidden=8.0), "hidden must be an int, got float 8.0"),
        (lambda: InvConv1x1(4, init="orthogonal"), "init must be one of"),
        (lambda: FlowSequential(torch.nn.ReLU()), "not invertible"),
        (lambda: Split(1), "num_channels must be >= 2"),
        (lambda: Split(4.0), "num_channels must be an int, got float 4.0"),
        (lambda: Split("4"), "num_channels must be an int, got str '4'"),
        (lambda: Split(4, learned_prior="no"), "learned_prior must be a bool, got str 'no'"),
    ],
)
def test_bad_constructor_arguments_raise(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_pointwise_conv_equals_nn_conv2d_and_loads_its_state_dict():
    """Glow's network's 1x1 convolution: the values, float64 gradients and ``state_dict`` of ``nn.Conv2d(h, h, 1)``
    (a checkpoint saved with a plain convolution loads), on NCHW and channels_last inputs."""
    from fastflow.nn import ConvNetwork
    from fastflow.nn.coupling_network import PointwiseConv2d

    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 6, kernel_size=1).double()
    layer = PointwiseConv2d(4, 6).double()
    layer.load_state_dict(plain.state_dict())
    assert isinstance(ConvNetwork(3, 8, 6)[2], PointwiseConv2d)
    for x in (torch.randn(3, 4, 5, 3), torch.randn(1, 4, 2, 7).contiguous(memory_format=torch.channels_last)):
        x = x.double().requires_grad_()
        params = [x, *layer.parameters()]
        torch.testing.assert_close(layer(x), plain(x), atol=1e-13, rtol=1e-13)
        grad = torch.randn(x.shape[0], 6, *x.shape[2:], dtype=torch.float64)
        got = torch.autograd.grad(layer(x), params, grad)
        want = torch.autograd.grad(plain(x), [x, *plain.parameters()], grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def _zero_conv_old_formula(layer, x):
    """``ZeroConv2d``'s output as it was computed before the scale was folded into the convolution."""
    return layer.conv(x) * torch.exp(layer.logs * layer.logscale_factor)


def test_zero_conv_folds_its_output_scale_into_the_convolution():
    """Same outputs and gradients as ``conv(x) * exp(3 * logs)`` in float64, the same ``state_dict`` (a saved
    one loads unchanged), and the only activation-sized work is the convolution and its backward."""
    from fastflow.nn import ZeroConv2d

    layer = ZeroConv2d(6, 4).double()
    perturb_parameters(layer, 0.3)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    params = [x, *layer.parameters()]
    new = torch.autograd.grad(layer(x), params, grad)
    old = torch.autograd.grad(_zero_conv_old_formula(layer, x), params, grad)
    torch.testing.assert_close(layer(x), _zero_conv_old_formula(layer, x), atol=1e-13, rtol=1e-13)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)

    saved = {name: t.clone() for name, t in layer.state_dict().items()}
    assert sorted(saved) == ["conv.bias", "conv.weight", "logs"]
    fresh = ZeroConv2d(6, 4).double()
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh(x), _zero_conv_old_formula(layer, x), atol=1e-13, rtol=1e-13)

    class ActivationOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [t for t in (*args, *(out if isinstance(out, (tuple, list)) else (out,))) if torch.is_tensor(t)]
            if any(t.shape == grad.shape for t in tensors) and func.__name__.split(".")[0] not in ("detach", "view"):
                self.names.append(func.__name__.split(".")[0])
            return out

    with ActivationOps() as ops:
        torch.autograd.grad(layer(x), params, grad)
    assert ops.names == ["convolution", "convolution_backward"]


class _OpNames(TorchDispatchMode):
    """Names of the ATen / fastflow ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


CHANNEL_COUPLINGS = {
    "affine_sigmoid": lambda: AffineCoupling(5, hidden=8, scale="sigmoid"),
    "affine_exp_parity1": lambda: AffineCoupling(5, hidden=8, scale="exp", parity=1),
    "additive": lambda: AdditiveCoupling(5, hidden=8),
    "additive_parity1": lambda: AdditiveCoupling(5, hidden=8, parity=1),
}


def _coupling_passes(layer, x, grad_y, grad_logdet, backend):
    """Standard forward + backward, reversible backward untiled and tiled; with the op names of the first three."""
    with fastflow.backend(backend):
        x = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        with _OpNames() as forward:
            y, logdet = layer(x)
        with _OpNames() as backward:
            outputs = [(y, grad_y), *([(logdet, grad_logdet)] if logdet.requires_grad else [])]
            torch.autograd.backward(*zip(*outputs))
        standard = [y, logdet, x.grad, *(p.grad.clone() for p in layer.parameters())]
        layer.zero_grad(set_to_none=True)
        with _OpNames() as reversible_backward:
            reversible = [*layer.backward_from_output(y.detach(), grad_y, grad_logdet)]
        reversible += [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        layer.tiling = Tiling(tile_size=2)
        tiled = [*layer.backward_from_output(y.detach(), grad_y, grad_logdet)]
        tiled += [p.grad.clone() for p in layer.parameters()]
        layer.tiling = None
    return (standard, reversible, tiled), (forward.names, backward.names, reversible_backward.names)


@pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("name", sorted(CHANNEL_COUPLINGS))
def test_channel_coupling_on_kernels_writes_whole_tensors_without_cat(name):
    """On the kernels a channel-mask coupling writes its whole output, the whole input gradient and (reversible)
    the whole rebuilt input in the fused passes: no torch.cat of the halves, no slice_backward of the transformed
    half; same results as eager, tiled or not."""
    layer = CHANNEL_COUPLINGS[name]().double()
    perturb_parameters(layer, 0.3)
    x = torch.randn(2, 5, 6, 5, dtype=torch.float64)
    grad_y, grad_logdet = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    eager, _ = _coupling_passes(layer, x, grad_y, grad_logdet, "eager")
    fused, (forward, backward, reversible) = _coupling_passes(layer, x, grad_y, grad_logdet, "interpret")
    assert "coupling_fwd" in forward and "cat" not in forward
    # left: the network input's gradient into the conditioning channels (one slice_backward, as it must), and
    # for the affine coupling the torch.cat joining the network's two output gradients (shift, raw)
    network_cats = 0 if "additive" in name else 1
    assert backward.count("slice_backward") == 1 and backward.count("cat") == network_cats
    assert "coupling_bwd" in reversible and reversible.count("cat") == network_cats
    torch.testing.assert_close(fused[1][0], x, atol=1e-12, rtol=1e-12)
    for fused_pass, eager_pass in zip(fused, eager):
        for f, e in zip(fused_pass, eager_pass):
            torch.testing.assert_close(f, e, atol=1e-10, rtol=1e-10)
    for tiled, whole in zip(fused[2], fused[1]):
        torch.testing.assert_close(tiled, whole, atol=1e-10, rtol=1e-10)


def test_exact_dtype_turns_autocast_off_only_where_it_is_on():
    x = torch.randn(2, 3)
    assert isinstance(exact_dtype(x), contextlib.nullcontext)  # nothing to turn off: no autocast entered
    with exact_dtype(x):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(exact_dtype(x), torch.autocast)
        with exact_dtype(x):
            assert not torch.is_autocast_enabled("cpu")
            assert (x @ x.t()).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
