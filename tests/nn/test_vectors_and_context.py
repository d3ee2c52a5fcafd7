"""Layers on vectors ``(B, D)`` and images with a conditioning context: brute-force Jacobian log-det, exact
inverse, the context reaching the conditioner, custom conditioners, the kernels on vectors, clear errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn
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
    InvertibleLinear,
    MaskedAutoregressiveSpline,
    Permutation,
    SplineCoupling,
    Squeeze,
)
from fastflow.nn.tiling import Tiling
from tests.helpers import HaloConv, brute_force_logdet, perturb_parameters, tanh_mlp


def _no_halo_conv(in_channels: int, out_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, out_channels, 1))


# name: (layer factory, input shape, context shape or None)
CASES = {
    "actnorm_vec": (lambda: ActNorm(5), (3, 5), None),
    "invlinear_lu": (lambda: InvertibleLinear(5), (3, 5), None),
    "invlinear_plain": (lambda: InvertibleLinear(5, lu=False), (3, 5), None),
    "invconv_on_vectors": (lambda: InvConv1x1(4), (3, 4), None),
    "permutation_reverse_vec": (lambda: Permutation(5), (3, 5), None),
    "permutation_random_vec": (lambda: Permutation(5, "random"), (3, 5), None),
    "permutation_image": (lambda: Permutation(3, [2, 0, 1]), (2, 3, 2, 2), None),
    "affine_sigmoid_vec": (lambda: AffineCoupling(5, 8, vectors=True), (3, 5), None),
    "affine_exp_parity1_vec": (lambda: AffineCoupling(5, 8, scale="exp", parity=1, vectors=True), (3, 5), None),
    "additive_vec": (lambda: AdditiveCoupling(4, 8, vectors=True), (3, 4), None),
    "affine_context_vec": (lambda: AffineCoupling(5, 8, scale="exp", context_features=3, vectors=True), (3, 5), (3, 3)),
    "affine_context_flattened_vec": (
        lambda: AffineCoupling(4, 8, context_features=6, vectors=True, parity=1),
        (3, 4),
        (3, 2, 3),
    ),
    "additive_context_vec": (lambda: AdditiveCoupling(5, 8, context_features=2, vectors=True), (3, 5), (3, 2)),
    "affine_subnet_factory_vec": (lambda: AffineCoupling(5, subnet=tanh_mlp, vectors=True), (3, 5), None),
    "affine_subnet_module_context_vec": (
        lambda: AffineCoupling(5, scale="exp", subnet=tanh_mlp(2 + 3, 2 * 3), context_features=3, vectors=True),
        (3, 5),
        (3, 3),
    ),
    "flow_step_vec": (lambda: FlowStep(5, 8, vectors=True), (3, 5), None),
    "flow_step_additive_plain_vec": (
        lambda: FlowStep(4, 8, lu=False, coupling="additive", vectors=True),
        (3, 4),
        None,
    ),
    "flow_step_context_vec": (lambda: FlowStep(5, 8, scale="exp", context_features=2, vectors=True), (3, 5), (3, 2)),
    "sequential_context_vec": (
        lambda: FlowSequential(
            FlowStep(4, 8, context_features=2, vectors=True),
            Permutation(4, "random"),
            AdditiveCoupling(4, subnet=tanh_mlp, context_features=2, vectors=True),
            ActNorm(4),
        ),
        (3, 4),
        (3, 2),
    ),
    "affine_context_image": (lambda: AffineCoupling(4, 8, context_features=3), (2, 4, 3, 2), (2, 3)),
    "affine_pixel_context_image": (
        lambda: AffineCoupling(3, 8, scale="exp", context_features=2),
        (2, 3, 2, 3),
        (2, 2, 2, 3),
    ),
    "checkerboard_context_image": (
        lambda: AffineCoupling(2, 8, scale="exp", mask="checkerboard", context_features=2),
        (2, 2, 3, 2),
        (2, 2),
    ),
    "additive_subnet_image": (lambda: AdditiveCoupling(4, subnet=HaloConv, context_features=1), (2, 4, 3, 3), (2, 1)),
    "flow_step_context_image": (lambda: FlowStep(4, 8, context_features=2), (2, 4, 2, 2), (2, 2)),
}


def _case(name: str, scale: float = 0.3, dtype: torch.dtype = torch.float64):
    make, x_shape, c_shape = CASES[name]
    layer = make().to(dtype)
    perturb_parameters(layer, scale)
    x = torch.randn(*x_shape, dtype=dtype)
    context = None if c_shape is None else torch.randn(*c_shape, dtype=dtype)
    return layer.eval(), x, context


def _per_sample_brute_force(layer: nn.Module, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    """Brute-force log-det of ``x -> layer(x, context)`` per sample, each at its own row of the context."""
    out = []
    for i in range(x.shape[0]):
        row = None if context is None else context[i : i + 1]
        out.append(brute_force_logdet(lambda v, row=row: layer(v, row)[0], x[i : i + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logdet_matches_brute_force_jacobian(name):
    layer, x, context = _case(name)
    y, logdet = layer(x, context)
    assert y.shape == x.shape and logdet.shape == (x.shape[0],) and logdet.dtype == torch.float64
    torch.testing.assert_close(logdet, _per_sample_brute_force(layer, x, context), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inverse_recovers_input_and_negates_logdet(name):
    layer, x, context = _case(name)
    y, logdet = layer(x, context)
    x_back, inverse_logdet = layer.inverse(y, context)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(inverse_logdet, -logdet, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(n for n, case in CASES.items() if case[2] is not None))
def test_the_context_reaches_the_conditioner(name):
    """Another context gives another output, and its gradient is not zero: the context is used."""
    layer, x, context = _case(name)
    context.requires_grad_(True)
    y, logdet = layer(x, context)
    y_other, _ = layer(x, context + 1.0)
    assert (y - y_other).abs().max() > 1e-3
    (grad,) = torch.autograd.grad(y.square().sum() + logdet.sum(), context)
    assert grad.abs().max() > 1e-6


def test_permutations_reorder_dim_one_with_zero_logdet():
    x = torch.arange(10.0).reshape(2, 5)
    y, logdet = Permutation(5)(x)
    torch.testing.assert_close(y, x.flip(1))
    assert logdet.tolist() == [0.0, 0.0]
    random = Permutation(5, "random")
    assert sorted(random.perm.tolist()) == list(range(5)) and "perm" in random.state_dict()
    assert Permutation(3, np.array([2, 0, 1])).perm.tolist() == [2, 0, 1]


def test_a_permutation_that_does_not_invert_is_refused_on_load():
    state = Permutation(3, [2, 0, 1]).state_dict()
    cases = (("perm", [0, 0, 1], "perm must be a permutation"), ("inverse_perm", [0, 1, 2], "inverse"))
    for key, value, match in cases:
        bad = dict(state, **{key: torch.tensor(value)})
        with pytest.raises(RuntimeError, match=match):
            Permutation(3).load_state_dict(bad)
    loaded = Permutation(3)
    loaded.load_state_dict(state)
    assert loaded.perm.tolist() == [2, 0, 1] and loaded.inverse_perm.tolist() == [1, 2, 0]


def test_invertible_linear_logdet_is_sum_of_log_s_without_a_pixel_factor():
    layer = InvertibleLinear(4).double()
    perturb_parameters(layer, 0.3)
    _, logdet = layer(torch.randn(3, 4, dtype=torch.float64))
    torch.testing.assert_close(logdet, layer.log_s.sum().expand(3))
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(layer.weight_and_logdet()[0])[1])


def test_actnorm_initialises_per_feature_on_vectors():
    layer = ActNorm(3).train()
    x = torch.randn(64, 3) * torch.tensor([0.5, 2.0, 9.0]) + torch.tensor([1.0, -3.0, 20.0])
    y, _ = layer(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert layer.bias.shape == (1, 3, 1, 1), "the image layer's parameters: one state_dict for both"


def test_default_conditioners_are_glow_conv_net_for_images_and_an_mlp_for_vectors():
    image, vector = AffineCoupling(4, 8), AffineCoupling(4, 8, vectors=True)
    assert type(image.net).__name__ == "ConvNetwork" and image.net.halo == 2
    assert type(vector.net).__name__ == "MLPNetwork" and not hasattr(vector.net, "halo")
    # a coupling starts as the identity (zero-initialised last layer) with either
    for layer, x in ((image, torch.randn(2, 4, 3, 3)), (vector, torch.randn(2, 4))):
        y, logdet = layer(x)
        torch.testing.assert_close(y.narrow(1, 0, 2), x.narrow(1, 0, 2))


def test_subnet_factory_gets_in_and_out_features_including_the_context():
    calls = []

    def subnet(in_features, out_features):
        calls.append((in_features, out_features))
        return tanh_mlp(in_features, out_features)

    AffineCoupling(7, subnet=subnet, context_features=4, vectors=True)
    AdditiveCoupling(6, subnet=subnet, mask="checkerboard", context_features=1)
    assert calls == [(3 + 4, 2 * 4), (6 + 1, 6)]


@pytest.mark.parametrize("extra", [2, -1])
@pytest.mark.parametrize("kind", ["affine", "additive", "spline"])
def test_a_subnet_of_the_wrong_output_width_is_a_clear_error(kind, extra):
    """A conditioner wider than the coupling's out_features would transform conditioning channels too (no inverse,
    a wrong log-det); a narrower one would leave channels untransformed: both are refused, naming the subnet."""
    from fastflow.nn import SplineCoupling

    def subnet(in_features, out_features):
        return torch.nn.Linear(in_features, out_features + extra)

    def image_subnet(in_features, out_features):
        return torch.nn.Conv2d(in_features, out_features + extra, 3, padding=1)

    layers = {
        "affine": lambda: AffineCoupling(4, scale="exp", parity=1, vectors=True, subnet=subnet),
        "additive": lambda: AdditiveCoupling(4, subnet=image_subnet),
        "spline": lambda: SplineCoupling(4, vectors=True, subnet=subnet),
    }
    layer = layers[kind]()
    x = torch.randn(2, 4) if kind != "additive" else torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"subnet returned .* it must return shape"):
        layer(x)


@pytest.mark.parametrize("side", [1, 2])
def test_tiling_runs_on_a_conditioner_that_declares_its_halo_exact_with_context(side):
    """A custom conditioner with ``halo`` tiles exactly: outputs, and the reversible backward's input, parameter
    and context gradients, equal the untiled ones."""
    torch.manual_seed(0)
    layer = AffineCoupling(4, scale="exp", subnet=HaloConv, context_features=2).double()
    perturb_parameters(layer, 0.3)
    x, context = torch.randn(2, 4, 5, 4, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    grad_y, grad_logdet = torch.randn_like(x), torch.randn(2, dtype=torch.float64)
    results = []
    for tiling in (None, Tiling(tile_size=side)):
        layer.tiling = tiling
        with torch.no_grad():
            y, logdet = layer(x, context)
        layer.zero_grad(set_to_none=True)
        leaf = context.clone().requires_grad_(True)
        x_back, grad_x = layer.backward_from_output(y, grad_y, grad_logdet, leaf)
        results.append([y, logdet, x_back, grad_x, leaf.grad, *(p.grad for p in layer.parameters())])
    for tiled, whole in zip(results[1], results[0]):
        torch.testing.assert_close(tiled, whole, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(results[0][2], x, atol=1e-12, rtol=1e-12)


def test_tiling_is_refused_for_a_conditioner_without_a_halo():
    for layer in (AffineCoupling(4, subnet=_no_halo_conv), AffineCoupling(4, 8, vectors=True)):
        with pytest.raises(ValueError, match="receptive-field halo"):
            layer.tiling = Tiling(tile_size=4)
        assert layer.tiling is None
    with pytest.raises(ValueError, match="give tile_size instead"):
        AffineCoupling(4, subnet=lambda i, o: HaloConvNoWidth(i, o)).tiling = Tiling(memory_budget_mb=8)


class HaloConvNoWidth(nn.Conv2d):
    halo = 1

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)


@pytest.mark.parametrize(
    "make, x, context, error, match",
    [
        (lambda: ActNorm(3), torch.randn(2, 4), None, ValueError, "4 features .* built for 3 .feature mismatch"),
        (lambda: InvertibleLinear(3), torch.randn(2, 2), None, ValueError, "feature mismatch"),
        (lambda: Permutation(3), torch.randn(2, 3, 2), None, ValueError, r"\(B, D\) or \(B, C, H, W\)"),
        (lambda: AffineCoupling(4, 8, vectors=True), torch.randn(2, 3), None, ValueError, "feature mismatch"),
        (lambda: AffineCoupling(4, 8, vectors=True), torch.randn(2, 4, 2, 2), None, ValueError, "vectors=True"),
        (lambda: AffineCoupling(4, 8), torch.randn(2, 4), None, ValueError, r"images \(B, C, H, W\)"),
        (
            lambda: AffineCoupling(4, 8, context_features=2, vectors=True),
            torch.randn(2, 4),
            None,
            ValueError,
            "context is required",
        ),
        (
            lambda: AffineCoupling(4, 8, context_features=2, vectors=True),
            torch.randn(2, 4),
            torch.randn(2, 3),
            ValueError,
            "context has 3 features .* built for 2",
        ),
        (
            lambda: AffineCoupling(4, 8, context_features=2, vectors=True),
            torch.randn(2, 4),
            torch.randn(3, 2),
            ValueError,
            "batch B = 2",
        ),
        (
            lambda: AffineCoupling(4, 8, context_features=2, vectors=True),
            torch.randn(2, 4),
            torch.ones(2, 2, dtype=torch.int64),
            TypeError,
            "context must be a floating-point",
        ),
        (
            lambda: AffineCoupling(4, 8, context_features=2),
            torch.randn(2, 4, 3, 3),
            torch.randn(2, 2, 2, 2),
            ValueError,
            "spatial size",
        ),
        (
            lambda: FlowStep(4, 8, context_features=1, vectors=True),
            torch.randn(2, 4),
            None,
            ValueError,
            "context is required",
        ),
        (  # failed in torch.cat without naming the context
            lambda: AffineCoupling(4, 8, context_features=2, vectors=True),
            torch.randn(2, 4),
            torch.randn(2, 2, device="meta"),
            ValueError,
            "context is on meta but the input is on cpu",
        ),
    ],
)
def test_bad_inputs_and_contexts_raise_clear_errors(make, x, context, error, match):
    with pytest.raises(error, match=match):
        make()(x, context)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: AffineCoupling(4, scale="exp", mask="checkerboard", vectors=True), ValueError, "needs images"),
        (lambda: AffineCoupling(4, subnet=3), TypeError, "subnet must be an nn.Module or a callable"),
        (lambda: AffineCoupling(4, subnet=lambda i, o: "net"), TypeError, "must return an nn.Module"),
        (lambda: AffineCoupling(4, context_features=-1), ValueError, "context_features must be an int >= 0"),
        (lambda: Permutation(3, [0, 0, 1]), ValueError, "permutation of range"),
        (lambda: Permutation(3, "shuffle"), ValueError, "order must be"),
        (lambda: Permutation(3, [0.5, 2.0, 1.0]), TypeError, "integer indices"),  # was truncated to [0, 2, 1]
        (lambda: Permutation(3, [True, False, True]), TypeError, "integer indices"),
        (lambda: Permutation(3, {2, 0, 1}), TypeError, "got a set"),  # no order of its own
        (lambda: Permutation(3, 5), ValueError, "permutation of range"),
        (lambda: InvertibleLinear(0), ValueError, "features must be >= 1"),
    ],
)
def test_bad_constructor_arguments_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: AffineCoupling(4, 8, vectors=True), torch.randn(2, 4, dtype=torch.float16)),
        (lambda: AffineCoupling(4, 8), torch.randn(2, 4, 4, 4, dtype=torch.float64)),
        (lambda: SplineCoupling(4, 8, vectors=True), torch.randn(2, 4, dtype=torch.bfloat16)),
        (lambda: MaskedAutoregressiveSpline(3, hidden=8), torch.randn(2, 3, dtype=torch.float64)),
    ],
)
def test_a_batch_of_another_dtype_than_the_network_is_named(make, x):
    layer = make()
    for run in (layer, layer.inverse):
        with pytest.raises(TypeError, match=rf"(x|y) is {x.dtype} but the layer's network is torch.float32"):
            run(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the network's inputs itself
        layer(x.float())


def test_unconditional_layers_ignore_a_context():
    layer, x, _ = _case("flow_step_vec")
    torch.testing.assert_close(layer(x, torch.randn(3, 2, dtype=torch.float64))[0], layer(x)[0])


def test_squeeze_and_image_steps_chain_with_a_context():
    chain = FlowSequential(Squeeze(), FlowStep(8, 8, context_features=2), FlowStep(8, 8, context_features=2)).double()
    perturb_parameters(chain, 0.2)
    x, context = torch.randn(2, 2, 4, 2, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    y, logdet = chain(x, context)
    torch.testing.assert_close(chain.inverse(y, context)[0], x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(logdet, _per_sample_brute_force(chain, x, context), atol=1e-9, rtol=1e-9)
    assert chain.uses_context and not FlowSequential(Squeeze(), FlowStep(8, 8)).uses_context


KERNEL_VECTOR_CASES = {
    "affine_sigmoid_6": (lambda: AffineCoupling(6, 8, vectors=True), (3, 6), None),
    "affine_exp_parity1_9_context": (
        lambda: AffineCoupling(9, 8, scale="exp", parity=1, context_features=2, vectors=True),
        (2, 9),
        (2, 2),
    ),
    "additive_5_context": (lambda: AdditiveCoupling(5, 8, context_features=3, vectors=True), (4, 5), (4, 3)),
    "flow_step_7_context": (lambda: FlowStep(7, 8, scale="exp", context_features=2, vectors=True), (3, 7), (3, 2)),
}


class _OpNames(TorchDispatchMode):
    """Names of the ATen / fastflow ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _passes(layer, x, context, grad_y, grad_logdet, backend):
    """Forward + backward (input, context and parameter gradients), inverse, and the reversible backward."""
    with fastflow.backend(backend):
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_(True)
        leaf = None if context is None else context.clone().requires_grad_(True)
        y, logdet = layer(x, leaf)
        outputs = [(y, grad_y), *([(logdet, grad_logdet)] if logdet.requires_grad else [])]
        torch.autograd.backward(*zip(*outputs))
        standard = [y.detach(), logdet.detach(), x.grad, *([] if leaf is None else [leaf.grad])]
        standard += [p.grad.clone() for p in layer.parameters()]
        x_back, inverse_logdet = layer.inverse(y.detach(), context)
        layer.zero_grad(set_to_none=True)
        leaf = None if context is None else context.clone().requires_grad_(True)
        reversible = [*layer.backward_from_output(y.detach(), grad_y, grad_logdet, leaf)]
        reversible += [*([] if leaf is None else [leaf.grad]), *(p.grad.clone() for p in layer.parameters())]
    return standard, [x_back, inverse_logdet], reversible


@pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (CPU interpreter)")
@pytest.mark.parametrize("name", sorted(KERNEL_VECTOR_CASES))
def test_vector_layers_on_the_kernels_match_eager(name):
    """The fused coupling (and the fused ActNorm + linear pair) run on vectors under the Triton interpreter and
    give eager's outputs, inverse, gradients and reversible backward in float64; the kernels really ran."""
    make, x_shape, c_shape = KERNEL_VECTOR_CASES[name]
    layer = make().double()
    perturb_parameters(layer, 0.3)
    x = torch.randn(*x_shape, dtype=torch.float64)
    context = None if c_shape is None else torch.randn(*c_shape, dtype=torch.float64)
    grad_y, grad_logdet = torch.randn_like(x), torch.randn(x.shape[0], dtype=torch.float64)
    eager = _passes(layer, x, context, grad_y, grad_logdet, "eager")
    with _OpNames() as ops:
        fused = _passes(layer, x, context, grad_y, grad_logdet, "interpret")
    assert {"coupling_fwd", "coupling_inv", "coupling_bwd"} <= set(ops.names), sorted(set(ops.names))
    torch.testing.assert_close(fused[1][0], x, atol=1e-12, rtol=1e-12)
    for fused_part, eager_part in zip(fused, eager):
        for f, e in zip(fused_part, eager_part):
            torch.testing.assert_close(f, e, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("reversible", [False, True])
def test_a_subnet_that_changes_its_input_in_place_is_refused(reversible):
    """Without a context the conditioner reads a view of the layer's input: a first nn.ReLU(inplace=True)
    overwrote the caller's x, and the kept half of y was relu(x_a), not x_a (no inverse)."""

    def subnet(in_features, out_features):
        return nn.Sequential(nn.ReLU(inplace=True), nn.Linear(in_features, out_features))

    layer = FlowSequential(AffineCoupling(4, scale="exp", vectors=True, subnet=subnet), reversible=reversible)
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match="subnet changed its input in place"):
        layer(x)
    with torch.no_grad(), pytest.raises(ValueError, match="subnet changed its input in place"):
        layer.inverse(torch.randn(6, 4))
    with torch.inference_mode():  # no version counters there: not checked, and the usual layers still run
        FlowSequential(AffineCoupling(4, scale="exp", vectors=True))(torch.randn(6, 4))
    # a checkerboard coupling's network reads x * mask, a new tensor: changing it in place is harmless, not refused
    checkerboard = AffineCoupling(
        2,
        mask="checkerboard",
        scale="exp",
        subnet=lambda i, o: nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(i, o, 1)),
    )
    perturb_parameters(checkerboard)
    x = torch.randn(2, 2, 4, 4)
    y, logdet = FlowSequential(checkerboard, reversible=reversible)(x.clone())
    torch.testing.assert_close(checkerboard.inverse(y.detach())[0], x)
    (y.square().sum() + logdet.sum()).backward()  # reversible: the network ran on a leaf, which it cannot change


def test_a_subnet_returning_integers_is_refused():
    layer = AffineCoupling(4, scale="exp", vectors=True, subnet=lambda i, o: _IntegerNet(o))
    with pytest.raises(TypeError, match="subnet returned a torch.int64 tensor"):
        layer(torch.randn(2, 4))


class _IntegerNet(nn.Module):
    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.ones(a.shape[0], self.out_features, dtype=torch.long)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python >= 3.11")
def test_a_ready_subnet_of_the_wrong_width_fails_with_a_note_naming_the_expected_input():
    """A module built for another input width failed with a bare matmul error that named neither the subnet nor
    the width it must take."""
    coupling = AffineCoupling(5, subnet=nn.Linear(2, 6), context_features=3, vectors=True)
    with pytest.raises(RuntimeError) as caught:
        coupling(torch.randn(4, 5), torch.randn(4, 3))
    assert any("in_features = 2 kept channels + 3 context features" in note for note in caught.value.__notes__)
