"""Reversible backprop: same loss and gradients as standard backprop, flat saved memory, drift guard."""

from __future__ import annotations

import math
import re
from copy import deepcopy

import pytest
import torch
from torch import nn

from fastflow.models import Glow, RealNVP
from fastflow.nn import FlowSequential, FlowStep
from fastflow.nn.actnorm_invconv import ActNormInvConv
from fastflow.nn.base import FlowLayer
from fastflow.nn.reversible import (
    ReconstructionError,
    _as_leaves,
    _relative_drift,
    _weight_tensors,
    deferred_guards,
    drift_tripped,
    read_drift_guard,
)
from tests.helpers import loss_and_grads, perturb_parameters


def _initialised(model, dtype=torch.float64, scale=0.05):
    model = model.to(dtype).train()
    model.log_prob(torch.rand(16, *model.image_shape, dtype=dtype) - 0.5)
    perturb_parameters(model, scale)
    return model


def _assert_same_training_step(model, x, rtol):
    loss_std, grads_std = loss_and_grads(model, x, reversible=False)
    loss_rev, grads_rev = loss_and_grads(model, x, reversible=True)
    torch.testing.assert_close(loss_rev, loss_std, rtol=rtol, atol=0)
    for (name, _), g_std, g_rev in zip(model.named_parameters(), grads_std, grads_rev):
        scale = g_std.abs().max().clamp_min(1e-12)
        assert (g_rev - g_std).abs().max() / scale <= rtol, name


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-5), (torch.float32, 1e-3)])
def test_glow_k32_gradients_equal_standard_backprop(dtype, rtol):
    torch.manual_seed(0)
    model = _initialised(Glow(2, 4, levels=2, steps=32, hidden=8), dtype)
    x = torch.rand(4, 2, 4, 4, dtype=dtype) - 0.5
    _assert_same_training_step(model, x, rtol)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Glow(2, 4, levels=2, steps=3, hidden=8, coupling="additive", lu=False),
        lambda: Glow(2, 4, levels=1, steps=3, hidden=8, scale="exp"),
        lambda: RealNVP(2, 4, scales=2, hidden=8),
    ],
)
def test_other_presets_gradients_equal_standard_backprop(make):
    model = _initialised(make())
    _assert_same_training_step(model, torch.rand(3, *model.image_shape, dtype=torch.float64) - 0.5, 1e-5)


def test_gradient_accumulation_matches_standard():
    model = _initialised(Glow(2, 4, levels=2, steps=2, hidden=8))
    batches = [torch.rand(3, 2, 4, 4, dtype=torch.float64) - 0.5 for _ in range(2)]
    accumulated = {}
    for reversible in (False, True):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        for x in batches:
            model.bits_per_dim(x).mean().backward()
        accumulated[reversible] = [p.grad.clone() for p in model.parameters()]
    for g_std, g_rev in zip(accumulated[False], accumulated[True]):
        torch.testing.assert_close(g_rev, g_std, rtol=1e-7, atol=1e-10)


def test_accumulation_hooks_see_what_standard_backprop_gives_them():
    """Hooks on the parameters' gradient accumulation (DistributedDataParallel's reducer among them) see the
    accumulated gradient, as in standard backprop: under DDP's no_sync accumulation the earlier micro-batches'
    gradients are reduced with the last one's. The walk had set .grad aside and added it back after, so a
    post-accumulate hook saw the last micro-batch alone (0.17 of a 1.17 mean), and DDP left the rest unreduced."""
    model = _initialised(Glow(2, 4, levels=2, steps=2, hidden=8))
    batches = [torch.rand(3, 2, 4, 4, dtype=torch.float64) - 0.5 for _ in range(2)]
    params = list(model.parameters())
    seen: dict[bool, dict[int, torch.Tensor]] = {}
    for reversible in (False, True):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        seen[reversible] = {}
        handles = [
            p.register_post_accumulate_grad_hook(lambda p, i=i, s=seen[reversible]: s.__setitem__(i, p.grad.clone()))
            for i, p in enumerate(params)
        ]
        for x in batches:
            model.bits_per_dim(x).mean().backward()
        for handle in handles:
            handle.remove()
        for i, p in enumerate(params):  # the hook's last view is the final .grad
            torch.testing.assert_close(seen[reversible][i], p.grad, rtol=0, atol=0)
    assert seen[True].keys() == seen[False].keys() == set(range(len(params)))
    for i in seen[False]:
        torch.testing.assert_close(seen[True][i], seen[False][i], rtol=1e-7, atol=1e-10)


