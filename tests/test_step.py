"""fastflow.step: the eager, compiled and CUDA-graph training steps give the same losses and weights."""

from __future__ import annotations

import copy

import pytest
import torch

from fastflow.models import Glow, Jet
from fastflow.step import CAPTURE_WARMUP_STEPS, BitsPerDim, TrainStep, clip_gradients, make_adam


def _run(
    mode: str,
    device: str = "cpu",
    steps: int = 3,
    dtype: torch.dtype = torch.float64,
    reversible: bool = False,
    initialize: bool = True,
    **kwargs,
) -> tuple[list[float], torch.Tensor]:
    """Losses of ``steps`` steps of a tiny Glow, and its flattened weights after them. Float64 by default: Adam
    turns float32 rounding noise in near-zero gradients into steps of size lr, which would hide real differences."""
    torch.manual_seed(0)
    model = Glow(3, 8, levels=2, steps=2, hidden=16, reversible=reversible).to(device, dtype)
    batches = [torch.rand(4, 3, 8, 8, device=device, dtype=dtype) - 0.5 for _ in range(steps)]
    if initialize:
        with torch.no_grad():
            model.bits_per_dim(batches[0])  # ActNorm's data-dependent init, outside the step
    optimizer = make_adam(model.parameters(), 1e-3, mode)
    step = TrainStep(BitsPerDim(model), model, optimizer, clip=50.0, mode=mode, **kwargs)
    losses = [float(step(x, None, lr=1e-3 * (i + 1))) for i, x in enumerate(batches)]
    return losses, torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


