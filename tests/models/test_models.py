"""Model presets: brute-force log-det of the whole map, exact encode/decode, likelihood, sampling, errors."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.models import NICE, Glow, RealNVP, TabularFlow, dequantize
from fastflow.models.priors import GaussianPrior
from fastflow.nn.distributions import gaussian_log_prob, standard_gaussian_log_prob
from fastflow.nn.reversible import deferred_guards
from tests.helpers import brute_force_logdet, perturb_parameters

PRESETS = {
    "glow_affine_lu": lambda: Glow(2, 4, levels=2, steps=2, hidden=8),
    "glow_additive_plain": lambda: Glow(2, 4, levels=2, steps=2, hidden=8, lu=False, coupling="additive"),
    "glow_exp_fixed_top": lambda: Glow(2, 4, levels=1, steps=3, hidden=8, scale="exp", learn_top=False),
    "glow_conditional": lambda: Glow(2, 4, levels=2, steps=1, hidden=8, num_classes=3),
    "glow_spline": lambda: Glow(2, 4, levels=2, steps=2, hidden=8, coupling="spline"),
    "realnvp": lambda: RealNVP(2, 4, scales=2, hidden=8),
    "realnvp_spline": lambda: RealNVP(2, 4, scales=2, hidden=8, coupling="spline"),
    "nice": lambda: NICE(2, 4, couplings=4, hidden=16, depth=2),
}


def _model(name: str, scale: float = 0.1):
    torch.manual_seed(1)
    model = PRESETS[name]().double()
    model.train()
    model.log_prob(torch.rand(16, *model.image_shape, dtype=torch.float64) - 0.5, _labels(model, 16))
    perturb_parameters(model, scale)
    return model.eval()


def _labels(model, n: int):
    return torch.arange(n) % model.config["num_classes"] if model.config.get("num_classes") else None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_logdet_matches_brute_force_jacobian(name):
    # spline presets at a smaller perturbation: at 0.2, RealNVP's ten spline couplings reach bins steep enough that
    # the Jacobian's condition number (1.8e20 measured) leaves the float64 reference no correct digit
    model = _model(name, scale=0.1 if "spline" in name else 0.2)
    x = torch.rand(2, *model.image_shape, dtype=torch.float64) - 0.5

    def to_flat_latents(v: torch.Tensor) -> torch.Tensor:
        latents, _, _ = model.encode_with_logdet(v, _labels(model, v.shape[0]))
        return torch.cat([z.reshape(v.shape[0], -1) for z in latents], dim=1)

    _, logdet, _ = model.encode_with_logdet(x, _labels(model, 2))
    torch.testing.assert_close(logdet, brute_force_logdet(to_flat_latents, x), atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_decode_inverts_encode(name):
    model = _model(name).float()
    x = torch.rand(3, *model.image_shape) - 0.5
    y = _labels(model, 3)
    latents = model.encode(x, y)
    assert len(latents) == len(model.blocks)
    assert sum(z[0].numel() for z in latents) == model.num_dims
    torch.testing.assert_close(model.decode(latents, y), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_bits_per_dim_convention(name):
    model = _model(name).float()
    x = torch.rand(4, *model.image_shape) - 0.5
    y = _labels(model, 4)
    log_p = model.log_prob(x, y)
    d = model.num_dims
    expected = (-log_p + d * math.log(model.n_bins)) / (d * math.log(2))
    torch.testing.assert_close(model.bits_per_dim(x, y), expected)
    assert log_p.shape == (4,) and log_p.dtype == torch.float32 and torch.isfinite(log_p).all()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_samples_have_the_image_shape_and_are_not_constant(name):
    model = _model(name).float()
    samples = model.sample(5, _labels(model, 5), temperature=0.7)
    assert samples.shape == (5, *model.image_shape)
    assert torch.isfinite(samples).all()
    assert samples.std() > 1e-3
    assert (samples[0] - samples[1]).abs().max() > 1e-4


def test_temperature_zero_gives_the_prior_mode():
    model = _model("glow_affine_lu").float()
    torch.testing.assert_close(model.sample(2, temperature=0.0)[0], model.sample(2, temperature=0.0)[1])


@pytest.mark.parametrize("name", ["glow_affine_lu", "glow_conditional", "nice"])
def test_sampling_from_a_generator_repeats_and_leaves_the_global_rng_alone(name):
    """``generator=`` feeds every draw (the top prior's, Gaussian or logistic, and the split priors' for ``None``
    latents): one seed gives one sample, another seed another, and the global RNG is neither read nor advanced."""
    model = _model(name)
    labels = _labels(model, 3)

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = model.sample(3, labels, generator=seeded(7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # another global state: the same draws
    torch.testing.assert_close(model.rsample(3, labels, 0.7, generator=seeded(7)), first, rtol=0, atol=0)
    assert not torch.allclose(model.sample(3, labels, generator=seeded(8)), first)
    if model.splits:  # the split latents come from the generator too: same top latent, different seeds
        top = model.encode(first, labels)[-1]
        latents = [None] * len(model.splits) + [top]
        a, b = (model.decode(latents, labels, 0.7, generator=seeded(s)) for s in (1, 1))
        assert torch.equal(a, b)
        assert not torch.allclose(a, model.decode(latents, labels, 0.7, generator=seeded(2)))
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        model.sample(3, labels, generator=7)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        model.decode(model.encode(first, labels), labels, generator="seed")  # nothing to draw: checked all the same


def test_a_prior_written_before_generator_samples_without_one():
    """A TopPrior subclass with the earlier ``sample(n, temperature, y, device, dtype)`` keeps working where no
    generator is asked for (rsample passed ``generator`` to every prior)."""
    from fastflow.models.base import FlowModel
    from fastflow.models.priors import TopPrior
    from fastflow.nn import ActNorm, FlowSequential

    class OldPrior(TopPrior):
        def log_prob(self, z, y=None):
            return standard_gaussian_log_prob(z)

        def sample(self, n, temperature, y=None, device=None, dtype=None):
            return temperature * torch.randn(n, *self.shape, device=device, dtype=dtype)

    model = FlowModel([FlowSequential(ActNorm(3))], [], OldPrior((3,)), (3,), None, {})
    assert model.sample(4).shape == (4, 3)
    with pytest.raises(TypeError, match="unexpected keyword argument 'generator'"):
        model.sample(4, generator=torch.Generator())  # asked for: the prior must take it


def test_dequantize_maps_levels_into_their_bins():
    levels = torch.randint(0, 17, (100, 1, 2, 2))
    x = dequantize(levels, 17)
    assert (x >= -0.5).all() and (x < 0.5).all()
    torch.testing.assert_close(torch.floor((x + 0.5) * 17).long(), levels)


def test_nonfinite_likelihood_names_the_layer():
    model = _model("glow_affine_lu").float()
    with torch.no_grad():
        model.blocks[1].layers[1].actnorm.logs.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.layers\.1 \(FlowStep\)"):
        model.log_prob(torch.rand(2, *model.image_shape) - 0.5)


def test_deferred_finite_check_records_and_check_guards_names_the_layer():
    model = _model("glow_affine_lu").float()
    with torch.no_grad():
        model.blocks[1].layers[1].actnorm.logs.fill_(float("nan"))
    x = torch.rand(2, *model.image_shape) - 0.5
    for batch, match in (((x,), r"blocks\.1\.layers\.1 \(FlowStep\)"), ((), "pass that batch to check_guards")):
        with deferred_guards():
            log_p = model.log_prob(x)  # recorded on the device, not raised
        assert not torch.isfinite(log_p).all() and bool(model.guards_tripped())
        with pytest.raises(FloatingPointError, match=match):
            model.check_guards(*batch)
        assert not bool(model.guards_tripped())
        model.check_guards()  # the read cleared the record


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.log_prob(torch.rand(2, 3, 4, 4)), ValueError, "channel mismatch"),
        (lambda m: m.log_prob(torch.rand(2, 2, 8, 8)), ValueError, r"x must have shape \(B, 2, 4, 4\)"),
        (lambda m: m.log_prob(torch.rand(2, 2, 4)), ValueError, "rank 3"),
        (lambda m: m.decode([torch.zeros(1)]), ValueError, "latents must be a list of 2"),
        (
            lambda m: m.decode(torch.zeros(3, 4)),
            TypeError,
            "latents must be a list of 2 tensors .encode's output., got Tensor",
        ),
        (lambda m: m.sample(0), ValueError, "n must be >= 1"),
        (lambda m: m.sample(2.5), TypeError, "n must be an int, got float 2.5"),
        (lambda m: m.sample(2, temperature=float("nan")), ValueError, "temperature must be finite"),
        (lambda m: m.sample(2, temperature=float("inf")), ValueError, "temperature must be finite"),
        (lambda m: m.sample(2, temperature="hot"), TypeError, "temperature must be a real number"),
        (lambda m: m.decode([None, torch.zeros(2, 16, 1, 1)], temperature=-1.0), ValueError, "temperature must be"),
        (lambda m: m.log_prob(torch.rand(2, 2, 4, 4, dtype=torch.float64) - 0.5), TypeError, "x is torch.float64 but"),
        (lambda m: m.log_prob(torch.rand(2, 2, 4, 4, dtype=torch.bfloat16) - 0.5), TypeError, "model is torch.float32"),
        (lambda m: m.log_prob(torch.rand(0, 2, 4, 4) - 0.5), ValueError, "empty batch"),
        (lambda m: m.decode([torch.zeros(2, 4, 2, 2), torch.zeros(3, 16, 1, 1)]), ValueError, "share one batch size"),
        (
            lambda m: m.decode([None, torch.zeros(2, 4, 1, 1)]),
            ValueError,
            r"latents\[-1\] \(the top latent\) must have shape \(B, 16, 1, 1\), got \(2, 4, 1, 1\)",
        ),
        (lambda m: m.decode([None, torch.zeros(2, 16, 1, 1).double()]), TypeError, r"latents\[-1\] is torch.float64"),
        (
            lambda m: m.decode([torch.zeros(2, 4, 1, 1), torch.zeros(2, 16, 1, 1)]),
            ValueError,
            r"z_out must have z_keep's batch and spatial size, shape \(2, 4, 2, 2\), got \(2, 4, 1, 1\)",
        ),
        (
            lambda m: m.decode([torch.zeros(2, 4, 2, 2).double(), torch.zeros(2, 16, 1, 1)]),
            TypeError,
            "z_out is torch.float64 but z_keep is torch.float32",
        ),
        (
            lambda m: m.log_prob(torch.rand(2, 2, 4, 4), torch.tensor([0, 1])),
            ValueError,
            "no class conditioning",
        ),
    ],
)
def test_bad_model_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call(_model("glow_affine_lu").float())


def test_nonfinite_input_is_blamed_on_the_input_not_a_layer():
    model = _model("glow_affine_lu").float()
    x = torch.rand(2, *model.image_shape) - 0.5
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x holds 1 non-finite values"):
        model.log_prob(x)


def test_nonfinite_first_batch_is_blamed_on_the_input_not_actnorm():
    """The first batch of a fresh model in training mode initialises the ActNorms: the error named the first
    ActNorm ("cannot initialise from a batch ... not finite"), where every later batch names ``x``."""
    model = Glow(2, 4, levels=2, steps=1, hidden=8).train()
    x = torch.rand(2, *model.image_shape) - 0.5
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="x holds 1 non-finite values") as caught:
        model.log_prob(x)
    assert "cannot initialise" in str(caught.value.__cause__)


def test_nonfinite_context_is_blamed_on_the_context_not_a_layer():
    """It was ``FloatingPointError: non-finite output at blocks.0...``; non-finite ``x`` was a ``ValueError``."""
    model = TabularFlow(4, context=2, transforms=1, hidden=8)
    x, context = torch.randn(3, 4), torch.randn(3, 2)
    context[1] = float("nan")
    with pytest.raises(ValueError, match="context holds 2 non-finite values"):
        model.log_prob(x, context)
    with deferred_guards():
        model.log_prob(x, context)  # recorded, then named by check_guards
    with pytest.raises(ValueError, match="context holds 2 non-finite values"):
        model.check_guards(x, context)


def test_dequantize_stays_below_one_half_where_float32_rounds_up(monkeypatch):
    """``255 + (1 - 2**-24)`` rounds to 256 in float32: the top level came out exactly 0.5."""
    monkeypatch.setattr(torch, "rand", lambda shape, device=None: torch.full(shape, 1 - 2**-24, device=device))
    x = dequantize(torch.tensor([0, 254, 255]), 256)
    assert x.dtype == torch.float32 and float(x.max()) < 0.5 and float(x.min()) > -0.5
    assert torch.floor((x[2].double() + 0.5) * 256) == 255  # in its bin (float64: x + 0.5 rounds to 1 in float32)


def test_nonfinite_split_prior_is_called_a_log_density():
    model = _model("glow_affine_lu").float()
    with torch.no_grad():
        model.splits[0].prior.conv.bias.fill_(float("inf"))  # the split prior's mean and log-std: infinite
    with pytest.raises(FloatingPointError, match=r"non-finite prior log-density at splits\.0"):
        model.log_prob(torch.rand(2, *model.image_shape) - 0.5)


def test_inputs_outside_the_dequantized_range_warn_once_naming_dequantize():
    model = _model("glow_affine_lu").float()
    model._range_checked = False
    with pytest.warns(UserWarning, match="outside \\[-0.5, 0.5\\].*dequantize"):
        model.log_prob(torch.rand(2, *model.image_shape))  # [0, 1): not dequantized
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.log_prob(torch.rand(2, *model.image_shape))  # once only: later batches are not checked


def test_dequantize_rejects_levels_outside_the_bins():
    with pytest.raises(ValueError, match=r"levels must lie in \[0, n_bins\) = \[0, 17\), got values in \[0, 17\]"):
        dequantize(torch.tensor([0, 17]), 17)
    with pytest.raises(ValueError, match="got values in \\[-1, 3\\]"):
        dequantize(torch.tensor([-1, 3]), 17)
    with pytest.raises(TypeError, match="integer tensor"):
        dequantize(torch.rand(3), 17)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RealNVP(3, 4, scales=2, hidden=8),
        lambda: NICE(1, 4, couplings=2, hidden=8, depth=2),
        lambda: Glow(3, 8, levels=2, steps=1, hidden=8, learn_top=False),
        lambda: Glow(3, 8, levels=2, steps=1, hidden=8),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_sample_and_decode_in_the_model_dtype_on_the_cpu(make, dtype):
    """Priors sample in the model's dtype; the 1x1 convolutions solve in float64 (CPU has no half solves)."""
    model = make().to(dtype).eval()
    x = model.sample(2)
    assert x.dtype == dtype and torch.isfinite(x).all()


