"""Tests for fastflow/ops/actnorm_invconv.py: the fold, its inverse, log-dets and gradients."""

from __future__ import annotations

import pytest
import torch

import fastflow
from fastflow.ops import channel_mix as channel_mix_ops
from fastflow.ops.actnorm_invconv import (
    FoldedMix,
    actnorm_invconv,
    actnorm_invconv_inverse,
    actnorm_invconv_inverse_ref,
    actnorm_invconv_ref,
    fold_actnorm,
    fold_actnorm_inverse,
)
from fastflow.ops.invconv import lu_inverse_weight, lu_weight_and_logdet

BACKENDS = ["eager", "interpret"]


@pytest.fixture(autouse=True)
def _float32_kernel_at_every_width(monkeypatch):
    """The kernels are under test: float32 runs them up to KERNEL_MAX_CHANNELS too (by default wider float32
    mixes take the eager convolution, and an "interpret" case wider than 8 channels compared eager with eager)."""
    monkeypatch.setattr(channel_mix_ops, "KERNEL_MAX_CHANNELS_FLOAT32", channel_mix_ops.KERNEL_MAX_CHANNELS)


@pytest.fixture
def mix_launches(monkeypatch) -> list[str]:
    """The names of the channel-mix kernel launchers called during the test, in order."""
    import fastflow.kernels.channel_mix as kernels

    calls: list[str] = []

    def counting(name: str):
        launch = getattr(kernels, name)

        def counted(*args, **kwargs):
            calls.append(name)
            return launch(*args, **kwargs)

        return counted

    for name in ("channel_mix_forward", "channel_mix_backward"):
        monkeypatch.setattr(kernels, name, counting(name))
    return calls


def _params(channels: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """ActNorm parameters and an LU-parameterised 1x1 weight with its inverse and log|det|."""
    g = torch.Generator().manual_seed(channels)
    lu = {
        "perm": torch.randperm(channels, generator=g),
        "lower": 0.3 * torch.randn(channels, channels, generator=g, dtype=torch.float64),
        "upper": 0.3 * torch.randn(channels, channels, generator=g, dtype=torch.float64),
        "sign_s": torch.where(torch.rand(channels, generator=g) < 0.5, -1.0, 1.0).double(),
        "log_s": 0.1 * torch.randn(channels, generator=g, dtype=torch.float64),
    }
    weight, weight_logdet = lu_weight_and_logdet(**lu)
    return {
        "bias": torch.randn(1, channels, 1, 1, generator=g, dtype=torch.float64).to(dtype),
        "logs": (0.2 * torch.randn(1, channels, 1, 1, generator=g, dtype=torch.float64)).to(dtype),
        "weight": weight.to(dtype),
        "weight_inverse": lu_inverse_weight(**lu).to(dtype),
        "weight_logdet": weight_logdet.to(dtype),
    }


def _forward(fn, x, p):
    return fn(x, p["bias"], p["logs"], p["weight"], p["weight_logdet"])


def _inverse(fn, y, p):
    return fn(y, p["bias"], p["logs"], p["weight_inverse"], p["weight_logdet"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [3, 6, 12, 48])
def test_fold_matches_actnorm_then_conv(channels, backend, mix_launches):
    p = _params(channels)
    x = torch.randn(2, channels, 5, 7)
    with fastflow.backend(backend):
        y, logdet = _forward(actnorm_invconv, x, p)
    assert mix_launches == (["channel_mix_forward"] if backend == "interpret" else [])
    y_ref, logdet_ref = _forward(actnorm_invconv_ref, x, p)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref)
    assert logdet.shape == (2,) and logdet.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels", [3, 24])
def test_inverse_of_forward(channels, backend, mix_launches):
    p = _params(channels)
    x = torch.randn(2, channels, 6, 5).to(memory_format=torch.channels_last)
    with fastflow.backend(backend):
        y, logdet = _forward(actnorm_invconv, x, p)
        x_back, inverse_logdet = _inverse(actnorm_invconv_inverse, y, p)
    assert mix_launches == (["channel_mix_forward"] * 2 if backend == "interpret" else [])
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_logdet, -logdet)
    x_ref, inverse_logdet_ref = _inverse(actnorm_invconv_inverse_ref, y, p)
    torch.testing.assert_close(x_back, x_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inverse_logdet, inverse_logdet_ref)