def test_a_compiled_step_initialises_actnorm_eagerly_before_compiling():
    """Left to the first compiled step, ActNorm's host-side init broke its graph dozens of times and hit Dynamo's
    recompile limit (the later steps ran slower than eager); the step now runs it eagerly first."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    compiled_losses, compiled_weights = _run("compile", initialize=False)
    assert sum(counters["graph_break"].values()) == breaks and counters["stats"]["unique_graphs"] - graphs == 1
    losses, weights = _run("eager", initialize=False)
    torch.testing.assert_close(compiled_losses, losses, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(compiled_weights, weights, atol=1e-9, rtol=1e-9)


def test_gradient_norms_of_float64_and_half_gradients_together():
    """A float64 gradient beside half-precision ones was narrowed to float32 by the norm (a RuntimeError)."""
    grads = [torch.full((3,), 2.0, dtype=torch.float64), torch.full((4,), 1.0, dtype=torch.float16)]
    norm = clip_gradients(grads, 1.0, torch.device("cpu"))  # sqrt(3 * 4 + 4 * 1) = 4, then scaled to norm 1
    assert norm.dtype == torch.float64 and abs(float(norm) - 4.0) < 1e-12
    torch.testing.assert_close(grads[0], torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-6, atol=0)


def test_a_model_without_trainable_parameters_is_refused():
    model = Glow(1, 4, levels=1, steps=1, hidden=4).requires_grad_(False)
    with pytest.raises(ValueError, match="model has no parameters that require grad"):
        TrainStep(BitsPerDim(model), model, make_adam([torch.nn.Parameter(torch.zeros(1))], 1e-3))


def test_compiled_step_matches_eager():
    losses, weights = _run("eager", channels_last=False)
    compiled_losses, compiled_weights = _run("compile")
    assert losses[0] != losses[-1]  # the steps trained
    torch.testing.assert_close(compiled_losses, losses, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(compiled_weights, weights, atol=1e-9, rtol=1e-9)


def test_cpu_steps_are_channels_last_unless_told_and_match_the_parameters_layout():
    """``channels_last=None`` picks channels-last on the CPU for models with convolutions (every mode), not for
    a Jet; reversible training, eager and compiled, in that layout gives the losses and weights of the
    parameters' own layout."""
    model = Glow(3, 8, levels=2, steps=1, hidden=8)
    for mode in ("eager", "compile"):
        assert TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3), mode=mode).channels_last
    step = TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3), channels_last=False)
    assert not step.channels_last
    jet = Jet(3, 8, patch_size=2, couplings=2, width=16, depth=1, heads=2)  # no convolution weights
    assert not TrainStep(BitsPerDim(jet), jet, make_adam(jet.parameters(), 1e-3), mode="compile").channels_last
    losses, weights = _run("eager", reversible=True, channels_last=False)
    for mode in ("eager", "compile"):
        got_losses, got_weights = _run(mode, reversible=True)
        torch.testing.assert_close(got_losses, losses, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(got_weights, weights, atol=1e-9, rtol=1e-9)


def test_channels_last_step_matches_eager():
    losses, weights = _run("eager", channels_last=False)
    cl_losses, cl_weights = _run("eager", channels_last=True)
    torch.testing.assert_close(cl_losses, losses, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(cl_weights, weights, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("saved_channels_last", [True, False])
def test_an_adam_state_of_the_other_layout_takes_the_parameters_layout(saved_channels_last):
    """A resumed Adam state keeps the layout it was saved in; TrainStep gives it the parameters' layout once it has
    fixed theirs, values kept (the fused CPU Adam ignores strides: each weight got another element's moments)."""
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    torch.manual_seed(0)
    model = Glow(3, 8, levels=2, steps=1, hidden=8).double()
    with torch.no_grad():
        model.bits_per_dim(x)
    optimizer = make_adam(model.parameters(), 1e-3)
    TrainStep(BitsPerDim(model), model, optimizer, channels_last=saved_channels_last)(x, None, lr=1e-3)
    saved = copy.deepcopy(optimizer.state_dict())
    resumed = copy.deepcopy(model)
    for p in resumed.parameters():  # a fresh model, laid out as built
        p.data = p.data.contiguous()
    resumed_optimizer = make_adam(resumed.parameters(), 1e-3)
    resumed_optimizer.load_state_dict(saved)
    TrainStep(BitsPerDim(resumed), resumed, resumed_optimizer, channels_last=not saved_channels_last)
    parameters = list(resumed.parameters())
    assert any(saved["state"][i]["exp_avg"].stride() != p.stride() for i, p in enumerate(parameters)), "one layout"
    for i, p in enumerate(parameters):
        for key in ("exp_avg", "exp_avg_sq"):
            state = resumed_optimizer.state[p][key]
            assert state.stride() == p.stride(), (i, key)
            torch.testing.assert_close(state, saved["state"][i][key], rtol=0, atol=0)


def test_step_sets_the_learning_rate_and_skips_updates_after_a_failure():
    model = Glow(3, 8, levels=2, steps=1, hidden=8)
    optimizer = make_adam(model.parameters(), 1e-3)
    step = TrainStep(BitsPerDim(model), model, optimizer)
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        model.bits_per_dim(x)
    loss = step(x, None, lr=5e-4)
    assert loss.dim() == 0 and not loss.requires_grad and loss.dtype == torch.float32
    assert all(float(group["lr"]) == pytest.approx(5e-4) for group in optimizer.param_groups)
    kept = [p.detach().clone() for p in model.parameters()]
    step(torch.full_like(x, float("nan")), None, lr=5e-4)  # a non-finite loss: recorded, the update skipped
    step(x, None, lr=5e-4)  # and every later one, until the caller reads the guards
    assert float(step.skip) == 1.0
    assert all(torch.equal(p, k) for p, k in zip(model.parameters(), kept))
    step.clear_skip()  # the model's record is still set: the next step sets the flag again, no update
    step(x, None, lr=5e-4)
    assert float(step.skip) == 1.0 and all(torch.equal(p, k) for p, k in zip(model.parameters(), kept))
    with pytest.raises(FloatingPointError):
        model.check_guards()  # read and cleared
    step.clear_skip()
    step(x, None, lr=5e-4)  # trains again
    assert float(step.skip) == 0.0 and not all(torch.equal(p, k) for p, k in zip(model.parameters(), kept))


def test_a_learning_rate_that_is_not_a_finite_number_at_least_0_is_refused_before_the_step():
    """A NaN rate passed the skip guard (which looks at the loss and gradients) and wrote NaN into every weight."""
    model = Glow(3, 8, levels=2, steps=1, hidden=8)
    step = TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3))
    x = torch.rand(2, 3, 8, 8) - 0.5
    with torch.no_grad():
        model.bits_per_dim(x)
    kept = [p.detach().clone() for p in model.parameters()]
    for lr, error in ((float("nan"), ValueError), (float("inf"), ValueError), (-1e-3, ValueError), (True, TypeError)):
        with pytest.raises(error, match="lr must be"):
            step(x, None, lr)
    assert all(torch.equal(p, k) for p, k in zip(model.parameters(), kept))
    step(x, None, 0)  # a zero rate (a warm-up's first step) is a rate
    assert all(torch.equal(p, k) for p, k in zip(model.parameters(), kept))


def test_a_step_with_out_of_range_labels_is_skipped():
    """An out-of-range class label inside a step (no host read there) makes the loss NaN: the update is skipped
    and the weights stay, and ``check_guards`` with the batch names the labels."""
    torch.manual_seed(0)
    model = Glow(1, 4, levels=2, steps=1, hidden=8, num_classes=3)
    x = torch.rand(4, 1, 4, 4) - 0.5
    model.log_prob(x, torch.tensor([0, 1, 2, 0]))  # ActNorm's initialisation
    step = TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3))
    before = [p.detach().clone() for p in model.parameters()]
    labels = torch.tensor([0, 5, -2, 1])
    step(x, labels, 1e-3)
    assert float(step.skip) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=r"must be in \[0, 3\), got values in \[-2, 5\]"):
        model.check_guards(x, labels)