def test_conditional_model_requires_valid_labels():
    model = _model("glow_conditional").float()
    x = torch.rand(2, *model.image_shape) - 0.5
    with pytest.raises(ValueError, match="context .class labels. is required"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"context \(class labels\) must be in \[0, 3\), got values in \[0, 5\]"):
        model.log_prob(x, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="class labels. must be int32 or int64 labels, got torch.float32"):
        model.log_prob(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"must be integer labels of shape \(2,\), got \(2, 1\)"):
        model.log_prob(x, torch.tensor([[0], [1]]))


def test_decode_checks_class_labels_as_log_prob_does():
    """decode took labels [0, 7], float labels and none for a 3-class model (the labels only shift the top prior,
    which decoding does not use, so nothing failed)."""
    model = _model("glow_conditional").float()
    latents = model.encode(torch.rand(2, *model.image_shape) - 0.5, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=r"must be in \[0, 3\), got values in \[0, 7\]"):
        model.decode(latents, torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="must be int32 or int64 labels"):
        model.decode(latents, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="context .class labels. is required"):
        model.decode(latents)
    assert model.decode(latents, torch.tensor([0, 2])).shape == (2, *model.image_shape)


def test_decode_names_the_latent_that_does_not_fit():
    """A split latent of the wrong rank was reported as a batch-size mismatch, others as ``z_out`` / ``z_keep``."""
    model = _model("glow_affine_lu").float()
    latents = model.encode(torch.rand(2, *model.image_shape) - 0.5)
    with pytest.raises(ValueError, match=r"latents\[0\] must be a split latent of rank 4, got shape \(4, 2, 2\)"):
        model.decode([latents[0][0], latents[1]])
    with pytest.raises(TypeError, match=r"latents\[0\] must be None or a tensor .a split latent., got list"):
        model.decode([[1.0], latents[1]])
    with pytest.raises(ValueError, match=r"decoding latents\[0\]: z_out has 3 channels but the layer was built for 4"):
        model.decode([latents[0][:, :3], latents[1]])