def test_logdet_matches_jacobian():
    """Brute force: log|det| of the float64 Jacobian of the whole (C*H*W) map equals the op's log-det."""
    p = _params(3, torch.float64)
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    with fastflow.backend("interpret"):
        jac = torch.autograd.functional.jacobian(lambda t: _forward(actnorm_invconv, t, p)[0], x)
        _, logdet = _forward(actnorm_invconv, x, p)
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac.reshape(12, 12))[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [6, 24])
def test_low_precision_three_way(channels, dtype):
    """Fused error vs the float32 reference <= 2x the same-dtype ActNorm-then-conv error + atol."""
    p = _params(channels)
    x = torch.randn(2, channels, 9, 7).to(dtype)
    with fastflow.backend("interpret"):
        y, logdet = _forward(actnorm_invconv, x, p)
    y_eager, _ = _forward(actnorm_invconv_ref, x, p)
    y_ref, logdet_ref = _forward(lambda *a: actnorm_invconv_ref(*a, upcast=True), x, p)
    assert y.dtype == dtype and logdet.dtype == torch.float32
    torch.testing.assert_close(logdet, logdet_ref)
    # bfloat16: one ulp at the largest magnitude, for the interpreter's truncating float32 -> bfloat16 casts
    atol = 1e-3 if dtype == torch.float16 else 2.0 ** (torch.log2(y_ref.abs().max()).floor().item() - 7)
    kernel_err = (y.double() - y_ref.double()).abs().max().item()
    eager_err = (y_eager.double() - y_ref.double()).abs().max().item()
    assert kernel_err <= 2 * eager_err + atol, (kernel_err, eager_err)


def test_gradcheck_float64():
    """Gradients reach x, bias, logs, weight and weight_logdet, forward and inverse."""
    p = _params(3, torch.float64)
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    names = ["bias", "logs", "weight", "weight_logdet"]
    leaves = [p[n].clone().requires_grad_() for n in names]
    inverse_leaves = [leaves[0], leaves[1], p["weight_inverse"].clone().requires_grad_(), leaves[3]]
    with fastflow.backend("interpret"):
        assert torch.autograd.gradcheck(lambda *a: actnorm_invconv(*a), (x, *leaves))
        assert torch.autograd.gradcheck(lambda *a: actnorm_invconv_inverse(*a), (x, *inverse_leaves))


