"""GPU checks (``make gpu-check``): the compiled Triton kernels on CUDA against the eager twins.

They run with TF32 on (``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32``),
the setting users get or choose for speed: the invertible mixes must stay IEEE float32 under it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastflow
from fastflow.models import Glow, Jet
from fastflow.ops.actnorm_invconv import actnorm_invconv, actnorm_invconv_ref
from fastflow.ops.channel_mix import channel_mix, channel_mix_ref
from fastflow.ops.coupling import SCALE_KINDS, affine_coupling, affine_coupling_ref
from fastflow.ops.spline import rq_spline, rq_spline_inverse, rq_spline_ref
from tests.helpers import loss_and_grads, perturb_parameters

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _tf32_on():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


@pytest.mark.parametrize("dtype", sorted(TOLERANCES, key=str))
@pytest.mark.parametrize("scale", SCALE_KINDS)
def test_coupling_kernel_on_cuda(dtype, scale):
    x, t, r = (torch.randn(3, 5, 33, 17, device="cuda", dtype=dtype) for _ in range(3))
    with fastflow.backend("triton"):
        y, logdet = affine_coupling(x, t, r, scale)
    y_ref, logdet_ref = affine_coupling_ref(x, t, r, scale, upcast=True)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.float(), y_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(logdet, logdet_ref, atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_launch_on_their_tensors_device_not_the_current_one():
    """Triton launches on the current device: from ``cuda:1`` while ``cuda:0`` was current the launch failed."""
    x, t, r = (torch.randn(3, 5, 33, 17, device="cuda:1") for _ in range(3))
    raw = torch.randn(4, 7, 3 * 8 - 1, device="cuda:1")
    with torch.cuda.device(0), fastflow.backend("triton"):
        got = [*affine_coupling(x, t, r, SCALE_KINDS[0]), *rq_spline(raw[..., 0], raw, 8)]
    want = [*affine_coupling_ref(x, t, r, SCALE_KINDS[0]), *rq_spline_ref(raw[..., 0], raw, 8)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("channels", [6, 12, 48, 96])
@pytest.mark.parametrize("shape", ["image", "vectors"])
def test_actnorm_invconv_kernel_on_cuda(channels, shape):
    size = (2, channels, 31, 9) if shape == "image" else (1000, channels)
    x = torch.randn(size, device="cuda")
    bias, logs = torch.randn(2, 1, channels, 1, 1, device="cuda") * 0.3
    weight = torch.linalg.qr(torch.randn(channels, channels, device="cuda"))[0]
    weight_logdet = torch.zeros((), device="cuda")
    with fastflow.backend("triton"):
        y, logdet = actnorm_invconv(x, bias, logs, weight, weight_logdet)
    pixels = x if shape == "image" else x[:, :, None, None]
    y_ref, logdet_ref = actnorm_invconv_ref(pixels, bias, logs, weight, weight_logdet)
    torch.testing.assert_close(y, y_ref.view_as(y), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logdet, logdet_ref)


@pytest.mark.parametrize("reversible", [False, True])
def test_glow_training_step_on_cuda_matches_eager(reversible):
    torch.manual_seed(0)
    model = Glow(3, 16, levels=2, steps=4, hidden=32).cuda().train()
    x = torch.rand(4, 3, 16, 16, device="cuda") - 0.5
    model.log_prob(x)
    perturb_parameters(model, 0.05)
    loss_eager, grads_eager = loss_and_grads(model, x, "eager", reversible=False)
    loss_fused, grads_fused = loss_and_grads(model, x, "triton", reversible=reversible)
    torch.testing.assert_close(loss_fused, loss_eager, rtol=1e-5, atol=0)
    # Three-way, as for low precision: with TF32 on, both paths' coupling networks compute at a 10-bit mantissa
    # (1.5e-3 relative between them measured on an H200), so each is held to the float64 reference instead: the
    # fused gradients may err at most twice as much as eager's.
    _, grads_exact = loss_and_grads(copy.deepcopy(model).double(), x.double(), "eager", reversible=False)
    g_fused, g_eager, g_exact = (
        torch.cat([g.flatten().double() for g in grads]) for grads in (grads_fused, grads_eager, grads_exact)
    )
    fused_error, eager_error = ((g - g_exact).norm() / g_exact.norm() for g in (g_fused, g_eager))
    assert fused_error <= 2 * eager_error + 1e-4, (float(fused_error), float(eager_error))


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("channels", [12, 48, 200])
def test_channel_mix_is_ieee_float32_with_tf32_on(backend, channels):
    x = torch.randn(2, channels, 17, 9, device="cuda")
    weight = torch.randn(channels, channels, device="cuda") / channels**0.5
    with fastflow.backend(backend):
        y = channel_mix(x, weight)
    y_ref = channel_mix_ref(x.double(), weight.double())
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 1e-6  # TF32 gives ~3e-4


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


@pytest.mark.parametrize("bins", [8, 16])
def test_spline_kernels_on_cuda_match_float64(bins):
    """Fused spline forward, inverse and backward on CUDA: within twice eager float32's error of float64."""
    x = (1.5 * torch.randn(257, 19, device="cuda")).requires_grad_()
    raw = torch.randn(257, 19, 3 * bins - 1, device="cuda", requires_grad=True)
    gy, gl = torch.randn_like(x), torch.randn(257, device="cuda")
    results = []
    for backend, args in (("triton", (x, raw)), ("eager", (x, raw)), ("eager", (x.double(), raw.double()))):
        with fastflow.backend(backend):
            fn = rq_spline if backend == "triton" else rq_spline_ref
            y, logdet = fn(*args, bins)
            grads = torch.autograd.grad((y, logdet), args, (gy.to(y.dtype), gl.to(logdet.dtype)))
        results.append((y, logdet, *grads))
    for fused, eager, exact in zip(*results):
        assert _relative_error(fused, exact) <= 2 * _relative_error(eager, exact) + 1e-6
    y, logdet = results[0][0].detach(), results[0][1].detach()
    with torch.no_grad():
        with fastflow.backend("triton"):
            x_back, neg_logdet = rq_spline_inverse(y, raw, bins)
        with fastflow.backend("eager"):
            x_eager, neg_logdet_eager = rq_spline_inverse(y, raw, bins)
    exact = x.detach().double()
    assert _relative_error(x_back, exact) <= 2 * _relative_error(x_eager, exact) + 1e-6
    assert (
        _relative_error(neg_logdet, -logdet.double()) <= 2 * _relative_error(neg_logdet_eager, -logdet.double()) + 1e-6
    )