def test_out_of_range_labels_under_deferred_guards_are_recorded_not_trained_on():
    """Inside a training step (guards deferred, no host read) an out-of-range label makes its sample's log-density
    NaN, which the deferred finite check records; ``check_guards`` with the batch names the labels. Before, it
    read no class (an all-zero one-hot) and trained on a finite, wrong loss."""
    model = _model("glow_conditional").float()
    x = torch.rand(3, *model.image_shape) - 0.5
    labels = torch.tensor([0, 5, 1])
    with deferred_guards():
        log_p = model.log_prob(x, labels)
    assert torch.isfinite(log_p[[0, 2]]).all() and torch.isnan(log_p[1])
    assert bool(model.guards_tripped())
    with pytest.raises(ValueError, match=r"must be in \[0, 3\), got values in \[0, 5\]"):
        model.check_guards(x, labels)
    with deferred_guards():
        assert torch.isfinite(model.log_prob(x, torch.tensor([0, 2, 1]))).all()
    assert not bool(model.guards_tripped())


def test_a_model_built_on_the_meta_device_starts_with_clear_guards():
    """``to_empty`` leaves every tensor uninitialised, the guards' records too (read as failures nobody saw):
    a record coming from the meta device starts at zero."""
    source = TabularFlow(4, transforms=2, hidden=8, reversible=True)
    for _ in range(3):
        junk = [torch.full((k,), float("nan")) for k in range(1, 64)]  # dirty the allocator's free memory
        del junk
        with torch.device("meta"):
            model = TabularFlow(4, transforms=2, hidden=8, reversible=True)
        model = model.to_empty(device="cpu")
        model.load_state_dict(source.state_dict())
        assert not bool(model.guards_tripped())
        model.check_guards()