def _saved_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.bits_per_dim(x).mean()
    return total


def test_saved_activation_memory_is_flat_in_depth():
    x = torch.rand(2, 2, 8, 8) - 0.5
    saved = {}
    for steps in (8, 64):
        for reversible in (False, True):
            model = _initialised(Glow(2, 8, levels=2, steps=steps, hidden=16, reversible=reversible), torch.float32)
            saved[steps, reversible] = _saved_bytes(model, x)
    assert saved[64, True] < 1.1 * saved[8, True]
    assert saved[64, False] > 4 * saved[8, False]
    assert saved[64, True] * 20 < saved[64, False]


def test_reconstruction_drift_through_64_steps_is_small():
    torch.manual_seed(0)
    chain = FlowSequential(*[FlowStep(4, hidden=16) for _ in range(64)]).train()
    x = torch.randn(4, 4, 8, 8)
    chain(x)
    perturb_parameters(chain, 0.05)
    chain.eval()
    with torch.no_grad():
        y, _ = chain(x)
        x_back, _ = chain.inverse(y)
    drift = float((x_back - x).abs().max() / x.abs().max())
    assert drift < 1e-4, f"float32 drift through 64 Glow steps: {drift:.2e}"


def test_drift_is_measured_in_the_inputs_dtype():
    """A float64 drift far below float32's rounding is measured as such (cast first, it read 6e-8 and tripped
    float64's default max_drift of 1e-8)."""
    original = torch.tensor([1.0 + 2.0**-24, 3.0, -2.0], dtype=torch.float64)  # a float32 rounding midpoint
    rebuilt = original.clone()
    rebuilt[0] += 1e-15
    drift = float(_relative_drift(rebuilt, original, torch.zeros(())))
    assert 1e-16 < drift < 1e-15


def test_drift_guard_raises_instead_of_returning_bad_gradients():
    chain = FlowSequential(FlowStep(4, hidden=8), FlowStep(4, hidden=8), reversible=True).train()
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    y, logdet = chain(x)
    with torch.no_grad():  # the map changes between forward and backward: the rebuilt input is wrong
        chain.layers[1].actnorm.bias.add_(0.5)
    with pytest.raises(ReconstructionError, match="relative drift"):
        (y.sum() + logdet.sum()).backward()


def test_drift_guard_leaves_the_gradients_as_they_were():
    torch.manual_seed(0)
    chain = FlowSequential(FlowStep(4, hidden=8), FlowStep(4, hidden=8), reversible=True).train()
    x = torch.randn(2, 4, 4, 4)
    chain(x)  # ActNorm init
    params = list(chain.parameters())
    before = [None if i % 2 else torch.randn_like(p) for i, p in enumerate(params)]  # accumulated and None
    # the accumulated ones as views of one flat buffer (flat-buffer optimizers, bucketed all-reduce): the same
    # tensors must hold the same values after (autograd accumulates into them in place)
    flat = torch.cat([g.flatten() for g in before if g is not None])
    views = iter(flat.clone().split([g.numel() for g in before if g is not None]))
    for p, grad in zip(params, before):
        p.grad = None if grad is None else next(views).view_as(grad)
    grads = [p.grad for p in params]
    y, logdet = chain(x)
    with torch.no_grad():
        chain.layers[1].actnorm.bias.add_(0.5)
    with pytest.raises(ReconstructionError):
        (y.sum() + logdet.sum()).backward()
    for p, grad, tensor in zip(params, before, grads):
        assert p.grad is tensor
        if grad is not None:
            torch.testing.assert_close(p.grad, grad, rtol=0, atol=0)