@pytest.mark.parametrize("channels", [6, 24])
def test_grads_match_reference(channels, mix_launches):
    p = _params(channels)
    x = torch.randn(2, channels, 5, 7, requires_grad=True)
    leaves = [p[n].clone().requires_grad_() for n in ("bias", "logs", "weight", "weight_logdet")]

    def loss(fn):
        y, logdet = fn(x, *leaves)
        return y.square().sum() + logdet.sum()

    with fastflow.backend("interpret"):
        grads = torch.autograd.grad(loss(actnorm_invconv), (x, *leaves))
    assert mix_launches == ["channel_mix_forward", "channel_mix_backward"]
    grads_ref = torch.autograd.grad(loss(actnorm_invconv_ref), (x, *leaves))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_batched_fold_gives_each_step_the_fold_it_makes_alone():
    """fold_actnorm / fold_actnorm_inverse over K stacked steps: the ops given a step's share of the batched
    fold return what they return folding by themselves; the eager backend does not fold and ignores it."""
    steps, channels = 3, 5
    bias, logs = torch.randn(steps, 1, channels, 1, 1), 0.2 * torch.randn(steps, 1, channels, 1, 1)
    weight = torch.randn(steps, channels, channels)
    weight_inverse, weight_logdet = torch.randn(steps, channels, channels), torch.randn(steps)
    folds = fold_actnorm(bias.reshape(steps, -1), logs.reshape(steps, -1), weight, weight_logdet)
    inverse_folds = fold_actnorm_inverse(
        bias.reshape(steps, -1), logs.reshape(steps, -1), weight_inverse, weight_logdet
    )
    x = torch.randn(2, channels, 3, 4)
    for k in range(steps):
        forward = (x, bias[k], logs[k], weight[k], weight_logdet[k])
        inverse = (x, bias[k], logs[k], weight_inverse[k], weight_logdet[k])
        with fastflow.backend("interpret"):
            for fn, args, fold in (
                (actnorm_invconv, forward, folds),
                (actnorm_invconv_inverse, inverse, inverse_folds),
            ):
                given = fn(*args, FoldedMix(*(t[k] for t in fold)))
                for a, b in zip(given, fn(*args)):
                    torch.testing.assert_close(a, b, atol=0, rtol=0)
        other_step = FoldedMix(*(t[k - 1] for t in folds))
        with fastflow.backend("eager"):
            for a, b in zip(actnorm_invconv(*forward, other_step), actnorm_invconv_ref(*forward)):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_equal_their_pixel_view_forward_inverse_and_gradients(backend):
    """``(B, C)`` vectors (one ``linear`` on the CPU) give the values and gradients of ``(B, C, 1, 1)`` pixels."""
    p = {k: v.double().requires_grad_() for k, v in _params(6).items()}
    x = torch.randn(6, 5, dtype=torch.float64).t()  # non-contiguous rows
    with fastflow.backend(backend):
        for fn, weight in ((actnorm_invconv, "weight"), (actnorm_invconv_inverse, "weight_inverse")):
            empty, empty_logdet = fn(x[:0], p["bias"], p["logs"], p[weight], p["weight_logdet"])
            assert empty.shape == (0, 6) and empty_logdet.shape == (0,)
            args = (p["bias"], p["logs"], p[weight], p["weight_logdet"])
            y_vec, ld_vec = fn(x, *args)
            y_pix, ld_pix = fn(x[:, :, None, None], *args)
            assert y_vec.shape == x.shape and ld_vec.shape == (5,)
            torch.testing.assert_close(y_vec, y_pix.view_as(x), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(ld_vec, ld_pix, rtol=1e-12, atol=1e-12)
            upstream = torch.randn_like(x)
            leaves = [p["bias"], p["logs"], p[weight], p["weight_logdet"]]
            got = torch.autograd.grad((y_vec * upstream).sum() + ld_vec.sum(), leaves)
            want = torch.autograd.grad((y_pix.view_as(x) * upstream).sum() + ld_pix.sum(), leaves)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_vectors_reach_the_kernel_as_the_pixels_of_one_image(monkeypatch):
    """As ``(B, C, 1, 1)`` every kernel program took one sample (15/16 of its pixel tile masked) and loaded the
    whole weight per sample; as ``(1, C, B, 1)`` (views both ways) the programs take full tiles of samples."""
    import fastflow.ops.actnorm_invconv as module

    seen, mix = [], module.channel_mix
    monkeypatch.setattr(module, "channel_mix", lambda x, *args: seen.append(tuple(x.shape)) or mix(x, *args))
    p = _params(5)
    x = torch.randn(37, 5)
    with fastflow.backend("interpret"):
        y, _ = _forward(actnorm_invconv, x, p)
    assert seen == [(1, 5, 37, 1)] and y.shape == (37, 5) and y.is_contiguous()
    torch.testing.assert_close(y, _forward(actnorm_invconv_ref, x[:, :, None, None], p)[0].flatten(1))


def test_float64_logdet_dtype():
    p = _params(3, torch.float64)
    _, logdet = _forward(actnorm_invconv, torch.randn(2, 3, 2, 2, dtype=torch.float64), p)
    assert logdet.dtype == torch.float64


def test_vectors_torch_compile_fullgraph():
    p = _params(5)
    compiled = torch.compile(lambda x: _forward(actnorm_invconv, x, p), fullgraph=True, backend="aot_eager")
    x = torch.randn(7, 5)
    y, logdet = compiled(x)
    y_ref, logdet_ref = _forward(actnorm_invconv_ref, x[:, :, None, None], p)
    torch.testing.assert_close(y, y_ref.flatten(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref)


def test_torch_compile_fullgraph():
    p = _params(12)
    compiled = torch.compile(lambda x: _forward(actnorm_invconv, x, p), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 12, 4, 5)
    with fastflow.backend("interpret"):
        y, logdet = compiled(x)
    y_ref, logdet_ref = _forward(actnorm_invconv_ref, x, p)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref)


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("x", torch.randn(2, 3, 4), ValueError, "x must"),
        ("x", torch.randn(2, 3, 4, 4, 1), ValueError, "x must"),
        ("x", torch.ones(2, 3, 4, 4, dtype=torch.int64), TypeError, "x must"),
        ("bias", torch.randn(3), ValueError, "bias must"),
        ("logs", torch.randn(1, 4, 1, 1), ValueError, "logs must"),
        ("weight", torch.randn(4, 3), ValueError, "channel mismatch"),
        ("weight", torch.ones(3, 3, dtype=torch.int32), TypeError, "weight must"),
        ("weight_logdet", torch.randn(3), ValueError, "weight_logdet must"),
        ("weight", torch.eye(3, device="meta"), ValueError, "weight must be on cpu like x, got meta"),
        ("bias", torch.zeros(1, 3, 1, 1, device="meta"), ValueError, "bias must be on cpu like x"),
        ("weight_logdet", torch.zeros((), device="meta"), ValueError, "weight_logdet must be on cpu like x"),
    ],
)
def test_bad_inputs(field, value, error, match):
    args = {"x": torch.randn(2, 3, 4, 4), **_params(3)}
    args[field] = value
    with pytest.raises(error, match=match):
        actnorm_invconv(args["x"], args["bias"], args["logs"], args["weight"], args["weight_logdet"])


def test_bad_inverse_inputs_name_the_argument():
    p = _params(3)
    with pytest.raises(ValueError, match="weight_inverse"):
        actnorm_invconv_inverse(torch.randn(2, 3, 4, 4), p["bias"], p["logs"], torch.randn(2, 2), p["weight_logdet"])
    with pytest.raises(ValueError, match="y must"):
        actnorm_invconv_inverse(torch.randn(3, 4, 4), p["bias"], p["logs"], p["weight_inverse"], p["weight_logdet"])