def test_step_refuses_bad_settings():
    model = Glow(3, 8, levels=2, steps=1, hidden=8)
    with pytest.raises(ValueError, match="mode must be one of"):
        TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3), mode="graph")
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3), mode="cuda-graph")
    for clip in (-1.0, float("nan"), "50"):
        with pytest.raises(ValueError, match="clip must be a finite number >= 0"):
            TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3), clip=clip)
    for optimizer in (torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.SGD(model.parameters(), lr=1e-3)):
        with pytest.raises(ValueError, match="needs a fused optimizer.*make_adam"):  # not at the first step
            TrainStep(BitsPerDim(model), model, optimizer)
    with pytest.raises(ValueError, match="mode must be one of"):
        make_adam(model.parameters(), 1e-3, "bogus")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["compile", "cuda-graph"])
def test_step_modes_match_eager_on_cuda(mode):
    steps = CAPTURE_WARMUP_STEPS + 3  # warm-up, capture + replay, then plain replays
    losses, weights = _run("eager", "cuda", steps)
    other_losses, other_weights = _run(mode, "cuda", steps)
    torch.testing.assert_close(other_losses, losses, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(other_weights, weights, atol=1e-9, rtol=1e-9)


def test_clipping_matches_torch_and_half_gradients_take_a_float32_norm():
    """The step's clipping is ``clip_grad_norm_``'s; an fp16 model whose gradient norm exceeds fp16's range (every
    element finite) takes its update (the norm is accumulated in float32, not flagged as non-finite)."""
    torch.manual_seed(0)
    model = Glow(3, 8, levels=2, steps=1, hidden=8).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64) - 0.5
    with torch.no_grad():
        model.bits_per_dim(x)
    twin = Glow(3, 8, levels=2, steps=1, hidden=8).double()
    twin.load_state_dict(model.state_dict())
    step = TrainStep(BitsPerDim(model), model, make_adam(model.parameters(), 1e-3), clip=0.5, channels_last=False)
    step(x, None, 1e-3)
    optimizer = make_adam(twin.parameters(), 1e-3)
    twin.bits_per_dim(x).mean().backward()
    want_norm = torch.nn.utils.clip_grad_norm_(list(twin.parameters()), 0.5)
    optimizer.step()
    torch.testing.assert_close(step.grad_norm, want_norm)
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got, want)

    half = Glow(1, 4, levels=1, steps=1, hidden=8, n_bins=4).half()
    levels = (torch.rand(8, 1, 4, 4) - 0.5).half()
    half.bits_per_dim(levels)
    largest = max(half.parameters(), key=lambda p: p.numel())
    largest.register_hook(lambda grad: torch.full_like(grad, 5e3))  # a norm of 5e3 * sqrt(numel) > 65504
    for clip in (0.0, 50.0):
        before = largest.detach().clone()
        step = TrainStep(BitsPerDim(half), half, make_adam(half.parameters(), 1e-3), clip=clip, channels_last=False)
        step(levels, None, 1e-3)
        assert step.grad_norm.dtype == torch.float32 and torch.isfinite(step.grad_norm) and step.grad_norm > 65504
        assert float(step.skip) == 0 and not torch.equal(largest.detach(), before)


def test_settings_the_step_cannot_honour_are_refused():
    """Parameter groups at different learning rates (the step sets one for all), fp16 autocast without a loss
    scaler, and a non-fused optimizer under fp16 scaling (its lr tensor is read back) are refused; the skip flag is
    float32 whatever the default dtype (fused Adam's found_inf)."""
    model = Glow(3, 8, levels=1, steps=1, hidden=8)
    params = list(model.parameters())
    groups = torch.optim.Adam([{"params": params[:2], "lr": 1e-3}, {"params": params[2:], "lr": 1e-4}], fused=True)
    with pytest.raises(ValueError, match="different learning rates"):
        TrainStep(BitsPerDim(model), model, groups)
    with pytest.raises(ValueError, match="amp='fp16' needs an enabled loss scaler"):
        TrainStep(BitsPerDim(model), model, make_adam(params, 1e-3), amp="fp16")
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="needs a fused optimizer"):
        TrainStep(BitsPerDim(model), model, torch.optim.Adam(params, 1e-3), amp="fp16", scaler=scaler)
    for amp in ("bf16", None):  # accepted before: the scaler took the skips over, a tripped guard skipped nothing
        with pytest.raises(ValueError, match="an enabled loss scaler is for amp='fp16' only"):
            TrainStep(BitsPerDim(model), model, make_adam(params, 1e-3), amp=amp, scaler=scaler)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        double = Glow(3, 8, levels=1, steps=1, hidden=8)
        step = TrainStep(BitsPerDim(double), double, make_adam(double.parameters(), 1e-3), channels_last=False)
        assert step.skip.dtype == torch.float32
        step(torch.rand(2, 3, 8, 8) - 0.5, None, 1e-3)
    finally:
        torch.set_default_dtype(default)


def test_the_finite_checks_record_moves_with_the_model():
    """Left on the CPU by model.to(device), the first compiled step on the device would swap in a new record and
    recompile the next step; it moves (and stays a bool through dtype casts)."""
    model = Glow(3, 8, levels=1, steps=1, hidden=8).to("meta")
    assert model._nonfinite_seen.device.type == "meta"
    assert Glow(3, 8, levels=1, steps=1, hidden=8).double()._nonfinite_seen.dtype == torch.bool