def test_deferred_drift_guard_records_on_the_device_and_raises_when_read():
    torch.manual_seed(0)
    chain = FlowSequential(FlowStep(4, hidden=8), FlowStep(4, hidden=8), reversible=True).train()
    x = torch.randn(2, 4, 4, 4)
    chain(x)  # ActNorm init
    for drifts in (False, True):
        chain.zero_grad(set_to_none=True)
        with deferred_guards():
            y, logdet = chain(x.clone().requires_grad_(True))
        if drifts:
            with torch.no_grad():
                chain.layers[1].actnorm.bias.add_(0.5)
        (y.sum() + logdet.sum()).backward()  # no read and no error here, drift or not
        assert all(p.grad is not None for p in chain.parameters()), "deferred: the gradients are accumulated"
        assert bool(drift_tripped(chain)) == drifts
        error = read_drift_guard(chain)
        assert (error is not None) == drifts
    assert isinstance(error, ReconstructionError)
    assert re.search(r"relative drift beyond max_drift in the chain \(\S+ times its max_drift, 0.001 in", str(error))
    assert read_drift_guard(chain) is None and not bool(drift_tripped(chain)), "the read cleared the record"


def test_drift_records_are_module_state_made_with_the_chain():
    """The records exist before any backward (a compiled guard read never recompiles when the first one
    records), add nothing to the state dict, and a copy of the model reads its own."""
    torch.manual_seed(0)
    model = Glow(2, 4, levels=2, steps=2, hidden=8, reversible=True).train()
    x = torch.rand(2, 2, 4, 4) - 0.5
    model.log_prob(x)  # ActNorm init
    assert not any("drift" in key or "excess" in key for key in model.state_dict())
    compiles = []

    def backend(gm, example_inputs):  # type: ignore[no-untyped-def]
        compiles.append(gm)
        return gm.forward

    tripped = torch.compile(lambda: drift_tripped(model), backend=backend, fullgraph=True)
    assert not bool(tripped())
    with deferred_guards():
        loss = -model.log_prob(x).mean()
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, FlowStep)).actnorm.bias.add_(0.5)
    loss.backward()
    assert bool(tripped()) and len(compiles) == 1
    copy = deepcopy(model)
    assert read_drift_guard(copy) is not None, "the copy's records hold the copied excess"
    assert read_drift_guard(copy) is None and bool(drift_tripped(model)), "reading the copy left the model's"


def test_autocast_bf16_reversible_matches_standard_within_bf16_tolerance():
    torch.manual_seed(0)
    model = _initialised(Glow(2, 4, levels=2, steps=4, hidden=8), torch.float32)
    x = torch.rand(4, 2, 4, 4) - 0.5
    results = {}
    for reversible in (False, True):
        model.reversible = reversible
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.bits_per_dim(x).mean()
        loss.backward()
        results[reversible] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-2, atol=0)
    g_std, g_rev = results[False][1], results[True][1]
    assert (g_rev - g_std).norm() / g_std.norm() < 0.05


def test_non_invertible_layer_is_rejected():
    with pytest.raises(TypeError, match="not invertible"):
        FlowSequential(FlowStep(4, hidden=8), torch.nn.Conv2d(4, 4, 1), reversible=True)


def _reversible_chain_and_input():
    torch.manual_seed(0)
    chain = FlowSequential(*[FlowStep(4, hidden=8) for _ in range(3)], reversible=True).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    chain(x)  # ActNorm init
    perturb_parameters(chain, 0.05)
    return chain, x


def test_the_walk_frees_the_chain_output_it_starts_from(monkeypatch):
    """The chain's output is handed to its backward outside ``save_for_backward``: once the walk is past the
    last unit, nothing keeps it."""
    import weakref

    import fastflow.nn.reversible as reversible

    chain, x = _reversible_chain_and_input()
    y, logdet = chain(x)
    loss = y.square().sum() + logdet.sum()  # the square's backward keeps y: it runs before the chain's
    storage = weakref.ref(y.untyped_storage())
    del y
    alive = []
    layer_backward = reversible._layer_backward

    def recording(*args, **kwargs):
        alive.append(storage() is not None)
        return layer_backward(*args, **kwargs)

    monkeypatch.setattr(reversible, "_layer_backward", recording)
    loss.backward()
    # one call per FlowStep and one per unit inside it (coupling, ActNorm + 1x1): the last FlowStep, a nested chain,
    # walks from the output it was handed; from the next FlowStep on, nothing keeps that output
    assert alive == [True] * 3 + [False] * 6