def test_check_guards_keeps_a_drift_error_behind_a_finite_one():
    """Both guards tripped: the finite check's error is raised with the drift's (read and cleared with it) as its
    cause, not dropped."""
    model = TabularFlow(4, transforms=2, hidden=8, reversible=True)
    x = torch.randn(8, 4)
    with deferred_guards():
        model.log_prob(x).sum().backward()
    model._nonfinite_seen.fill_(True)
    model.blocks[0].drift_record.excess.fill_(5.0)
    with pytest.raises(FloatingPointError) as raised:
        model.check_guards()
    assert "max_drift" in str(raised.value.__cause__)
    model.check_guards()  # both records were cleared


def test_temperature_takes_numpy_scalars():
    np = pytest.importorskip("numpy")
    model = _model("glow_affine_lu").float().eval()
    torch.manual_seed(0)
    want = model.sample(2, temperature=0.5)
    torch.manual_seed(0)
    torch.testing.assert_close(model.sample(2, temperature=np.float32(0.5)), want)


@pytest.mark.parametrize("make", [lambda: Glow(1, 8, levels=10**9), lambda: RealNVP(1, 8, scales=10**9)])
def test_a_huge_level_count_is_refused_without_raising_2_to_it(make):
    """The same error either way: only the memory (and time) of forming 2**(10**9) tell the bound check ran first."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="must be divisible by 2"):
            make()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"{peak} bytes traced: 2 was raised to the exponent"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Glow(1, 6, levels=2), "divisible by 2\\*\\*levels"),
        # refused before 2 is raised to it (10**9 levels: seconds and gigabytes)
        (lambda: Glow(1, 8, levels=10**9), "divisible by 2\\*\\*levels = 2\\*\\*1000000000"),
        (lambda: RealNVP(1, 8, scales=10**9), "divisible by 2\\*\\*\\(scales-1\\) = 2\\*\\*999999999"),
        (lambda: Glow(1, 8, levels=0), "levels must be >= 1"),
        (lambda: RealNVP(1, 6, scales=3), "divisible by 2\\*\\*\\(scales-1\\)"),
        (lambda: RealNVP(1, 4, coupling="additive"), "coupling must be 'affine' or 'spline'"),
        (lambda: NICE(1, 3), r"in_channels \* height \* width must be even, got 1 \* 3 \* 3 = 9"),
        (lambda: Glow(1, 8, levels=1, n_bins=1), "n_bins must be >= 2"),
        (lambda: Glow(1, 8, levels=1, n_bins=2.5), "n_bins must be an int, got float 2.5"),
        (lambda: Glow(1, 8, levels=1, reversible="no"), "reversible must be a bool, got str 'no'"),
        (lambda: Glow(1, 0, levels=1), "image_size must be >= 1, got 0"),
    ],
)
def test_bad_model_config_raises(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize("image_size", [8.0, (8, 8.0), True, "8"])
def test_non_integer_image_size_raises_type_error(image_size):
    with pytest.raises(TypeError, match="image_size must be an int or a pair of ints"):
        Glow(1, image_size, levels=1)


SPLINE_MODELS = {
    "glow": lambda reversible: Glow(2, 4, levels=2, steps=2, hidden=8, coupling="spline", reversible=reversible),
    "realnvp": lambda reversible: RealNVP(2, 4, scales=2, hidden=8, coupling="spline", reversible=reversible),
}


@pytest.mark.parametrize("backend", ["eager", "interpret"])
@pytest.mark.parametrize("preset", sorted(SPLINE_MODELS))
def test_spline_coupling_models_train_reversibly_with_standard_gradients(backend, preset):
    """``Glow`` / ``RealNVP`` with ``coupling="spline"`` (RealNVP's checkerboard couplings included): reversible
    backprop (the fused spline's rebuild on the interpreter) gives standard backprop's loss and gradients in
    float64."""
    import fastflow
    from fastflow.backend import interpreter_enabled

    if backend == "interpret" and not interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1")
    results = []
    for reversible in (False, True):
        torch.manual_seed(3)
        model = SPLINE_MODELS[preset](reversible).double()
        x = torch.rand(4, 2, 4, 4, dtype=torch.float64) - 0.5
        with fastflow.backend(backend):
            model.log_prob(x)  # initialises ActNorm
            perturb_parameters(model, 0.1)
            loss = model.bits_per_dim(x).mean()
            loss.backward()
        results.append([loss.detach(), *(p.grad for p in model.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, {}), (torch.float32, {"rtol": 1e-6, "atol": 1e-4})])
def test_standard_normal_prior_equals_the_gaussian_at_zero_mean_and_scale(dtype, tolerance):
    for shape in ((4, 3), (2, 3, 8, 8)):
        z = torch.randn(shape, dtype=dtype)
        zeros = torch.zeros_like(z)
        want = gaussian_log_prob(z, zeros, zeros)
        torch.testing.assert_close(standard_gaussian_log_prob(z), want, **tolerance)
        prior = GaussianPrior(tuple(shape[1:]), learned=False)
        torch.testing.assert_close(prior.log_prob(z), want, **tolerance)
    with pytest.raises(ValueError, match="labels"):
        GaussianPrior((3,), learned=False).log_prob(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 3\)"):
        GaussianPrior((3,), learned=False).log_prob(torch.randn(2, 4))


def test_priors_refuse_what_they_would_broadcast_or_misread():
    from fastflow.models.priors import LogisticPrior

    with pytest.raises(ValueError, match=r"z must have shape \(B, 2, 2\)"):
        LogisticPrior((2, 2)).log_prob(torch.randn(3, 5))  # was a log-density of the wrong shape's elements
    with pytest.raises(ValueError, match=r"z must have shape \(B, 3, 2, 2\)"):
        GaussianPrior((3, 2, 2)).log_prob(torch.randn(2, 3, 2, 1))  # a learned top prior
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        GaussianPrior((3,), num_classes=-1)  # was silently unconditional
    with pytest.raises(TypeError, match="num_classes must be an int"):
        GaussianPrior((3,), num_classes=2.5)
    prior = GaussianPrior((3, 2, 2), num_classes=4)  # float32 parameters, a float64 draw asked for
    assert prior.sample(2, 1.0, torch.tensor([0, 3]), dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(2, 6), ValueError, r"x must hold 4 values per sample, got shape \(2, 6\)"),  # a reshape error
        (torch.randn(2, 2, 2), ValueError, "x must have shape .B, D. or .B, C, H, W., got rank 3"),  # was accepted
        (torch.randn(2, 4).double(), TypeError, "x is torch.float64 but the layer's network is torch.float32"),
        (torch.ones(2, 4).long(), TypeError, "x must be a floating-point tensor, got torch.int64"),
    ],
)
def test_nice_coupling_on_its_own_names_bad_input(x, error, match):
    """Inside a model the model checks its input; the layer alone failed in a reshape or a matrix product."""
    from fastflow.models.nice import NICECoupling

    coupling = NICECoupling(4, 8, 1, 0)
    with pytest.raises(error, match=match):
        coupling(x)
    with pytest.raises(error, match=match.replace("x ", "y ", 1)):
        coupling.inverse(x)


def test_layer_constants_are_checked_at_construction():
    from fastflow.models.nice import NICECoupling
    from fastflow.nn import ActNorm

    for eps in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match="eps must be a finite float > 0"):
            ActNorm(3, eps=eps)  # a negative eps blamed NaN input on a constant batch
    with pytest.raises(ValueError, match="parity must be 0 or 1"):
        NICECoupling(4, 8, 2, parity=2)  # was an IndexError at the first forward


def test_nonfinite_context_or_latents_do_not_pass_silently_through_sampling():
    model = TabularFlow(4, context=2, transforms=1, hidden=8)
    context = torch.randn(3, 2)
    context[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="decoded samples hold non-finite values"):
        model.sample(3, context)
    with pytest.raises(FloatingPointError, match="decoded samples hold non-finite values"):
        model.decode([torch.full((2, 4), float("inf"))], torch.randn(2, 2))
    model.check_finite = False
    assert bool(torch.isnan(model.sample(3, context)).any())


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 16.63553), (torch.float64, 36.73680056967710)])
def test_logistic_prior_draws_reach_the_tails_of_its_dtype(monkeypatch, dtype, bound):
    """``u`` was clamped to ``[1e-6, 1 - 1e-6]`` in every dtype: no draw beyond ``|z| = 13.8`` (0.16% of the
    samples of a 784-D model had a clipped element); the clamp is now ``torch.rand``'s own step."""
    from fastflow.models import priors

    def extremes(fn, shape, device, dtype, generator):
        return torch.tensor([0.0, 1.0 - torch.finfo(dtype).eps / 2], dtype=dtype).expand(shape[0], 2)

    monkeypatch.setattr(priors, "draw", extremes)
    z = priors.LogisticPrior((2,)).sample(1, 1.0, dtype=dtype)
    torch.testing.assert_close(z, torch.tensor([[-bound, bound]], dtype=dtype), rtol=1e-6, atol=0)


def test_vmap_with_the_finite_check_on_says_to_switch_it_off():
    """vmap's own error ("data-dependent control flow ... please file an issue") never named ``check_finite``."""
    model = TabularFlow(3, transforms=1, hidden=8)
    x = torch.randn(4, 3)
    want = model.log_prob(x).detach()  # initialises ActNorm

    def per_sample(v: torch.Tensor) -> torch.Tensor:
        return model.log_prob(v[None])[0]

    with pytest.raises(RuntimeError, match="set model.check_finite = False under vmap"):
        torch.func.vmap(per_sample)(x)
    model.check_finite = False
    torch.testing.assert_close(torch.func.vmap(per_sample)(x), want)


def test_a_bad_context_under_vmap_is_named_not_hidden_by_a_device_read():
    """Every ValueError of the forward was followed by a finite check of the input (for ActNorm's init), a device
    read that vmap refused with its own error instead of the context's."""
    model = TabularFlow(3, context=2, transforms=1, hidden=8)
    model.log_prob(torch.randn(4, 3), torch.randn(4, 2))
    model.check_finite = False
    with pytest.raises(ValueError, match="context has 5 features"):
        torch.func.vmap(lambda v, c: model.log_prob(v[None], c[None])[0])(torch.randn(4, 3), torch.randn(4, 5))


def test_nice_diagonal_scaling_refuses_a_shape_it_would_broadcast():
    from fastflow.models.nice import DiagonalScaling

    scaling = DiagonalScaling((3, 2, 2))
    for x in (torch.randn(2, 1, 2, 2), torch.randn(2, 5, 2, 2)):  # both broadcast to a (2, 3 or 5, 2, 2) output
        for fn, name in ((scaling, "x"), (scaling.inverse, "y")):
            with pytest.raises(ValueError, match=rf"{name} must have shape \(B, 3, 2, 2\)"):
                fn(x)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Glow(1, 4, levels=True, steps=1, hidden=4), TypeError, "levels must be an int"),
        (lambda: Glow(1, 4, levels=2.5, steps=1, hidden=4), TypeError, "levels must be an int"),
        (lambda: Glow(1, 4, levels=1, steps=None, hidden=4), TypeError, "steps must be an int"),
        (lambda: Glow(1, 4, levels=1, steps=1, hidden=4, lu="no"), TypeError, "lu must be a bool"),  # was LU
        (lambda: Glow(1, 4, levels=1, steps=1, hidden=4, learn_top=None), TypeError, "learn_top must be a bool"),
        (lambda: Glow(1, 4, levels=1, steps=1, hidden=4, coupling="additive", scale="bogus"), ValueError, "scale"),
    ],
)
def test_glow_arguments_that_would_not_load_back_are_refused(make, error, match):
    """Each was accepted, and the checkpoint of the model built with it failed to load."""
    with pytest.raises(error, match=match):
        make()