def test_compiled_spline_on_cuda_matches_float64():
    """``torch.compile`` of ``rq_spline`` on the eager backend (the closed-form gradients, Inductor's Triton code)
    on CUDA: within twice eager float32's error of float64, plus float32 rounding of the largest value."""
    bins = 8
    x = (1.5 * torch.randn(257, 19, device="cuda")).requires_grad_()
    raw = torch.randn(257, 19, 3 * bins - 1, device="cuda", requires_grad=True)
    gy, gl = torch.randn_like(x), torch.randn(257, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, raw: rq_spline(x, raw, bins), fullgraph=True, dynamic=False)
    results = []
    for fn, args in ((compiled, (x, raw)), (rq_spline_ref, (x, raw)), (rq_spline_ref, (x.double(), raw.double()))):
        with fastflow.backend("eager"):
            y, logdet = fn(*args) if fn is compiled else fn(*args, bins)
            grads = torch.autograd.grad((y, logdet), args, (gy.to(y.dtype), gl.to(logdet.dtype)))
        results.append((y, logdet, *grads))
    for got, eager, exact in zip(*results):
        assert _relative_error(got, exact) <= 2 * _relative_error(eager, exact) + 1e-6


def test_jet_training_step_on_cuda_matches_eager():
    """A small Jet (channel and spatial couplings, the sigmoid2 scale) through the fused kernels, reversible."""
    torch.manual_seed(0)
    model = Jet(3, 16, patch_size=4, couplings=4, width=32, depth=1, heads=2, reversible=True).cuda().train()
    perturb_parameters(model, 0.05)
    x = torch.rand(4, 3, 16, 16, device="cuda") - 0.5
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    loss_eager, grads_eager = loss_and_grads(model, x, "eager", reversible=False)
    loss_fused, grads_fused = loss_and_grads(model, x, "triton", reversible=True)
    torch.testing.assert_close(loss_fused, loss_eager, rtol=1e-5, atol=0)
    g_fused, g_eager = (torch.cat([g.flatten() for g in grads]) for grads in (grads_fused, grads_eager))
    assert ((g_fused - g_eager).norm() / g_eager.norm()).item() < 1e-4


def _perturbed_glow(reversible: bool) -> tuple[Glow, torch.Tensor]:
    torch.manual_seed(0)
    model = Glow(3, 16, levels=1, steps=32, hidden=32, reversible=reversible).cuda().train()
    x = torch.rand(4, 3, 16, 16, device="cuda") - 0.5
    model.log_prob(x)
    perturb_parameters(model, 0.05)
    return model, x


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_reversible_glow_trains_with_tf32_on(backend):
    """32 steps of 12 channels with TF32 on: the drift guard (TF32_MAX_DRIFT) lets the step through and
    the gradients match standard backprop to TF32 precision."""
    model, x = _perturbed_glow(reversible=True)
    loss_rev, grads_rev = loss_and_grads(model, x, backend, reversible=True)
    loss_std, grads_std = loss_and_grads(model, x, backend, reversible=False)
    torch.testing.assert_close(loss_rev, loss_std, rtol=1e-4, atol=0)
    g_rev, g_std = (torch.cat([g.flatten() for g in grads]) for grads in (grads_rev, grads_std))
    assert ((g_rev - g_std).norm() / g_std.norm()).item() < 1e-2


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_glow_inverse_is_exact_to_float32_with_tf32_off(backend):
    """With the coupling networks in IEEE float32 too, 32 steps invert to float32 rounding."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model, x = _perturbed_glow(reversible=False)
    with fastflow.backend(backend), torch.no_grad():
        x_back = model.decode(model.encode(x))
    assert ((x_back - x).abs().max() / x.abs().max()).item() < 1e-4


def test_training_batches_reach_the_gpu_through_pinned_memory_unchanged():
    """The training loop's batches copy to the GPU asynchronously from page-locked memory: the same values and
    dtype as a plain copy (labels too), whatever is queued on the device."""
    from fastflow.train import _to_device

    x, y = torch.rand(64, 3, 32, 32), torch.arange(64)
    busy = torch.randn(4096, 4096, device="cuda")
    busy @ busy  # work queued ahead of the copies
    for t, dtype in ((x, torch.float32), (x, torch.float64), (x, torch.bfloat16), (y, None)):
        got = _to_device(t, torch.device("cuda"), dtype)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), t.to(dtype or t.dtype))