def test_second_backward_needs_retain_graph_and_in_place_output_change_raises():
    chain, x = _reversible_chain_and_input()
    y, logdet = chain(x)
    loss = y.square().sum() + logdet.sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in chain.parameters()]
    chain.zero_grad()
    loss.backward()  # the graph was retained: the output too
    for g, g2 in zip(first, (p.grad for p in chain.parameters())):
        torch.testing.assert_close(g2, g, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    y, logdet = chain(x)
    loss = logdet.sum() + y.sum()
    with torch.no_grad():
        y.add_(1.0)
    with pytest.raises(RuntimeError, match="in-place"):
        loss.backward()


def test_reversible_flag_keeps_the_state_dict():
    model = Glow(1, 4, levels=1, steps=2, hidden=8)
    keys = list(model.state_dict())
    model.reversible = True
    assert list(model.state_dict()) == keys and model.config["reversible"] is True


def _round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32's 10-bit mantissa (round to nearest), as tensor cores read their operands;
    gradients pass straight through."""
    bits = t.detach().contiguous().view(torch.int32)
    return t + (((bits + 0x1000) & ~0x1FFF).view(torch.float32) - t).detach()


def _tf32_channel_mix(x, weight, bias=None, upcast=False):
    y = torch.nn.functional.conv2d(_round_to_tf32(x), _round_to_tf32(weight.to(x.dtype))[:, :, None, None])
    return y if bias is None else y + bias.to(y.dtype).reshape(1, -1, 1, 1)


def _flag_following_mix(x, weight, bias=None):
    """The ATen mix as an accelerator runs it: TF32-rounded while cuDNN's TF32 flag is on (emulated on the CPU,
    which has no TF32), IEEE float32 while it is off."""
    rounded = torch.backends.cudnn.allow_tf32
    x, weight = (_round_to_tf32(x), _round_to_tf32(weight)) if rounded else (x, weight)
    return torch.nn.functional.conv2d(x, weight[:, :, None, None], bias)


def _deep_reversible_step(monkeypatch, tf32: bool):
    """A reversible training step through 32 Glow steps of 12 channels, with the TF32 flags on (the flags users
    get): its 1x1 mixes TF32-rounded (``tf32``), or on the op path, which runs the mix as an accelerator would (the
    ATen mix follows the flags, emulated) inside the IEEE guard that is to keep it exact."""
    import fastflow.ops.actnorm_invconv as actnorm_invconv_ops
    import fastflow.ops.channel_mix as channel_mix_ops

    if tf32:
        monkeypatch.setattr(channel_mix_ops, "channel_mix_ref", _tf32_channel_mix)
        monkeypatch.setattr(actnorm_invconv_ops, "channel_mix_ref", _tf32_channel_mix)
    else:
        monkeypatch.setattr(channel_mix_ops, "tf32_applies", lambda x: True)
        monkeypatch.setattr(channel_mix_ops, "_mix", _flag_following_mix)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    torch.manual_seed(0)
    chain = FlowSequential(*[FlowStep(12, hidden=16) for _ in range(32)], reversible=True).train()
    x = torch.randn(4, 12, 8, 8)
    chain(x)  # ActNorm init
    perturb_parameters(chain, 0.05)
    y, logdet = chain(x.requires_grad_(True))
    (y.square().sum() + logdet.sum()).backward()
    return x.grad


def test_tf32_mixes_would_trip_the_drift_guard_and_the_op_path_never_uses_them(monkeypatch):
    """TF32 rounding of the 1x1 mixes (emulated: operands rounded to a 10-bit mantissa) moves the rebuilt
    input of 32 Glow steps past the float32 guard; the op path, whose ATen mix follows the TF32 flags (emulated as
    on an accelerator) and which the flags are on for, does not: its IEEE guard turns them off around the mix."""
    with monkeypatch.context() as patched:
        with pytest.raises(ReconstructionError, match="relative drift"):
            _deep_reversible_step(patched, tf32=True)
    assert torch.isfinite(_deep_reversible_step(monkeypatch, tf32=False)).all()


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1e-3, ValueError), (float("nan"), ValueError), ("1e-3", TypeError)]
)
def test_max_drift_zero_or_negative_is_refused_not_read_as_off(bad, error):
    with pytest.raises(error, match="max_drift"):
        FlowSequential(FlowStep(4, hidden=8), reversible=True, max_drift=bad)


def test_max_drift_inf_turns_the_guard_off():
    chain = FlowSequential(FlowStep(4, hidden=8), FlowStep(4, hidden=8), reversible=True, max_drift=math.inf)
    chain.train()
    x = torch.randn(2, 4, 4, 4, requires_grad=True)
    y, logdet = chain(x)
    with torch.no_grad():
        chain.layers[1].actnorm.bias.add_(0.5)
    (y.sum() + logdet.sum()).backward()  # no ReconstructionError


_AUTOCAST_PEAK = """
import torch
from benchmarks.train_step import _reset_peak_rss_kb, _status_kb
from fastflow.models import Glow
torch.set_num_threads(1)
torch.manual_seed(0)
model = Glow(3, 32, levels=2, steps={steps}, hidden=256, reversible=True)
model.set_tiling(tile_size=8)
x = torch.rand(2, 3, 32, 32) - 0.5
with torch.no_grad():
    model.train()
    model.log_prob(x)
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.bits_per_dim(x).mean()
    loss.backward()