def test_switching_reversible_takes_a_bool_only():
    model = Glow(1, 4, levels=1, steps=1, hidden=4)
    for value in ("no", 1, None):  # "no" switched it on; 1 was stored and the checkpoint would not load
        with pytest.raises(TypeError, match="reversible must be a bool"):
            model.reversible = value
    assert model.reversible is False and model.config["reversible"] is False
    model.reversible = True
    assert model.reversible and model.config["reversible"] is True


def test_warnings_point_at_the_callers_line():
    """The out-of-range input warning and ActNorm's degenerate-channel warning name the line that called the model
    (through ``log_prob``, the module's ``__call__`` or a compiled function), not fastflow's or torch's frames."""
    import inspect
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Glow(1, 4, levels=1, steps=1, hidden=4).log_prob(torch.rand(2, 1, 4, 4))
        first = inspect.currentframe().f_lineno - 1
        Glow(1, 4, levels=1, steps=1, hidden=4)(torch.zeros(2, 1, 4, 4))
        second = inspect.currentframe().f_lineno - 1
        compiled = torch.compile(Glow(1, 4, levels=1, steps=1, hidden=4).log_prob, backend="eager")
        compiled(torch.zeros(2, 1, 4, 4) + 0.1)  # ActNorm's warning under torch.compile (Dynamo's frames)
        third = inspect.currentframe().f_lineno - 1
    where = [(w.filename, w.lineno, str(w.message)[:30]) for w in caught]
    assert {(f, n) for f, n, _ in where} == {(__file__, first), (__file__, second), (__file__, third)}, where


def test_check_guards_keeps_the_diagnosis_error_s_own_cause(monkeypatch):
    """With no drift error to chain, the error naming the layer is raised as it is (its own cause kept)."""
    model = TabularFlow(4, transforms=2, hidden=8)

    def diagnose(x, context):
        raise RuntimeError("the layer failed") from KeyError("inner")

    monkeypatch.setattr(model, "_diagnose", diagnose)
    model._nonfinite_seen.fill_(True)
    with pytest.raises(RuntimeError, match="the layer failed") as raised:
        model.check_guards(torch.randn(2, 4))
    assert isinstance(raised.value.__cause__, KeyError)