step()
model.zero_grad(set_to_none=True)
base = _reset_peak_rss_kb()
step()
grads = sum(p.numel() * 4 for p in model.parameters())
print((_status_kb("VmHWM") - base) * 1024 - grads, grads)
"""


def _autocast_step_peak(steps: int) -> tuple[float, float]:
    """(peak bytes of a reversible, tiled bf16-autocast training step above its gradients, gradient bytes),
    in a fresh process with large allocations served by mmap so that the RSS tracks live tensors."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}
    code = _AUTOCAST_PEAK.format(steps=steps)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    peak, grads = map(float, out.stdout.split())
    return peak, grads


def test_autocast_reversible_memory_stays_flat_in_depth():
    """Autocast's weight cache would keep a bf16 copy of every weight of a block through its backward (measured
    on the CPU: +3.5 MB from K=4 to K=16 here, +1.2 MB without it, for 11.8 MB more gradients)."""
    (peak4, grads4), (peak16, grads16) = _autocast_step_peak(4), _autocast_step_peak(16)
    assert peak16 - peak4 < 0.15 * (grads16 - grads4)


def test_glow_level_batches_its_weights_once_per_direction(monkeypatch):
    """A reversible Glow level computes the ``C x C`` weights of all its steps in one call for the forward, and in
    backward one for the rebuild (no graph) and one for the recompute (with a graph), as standard mode does; the
    gradients stay those of standard backprop (float64)."""
    torch.manual_seed(0)
    level = FlowSequential(*[FlowStep(4, hidden=8) for _ in range(4)], reversible=True).double().train()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    level(x)  # ActNorm init: each pair then computes its own weights
    perturb_parameters(level, 0.1)
    calls = []
    compute = ActNormInvConv._compute_weights

    def counted(pairs, x, inverse):
        calls.append((len(pairs), inverse, torch.is_grad_enabled()))
        return compute(pairs, x, inverse)

    monkeypatch.setattr(ActNormInvConv, "_compute_weights", staticmethod(counted))
    grads = []
    for reversible in (True, False):
        level.reversible = reversible
        level.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_(True)
        y, logdet = level(x_leaf)
        (y.square().sum() + logdet.sum()).backward()
        grads.append([x_leaf.grad, *(p.grad for p in level.parameters())])
    assert calls[:3] == [(4, False, False), (4, True, False), (4, False, True)]
    assert calls[3:] == [(4, False, True)]  # the standard step
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-9)


def test_handed_output_is_kept_where_torch_cannot_say_whether_the_graph_is_retained(monkeypatch):
    """On a torch without the keep-graph probe the walk keeps the chain's output (memory as before, never a
    missing output); a backward that does not retain the graph releases it."""
    import fastflow.nn.reversible as reversible

    handed = reversible._HandedOutput(torch.ones(3))
    monkeypatch.delattr(torch._C._autograd, "_get_current_graph_task_keep_graph", raising=False)
    assert reversible._graph_retained()
    handed.take()
    assert handed.take() is not None  # kept
    monkeypatch.setattr(reversible, "_graph_retained", lambda: False)
    handed.take()
    with pytest.raises(RuntimeError, match="second time"):
        handed.take()


def _vector_chain(reversible: bool = True) -> FlowSequential:
    torch.manual_seed(0)
    chain = FlowSequential(FlowStep(3, 8, vectors=True, scale="exp"), FlowStep(3, 8, vectors=True, scale="exp"))
    chain = chain.double().train()
    chain(torch.randn(16, 3, dtype=torch.float64))  # ActNorm's init
    perturb_parameters(chain, 0.1)
    chain.reversible = reversible
    return chain


def test_a_double_backward_through_a_reversible_chain_raises_instead_of_dropping_its_term():
    chain = _vector_chain()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y, logdet = chain(x)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad((y.square().sum() - logdet.sum()), x, create_graph=True)


def test_batched_gradients_through_a_reversible_chain_name_the_way_out():
    """jacobian(vectorize=True) failed inside the walk with 'Batching rule not implemented for aten::alias' (on
    every backend); the same chain without reversible backprop gives the Jacobian."""
    chain = _vector_chain()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="reversible chain has no batched backward.*set reversible=False"):
        torch.autograd.functional.jacobian(lambda v: chain(v)[0], x, vectorize=True)
    chain.reversible = False
    batched = torch.autograd.functional.jacobian(lambda v: chain(v)[0], x, vectorize=True)
    torch.testing.assert_close(batched, torch.autograd.functional.jacobian(lambda v: chain(v)[0], x))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autograd_grad_leaves_the_parameters_gradients_alone(compiled):
    """As in standard mode: ``torch.autograd.grad(loss, x)`` gives x's gradient and writes no parameter's ``.grad``
    (before, the walk's nested backward filled them all); a full backward after it gives the parameters exactly
    their gradients. Under ``torch.compile`` too (the chain's backward asks the engine, which Dynamo does not
    trace)."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    grads = {}
    for reversible in (False, True):
        chain = _vector_chain(reversible)
        torch._dynamo.reset()
        y, logdet = (torch.compile(chain, backend="aot_eager") if compiled else chain)(x)
        loss = y.square().sum() - logdet.sum()
        (grads[reversible],) = torch.autograd.grad(loss, x, retain_graph=True)
        assert all(p.grad is None for p in chain.parameters())
        loss.backward()
        grads[reversible, "params"] = [p.grad.clone() for p in chain.parameters()]
    torch.testing.assert_close(grads[True], grads[False])
    for got, want in zip(grads[True, "params"], grads[False, "params"]):
        torch.testing.assert_close(got, want)


def test_an_empty_batch_and_an_all_zero_batch_train_reversibly():
    """The drift guard is measured against the chain's output too: an all-zero input (whose activations are not
    zero) rebuilt to float rounding does not trip it, and an empty batch has no drift (before: a crash)."""
    for batch in (4, 0):
        x = torch.zeros(batch, 3, dtype=torch.float64)
        results = []
        for reversible in (False, True):
            chain = _vector_chain(reversible)
            y, logdet = chain(x)
            (y.square().sum() - logdet.sum()).backward()
            results.append([p.grad for p in chain.parameters()])
        for got, want in zip(*results[::-1]):
            torch.testing.assert_close(got, want)


def test_a_subnet_that_ignores_its_input_trains_reversibly():
    class Constant(torch.nn.Module):
        def __init__(self, in_features: int, out_features: int) -> None:
            super().__init__()
            self.b = torch.nn.Parameter(torch.full((out_features,), 0.1))

        def forward(self, a: torch.Tensor) -> torch.Tensor:
            return self.b.expand(a.shape[0], -1)

    from fastflow.nn import AffineCoupling

    torch.manual_seed(0)
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for reversible in (False, True):
        chain = FlowSequential(AffineCoupling(4, 8, "exp", vectors=True, subnet=Constant), reversible=reversible)
        chain = chain.double()
        y, logdet = chain(x)
        x.grad = None
        (y.square().sum() - logdet.sum()).backward()
        results.append((x.grad.clone(), chain.layers[0].net.b.grad.clone()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)


def test_backward_with_inputs_leaves_a_reversible_chains_parameters_alone():
    """``backward(inputs=[...])`` cannot say which of a reversible chain's parameters it names (they are no inputs
    of the chain's node): it gives none of them a ``.grad`` (before, all of them, whatever it named), and the
    gradient of the input it names is standard mode's."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    results = []
    for reversible in (False, True):
        chain = _vector_chain(reversible)
        y, logdet = chain(x)
        x.grad = None
        (y.square().sum() - logdet.sum()).backward(inputs=[x, *list(chain.parameters())[:2]])
        results.append(x.grad.clone())
        named_only = all(p.grad is None for p in list(chain.parameters())[2:])
        assert named_only and all((p.grad is None) == reversible for p in list(chain.parameters())[:2])
    torch.testing.assert_close(results[1], results[0])


def test_the_drift_guard_keeps_the_input_scale_when_the_chain_enlarges_it():
    """A chain whose output is 20x its input and whose inverse is 2% off must trip the float32 guard (measured
    against the output's size, the drift read 20x smaller and passed)."""

    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = torch.nn.Parameter(torch.tensor(20.0))

        def forward(self, x, context=None):
            return x * self.s, torch.log(self.s).expand(x.shape[0]) * x[0].numel()

        def inverse(self, y, context=None):
            return y / self.s * 1.02, -torch.log(self.s).expand(y.shape[0]) * y[0].numel()

    chain = FlowSequential(Scale(), reversible=True)
    x = torch.randn(4, 8, requires_grad=True)
    y, logdet = chain(x)
    with pytest.raises(ReconstructionError, match="relative drift"):
        (y.sum() + logdet.sum()).backward()


def test_settings_that_would_misbehave_later_are_refused_when_made():
    """``reversible="no"`` was taken as True, a ``max_drift`` of 0 set after construction made every backward raise,
    a tiling that is no Tiling failed with an AttributeError at the first run, and torch.func's transforms failed
    with a generic functorch error deep in the walk."""
    from fastflow.nn.tiling import Tiling

    with pytest.raises(TypeError, match="reversible must be a bool, got str 'no'"):
        FlowSequential(FlowStep(4, hidden=8), reversible="no")
    chain = FlowSequential(FlowStep(4, hidden=8), reversible=True)
    with pytest.raises(TypeError, match="reversible must be a bool, got str 'no'"):
        chain.reversible = "no"
    with pytest.raises(ValueError, match="max_drift must be > 0"):
        chain.max_drift = 0
    chain.max_drift = 1e-3
    assert chain.max_drift == 1e-3
    coupling = chain.layers[0].layers[-1]
    with pytest.raises(TypeError, match="tiling must be a fastflow.nn.tiling.Tiling or None, got str"):
        coupling.tiling = "abc"
    coupling.tiling = Tiling(tile_size=2)
    x = torch.randn(2, 4, 4, 4)
    chain(x)  # ActNorm's initialisation
    with pytest.raises(RuntimeError, match="reversible backprop does not run under torch.func transforms"):
        torch.func.grad(lambda t: chain(t)[1].sum())(x)
    chain.reversible = False
    assert torch.func.grad(lambda t: chain(t)[1].sum())(x).shape == x.shape


class _BatchNormShift(torch.nn.Module):
    """``y_b = x_b + f(x_a)`` with a batch norm in ``f``: a layer without a fused backward (recomputed whole)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))

    def forward(self, x, context=None):
        return torch.cat([x[:, :2], x[:, 2:] + self.f(x[:, :2])], 1), x.new_zeros(len(x))

    def inverse(self, y, context=None):
        return torch.cat([y[:, :2], y[:, 2:] - self.f(y[:, :2])], 1), y.new_zeros(len(y))


def test_batch_norms_in_conditioners_update_their_running_statistics_once():
    """The backward's recompute (and a generic layer's inverse) ran the batch norms in training mode again: their
    running statistics moved twice per step (and the batch count), so eval-mode outputs depended on the backprop
    mode. Outputs and gradients were and are the standard ones (the recompute sees the forward's batch)."""
    from fastflow.nn import AffineCoupling, InvertibleLinear

    def subnet(n_in, n_out):
        return torch.nn.Sequential(torch.nn.Linear(n_in, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, n_out))  # fmt: skip

    x = torch.randn(32, 4, dtype=torch.float64)
    results = {}
    for reversible in (False, True):
        torch.manual_seed(0)
        couplings = [AffineCoupling(4, scale="exp", vectors=True, subnet=subnet, parity=i) for i in (0, 1)]
        chain = FlowSequential(
            InvertibleLinear(4), couplings[0], _BatchNormShift(), InvertibleLinear(4), couplings[1],
            reversible=reversible,
        ).double()  # fmt: skip
        perturb_parameters(chain, 0.1)
        y, logdet = chain(x)
        (y.square().sum() + logdet.sum()).backward()
        norms = [m for m in chain.modules() if isinstance(m, torch.nn.BatchNorm1d)]
        stats = [t.clone() for m in norms for t in (m.running_mean, m.running_var, m.num_batches_tracked)]
        results[reversible] = stats, [p.grad.clone() for p in chain.parameters()]
    assert len(results[True][0]) == 9 and all(int(t) == 1 for t in results[True][0][2::3])
    for got, want in zip(results[True][0], results[False][0]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    for got, want in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_weight_leaves_keep_the_structure_and_order_of_any_batched_weights():
    """The walk's leaves of a chain's batched weights: every tensor that requires grad becomes a detached leaf that
    requires grad, in place, where torch's pytree would find it (plain lists and tuples, named tuples, and through
    the pytree other containers such as dicts); list and tuple subclasses, which the pytree keeps whole, stay as
    they are, tensors and all, at the top as inside a dict; non-tensor entries stay; and the tensors that require
    grad are listed in the same order on both sides (the walk pairs each leaf's gradient with its tensor)."""
    from fastflow.nn.actnorm_invconv import MixWeights
    from fastflow.ops.actnorm_invconv import FoldedMix

    class Pack(list):
        pass

    class Pair(tuple):
        def __new__(cls, first, second):
            return super().__new__(cls, (first, second))

    parameter = torch.randn(3, requires_grad=True)
    computed, frozen = parameter * 2, torch.randn(3)
    packed, paired = Pack([computed * 5]), Pair(computed * 6, 1)
    weights = [
        MixWeights(computed, parameter, None),
        None,
        [MixWeights(computed + 1, frozen, FoldedMix(computed * 3, parameter, frozen))],
        {"mix": computed - 1, "count": 3, "packed": packed, "nested": [computed * 4]},
        (computed / 2, "name"),
        7,
        paired,
    ]
    leaves = _as_leaves(weights)
    assert type(leaves[0]) is MixWeights and type(leaves[2][0].folded) is FoldedMix and leaves[1] is None
    assert leaves[2][0].weight_logdet is frozen and leaves[3]["count"] == 3
    assert leaves[3]["packed"] is packed and leaves[6] is paired and _as_leaves(paired) is paired
    assert type(leaves[4]) is tuple and leaves[4][1] == "name" and leaves[5] == 7
    before, after = _weight_tensors(weights), _weight_tensors(leaves)
    assert len(before) == len(after) == 8
    for tensor, leaf in zip(before, after):
        assert leaf.is_leaf and leaf.requires_grad and leaf is not tensor and torch.equal(leaf, tensor)


class _ScaledWithSharedWork(FlowLayer):
    """``y = x exp(log_scale) + shift`` whose ``log_scale`` comes batched from its chain (``batched_weights``) while
    ``shift`` is its own, and no fused backward: the walk recomputes it with its share of the weights."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(features, dtype=torch.float64) * 0.1)
        self.shift = nn.Parameter(torch.randn(features, dtype=torch.float64) * 0.1)

    @staticmethod
    def batched_weights(units, x, inverse=False):  # type: ignore[no-untyped-def]
        return list(torch.stack([u.log_scale for u in units]).unbind(0))

    def forward(self, x, context=None, weights=None):  # type: ignore[no-untyped-def]
        log_scale = self.log_scale if weights is None else weights
        return x * log_scale.exp() + self.shift, log_scale.sum().expand(x.shape[0])

    def inverse(self, y, context=None, weights=None):  # type: ignore[no-untyped-def]
        log_scale = self.log_scale if weights is None else weights
        return (y - self.shift) * (-log_scale).exp(), -log_scale.sum().expand(y.shape[0])


def test_a_unit_with_batched_weights_and_no_fused_backward_gets_all_its_gradients() -> None:
    """The walk's recompute with a share of batched weights takes both the share's gradients (to the parameters it
    came from) and the unit's own parameters' gradients."""
    torch.manual_seed(0)
    chain = FlowSequential(_ScaledWithSharedWork(4), _ScaledWithSharedWork(4))
    x = torch.randn(5, 4, dtype=torch.float64)
    grads = []
    for reversible in (False, True):
        chain.reversible = reversible
        chain.zero_grad(set_to_none=True)
        y, logdet = chain(x)
        (y.square().sum() - logdet.sum()).backward()
        grads.append([p.grad.clone() for p in chain.parameters()])
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)
