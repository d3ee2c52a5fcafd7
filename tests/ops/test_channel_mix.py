"""Tests for fastflow/ops/channel_mix.py and kernels/channel_mix.py (kernels under Triton's interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import fastflow.kernels.channel_mix as kernels
import pytest
import torch
import torch.nn.functional as F

import fastflow
from fastflow.ops import _registration
from fastflow.ops import channel_mix as ops
from fastflow.ops.channel_mix import channel_mix, channel_mix_grads, channel_mix_ref

# (dtype, atol, rtol) for kernel vs eager in the same dtype, outputs of order 1
DTYPE_TOL = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float64, 1e-12, 1e-12),
    (torch.float16, 4e-3, 4e-3),
    (torch.bfloat16, 3e-2, 2e-2),
]
CHANNELS = [1, 3, 5, 6, 12, 24, 48, 96]


@pytest.fixture(autouse=True)
def _float32_kernel_at_every_width(monkeypatch):
    """The kernels are under test here: float32 runs them up to KERNEL_MAX_CHANNELS too (by default wider
    float32 mixes go to cuDNN, see test_wide_float32_mixes_go_to_cudnn_half_ones_to_the_kernel)."""
    monkeypatch.setattr(ops, "KERNEL_MAX_CHANNELS_FLOAT32", ops.KERNEL_MAX_CHANNELS)


def _weight(c_out: int, c_in: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights scaled so outputs stay of order 1 for any channel count."""
    return (torch.randn(c_out, c_in, dtype=torch.float64) / c_in**0.5).to(dtype)


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def low_precision_atol(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """atol of the three-way check. bfloat16 gets one ulp at the reference's largest magnitude: Triton's
    interpreter truncates float32 -> bfloat16 casts (a GPU rounds to nearest), up to one ulp per cast."""
    if dtype == torch.float16:
        return 1e-3
    return 2.0 ** (torch.log2(reference.abs().max().double()).floor().item() - 7)


def _interpret(fn, *args):
    with fastflow.backend("interpret"):
        return fn(*args)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOL)
@pytest.mark.parametrize("channels", CHANNELS)
def test_forward_matches_eager(channels, dtype, atol, rtol):
    x = torch.randn(2, channels, 5, 7).to(dtype)
    weight = _weight(channels, channels, _param_dtype(dtype))
    bias = torch.randn(channels, dtype=_param_dtype(dtype))
    y = _interpret(channel_mix, x, weight, bias)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, channel_mix_ref(x, weight, bias), atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", [(1, 12, 1, 1), (1, 5, 3, 1), (1, 24, 1, 9), (3, 6, 17, 9), (1, 48, 33, 31)])
def test_odd_shapes(shape):
    x = torch.randn(shape)
    weight = _weight(shape[1], shape[1])
    torch.testing.assert_close(_interpret(channel_mix, x, weight), channel_mix_ref(x, weight))


@pytest.mark.parametrize("c_in, c_out", [(5, 20), (20, 5), (16, 3), (3, 16), (130, 7)])
def test_rectangular_weight(c_in, c_out):
    """C_in != C_out, including a width above KERNEL_MAX_CHANNELS run through the launcher directly."""
    x = torch.randn(2, c_in, 3, 5)
    weight, bias = _weight(c_out, c_in), torch.randn(c_out)
    out = torch.empty(2, c_out, 3, 5)
    kernels.channel_mix_forward(x, weight, bias, out)
    torch.testing.assert_close(out, channel_mix_ref(x, weight, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_mix_rounds_the_float32_weight_to_the_input_dtype_on_every_path(dtype):
    """Below 16 channels the kernel mixes with multiply-adds; it read the float32 weight unrounded there (a
    1.0004 weight took 1000 to 1000.5 in float16 where eager, the tl.dot path and the docstring round it to 1)."""
    x = torch.full((1, 2, 1, 2), 1000.0, dtype=dtype)
    weight = torch.tensor([[1.0004, 0.0], [0.0, 1.0004]])
    expected = channel_mix_ref(x, weight)
    assert torch.equal(expected, torch.full_like(x, 1000.0))
    assert torch.equal(_interpret(channel_mix, x, weight), expected)
    # the backward's input gradient W^T grad_y rounds the weight too: 1000.5 unrounded
    x = torch.ones(1, 2, 1, 2, dtype=dtype, requires_grad=True)
    grad_y = torch.full((1, 2, 1, 2), 1000.0, dtype=dtype)
    (expected,) = torch.autograd.grad(channel_mix_ref(x, weight), x, grad_y)
    assert torch.equal(expected, torch.full_like(grad_y, 1000.0))
    with fastflow.backend("interpret"):
        (got,) = torch.autograd.grad(channel_mix(x, weight), x, grad_y)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("programs", [1, 3, 40])
@pytest.mark.parametrize("c_in, c_out", [(40, 72), (72, 20), (33, 16), (130, 7)])
def test_backward_rectangular_over_input_channel_blocks(c_in, c_out, programs, monkeypatch):
    """The backward splits input channels into blocks (last one partly masked) and runs ``programs``
    persistent programs per block (40: more than the pixel tiles, so some get none): every block's grad_x
    rows and grad_weight columns, and grad_bias written once per program, match eager."""
    params = kernels._launch_params(c_in, c_out, 63, torch.float32, on_cpu=True, backward=True)
    assert params["CI_BLOCK"] < c_in and c_in % params["CI_BLOCK"] != 0
    monkeypatch.setattr(kernels, "_backward_programs", lambda x, n_tiles, *args: min(programs, 2 * n_tiles))
    x = torch.randn(2, c_in, 7, 9, requires_grad=True)
    weight = _weight(c_out, c_in).requires_grad_()
    bias = torch.randn(c_out, requires_grad=True)
    grad_y = torch.randn(2, c_out, 7, 9)
    monkeypatch.setattr(ops, "KERNEL_MAX_CHANNELS", max(c_in, c_out))  # the kernel runs, whatever the threshold
    monkeypatch.setattr(ops, "KERNEL_MAX_CHANNELS_FLOAT32", max(c_in, c_out))
    with fastflow.backend("interpret"):
        grads = torch.autograd.grad(channel_mix(x, weight, bias), (x, weight, bias), grad_y)
    grads_ref = torch.autograd.grad(channel_mix_ref(x, weight, bias), (x, weight, bias), grad_y)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)


def _layouts(channels: int) -> dict[str, torch.Tensor]:
    big = torch.randn(2, channels + 5, 6, 7)
    return {
        "channel_slice": big[:, 2 : 2 + channels],
        "channels_last": torch.randn(2, channels, 6, 7).to(memory_format=torch.channels_last),
        "channel_slice_of_channels_last": big.to(memory_format=torch.channels_last)[:, 1 : 1 + channels],
        "spatial_crop": big[:, :channels, 1:-1, 2:],
    }


@pytest.mark.parametrize("layout", ["channel_slice", "channels_last", "channel_slice_of_channels_last", "spatial_crop"])
@pytest.mark.parametrize("channels", [3, 24])
def test_layouts_forward_and_backward(layout, channels):
    x = _layouts(channels)[layout].requires_grad_()
    weight = _weight(channels, channels).requires_grad_()
    bias = torch.randn(channels, requires_grad=True)
    grad_y = torch.randn(2, channels, *x.shape[2:])
    with fastflow.backend("interpret"):
        y = channel_mix(x, weight, bias)
        grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    y_ref = channel_mix_ref(x, weight, bias)
    grads_ref = torch.autograd.grad(y_ref, (x, weight, bias), grad_y)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("channels", [1, 3, 6, 24, 96])
def test_backward_matches_eager(channels, with_bias):
    x = torch.randn(2, channels, 5, 7, requires_grad=True)
    weight = _weight(channels, channels).requires_grad_()
    bias = torch.randn(channels, requires_grad=True) if with_bias else None
    inputs = (x, weight) + ((bias,) if with_bias else ())
    with fastflow.backend("interpret"):
        grads = torch.autograd.grad(channel_mix(x, weight, bias).square().sum(), inputs)
    grads_ref = torch.autograd.grad(channel_mix_ref(x, weight, bias).square().sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)


def test_backward_with_broadcast_grad_and_is_deterministic():
    """``y.sum().backward()`` hands the kernel a stride-0 grad; two runs give bitwise-equal gradients."""
    x = torch.randn(3, 24, 9, 11, requires_grad=True)
    weight = _weight(24, 24).requires_grad_()
    runs = []
    for _ in range(2):
        with fastflow.backend("interpret"):
            runs.append(torch.autograd.grad(channel_mix(x, weight).sum(), (x, weight)))
    ref = torch.autograd.grad(channel_mix_ref(x, weight).sum(), (x, weight))
    for g0, g1, g_ref in zip(*runs, ref):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, g_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [6, 24, 96])
def test_low_precision_three_way(channels, dtype):
    """Kernel error vs the float32 reference <= 2x eager's same-dtype error + atol (forward and grads)."""
    x = torch.randn(2, channels, 9, 7).to(dtype)
    weight, bias = _weight(channels, channels), torch.randn(channels)
    grad_y = torch.randn(2, channels, 9, 7).to(dtype)

    def run(fn, inp):
        inp = inp.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        y = fn(inp, w, bias)
        return (y, *torch.autograd.grad(y, (inp, w), grad_y.to(y.dtype)))

    with fastflow.backend("interpret"):
        kernel = run(channel_mix, x)
    eager = run(channel_mix_ref, x)
    reference = run(channel_mix_ref, x.float())
    for name, k, e, r in zip(("y", "grad_x", "grad_weight"), kernel, eager, reference):
        kernel_err = (k.double() - r.double()).abs().max().item()
        eager_err = (e.double() - r.double()).abs().max().item()
        assert kernel_err <= 2 * eager_err + low_precision_atol(r, dtype), (name, kernel_err, eager_err)


@pytest.mark.parametrize("c_in, c_out", [(3, 3), (2, 5)])
def test_gradcheck_float64(c_in, c_out):
    x = torch.randn(1, c_in, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c_out, c_in, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    with fastflow.backend("interpret"):
        assert torch.autograd.gradcheck(channel_mix, (x, weight, bias))
        x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(channel_mix, (x_cl, weight, None))


@pytest.mark.parametrize("channels, channels_last", [(3, False), (20, True)])
def test_opcheck(channels, channels_last):
    """Schema, fake kernel (strides included), autograd registration and AOT dispatch of both custom ops
    (the backward op with inputs that need no grad: it has no double backward)."""
    x = torch.randn(2, channels, 4, 5, requires_grad=True)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    weight = _weight(channels, channels).requires_grad_()
    bias = torch.randn(channels, requires_grad=True)
    with fastflow.backend("interpret"):
        torch.library.opcheck(torch.ops.fastflow.channel_mix.default, (x, weight, bias))
        torch.library.opcheck(
            torch.ops.fastflow.channel_mix_backward.default,
            (torch.randn(2, channels, 4, 5), x.detach(), weight.detach()),
        )


def test_torch_compile_fullgraph():
    def step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.tanh(channel_mix(x * 2.0, weight, bias)) + 1.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 12, 5, 6, requires_grad=True)
    weight = _weight(12, 12).requires_grad_()
    bias = torch.randn(12, requires_grad=True)
    with fastflow.backend("interpret"):
        y = compiled(x, weight, bias)
        grads = torch.autograd.grad(y.sum(), (x, weight, bias))
    with fastflow.backend("eager"):
        y_ref = step(x, weight, bias)
        grads_ref = torch.autograd.grad(y_ref.sum(), (x, weight, bias))
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)


def test_dispatch(monkeypatch):
    """The kernel runs on the interpret backend up to kernel_max_channels(dtype), never on eager."""
    calls = []
    launch = kernels.channel_mix_forward

    def spy(*args, **kwargs):
        calls.append(args[0].shape[1])
        return launch(*args, **kwargs)

    monkeypatch.setattr(kernels, "channel_mix_forward", spy)
    monkeypatch.setattr(ops, "KERNEL_MAX_CHANNELS", 8)
    monkeypatch.setattr(ops, "KERNEL_MAX_CHANNELS_FLOAT32", 100)  # the smaller of the two applies
    x6, x12 = torch.randn(1, 6, 3, 3), torch.randn(1, 12, 3, 3)
    w6, w12 = _weight(6, 6), _weight(12, 12)
    with fastflow.backend("eager"):
        y_eager = channel_mix(x6, w6)
    with fastflow.backend("interpret"):
        y6 = channel_mix(x6, w6)
        y12 = channel_mix(x12, w12)
    assert calls == [6]
    torch.testing.assert_close(y6, y_eager)
    torch.testing.assert_close(y12, channel_mix_ref(x12, w12))


def test_samples_too_large_for_int32_offsets_go_to_eager(monkeypatch):
    """Samples with more elements than the kernels' int32 in-tile offsets address run on cuDNN/ATen."""
    calls = []
    launch = kernels.channel_mix_forward
    monkeypatch.setattr(kernels, "channel_mix_forward", lambda *a, **k: calls.append(1) or launch(*a, **k))
    x, weight = torch.randn(2, 6, 5, 7), _weight(6, 6)
    with fastflow.backend("interpret"):
        channel_mix(x, weight)
        monkeypatch.setattr(ops, "INT32_SAMPLE_LIMIT", 6 * (35 + 1024))  # this sample no longer fits
        y = channel_mix(x, weight)
    assert calls == [1]
    torch.testing.assert_close(y, channel_mix_ref(x, weight))


def test_launcher_copies_an_input_view_that_spans_too_far(monkeypatch):
    """A channel slice of a wide tensor spans more than a dense sample: the launchers copy it once its span
    passes MAX_TILE_SPAN (a dense copy fits), and raise ValueError for an output they cannot copy."""
    big = torch.randn(2, 40, 5, 7)
    x = big[:, ::8]  # 5 channels, channel stride 8 * 35
    weight, grad_y = _weight(5, 5), torch.randn(2, 5, 5, 7)
    block_p = 64  # both launches' BLOCK_P: the image's 35 pixels rounded up to a power of two
    dense_span = kernels._tile_span(x.contiguous().flatten(2), block_p)
    assert kernels._tile_span(x.flatten(2), block_p) > dense_span
    monkeypatch.setattr(kernels, "MAX_TILE_SPAN", dense_span + 1)
    out = torch.empty(2, 5, 5, 7)
    kernels.channel_mix_forward(x, weight, None, out)
    torch.testing.assert_close(out, channel_mix_ref(x, weight), atol=1e-5, rtol=1e-5)
    grad_x, grad_weight, _ = kernels.channel_mix_backward(grad_y, x, weight, torch.empty(2, 5, 5, 7))
    x_ref = x.detach().requires_grad_()
    weight_ref = weight.detach().requires_grad_()
    want = torch.autograd.grad(channel_mix_ref(x_ref, weight_ref), (x_ref, weight_ref), grad_y)
    torch.testing.assert_close(grad_x, want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_weight, want[1], atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="out: the channel-mix kernels address a sample with int32 offsets"):
        kernels.channel_mix_forward(x, weight, None, torch.empty(2, 40, 5, 7)[:, ::8])
    monkeypatch.setattr(kernels, "MAX_TILE_SPAN", dense_span)  # not even a dense copy fits
    with pytest.raises(ValueError, match="x: the channel-mix kernels address a sample with int32 offsets"):
        kernels.channel_mix_forward(x, weight, None, out)


def test_empty_batch():
    x = torch.randn(0, 6, 3, 3, requires_grad=True)
    weight = _weight(6, 6).requires_grad_()
    with fastflow.backend("interpret"):
        y = channel_mix(x, weight)
        grad_x, grad_w = torch.autograd.grad(y.sum(), (x, weight))
    assert y.shape == (0, 6, 3, 3) and grad_x.shape == x.shape
    assert torch.equal(grad_w, torch.zeros_like(grad_w))


@pytest.mark.parametrize(
    "x, weight, bias, error, match",
    [
        (torch.randn(2, 3, 4), torch.randn(3, 3), None, ValueError, "x must"),
        (torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1), None, ValueError, "weight must"),
        (torch.randn(2, 3, 4, 4), torch.randn(3, 4), None, ValueError, "channel mismatch"),
        (torch.randn(2, 3, 4, 4), torch.randn(5, 3), torch.randn(3), ValueError, "bias must"),
        (torch.ones(2, 3, 4, 4, dtype=torch.int64), torch.randn(3, 3), None, TypeError, "x must"),
        (torch.randn(2, 3, 4, 4), torch.ones(3, 3, dtype=torch.int32), None, TypeError, "weight must"),
        (
            torch.randn(2, 3, 4, 4),
            torch.randn(3, 3),
            torch.ones(3, dtype=torch.int64),
            TypeError,
            "bias must",
        ),
        ([[1.0]], torch.randn(3, 3), None, TypeError, "x must"),
    ],
)
def test_bad_inputs(x, weight, bias, error, match):
    with fastflow.backend("interpret"), pytest.raises(error, match=match):
        channel_mix(x, weight, bias)


@pytest.mark.parametrize(
    "grad_y, error, match",
    [
        (torch.randn(2, 5, 4, 4, device="meta"), ValueError, "grad_y must be on cpu like x, got meta"),
        (torch.ones(2, 5, 4, 4, dtype=torch.int64), TypeError, "grad_y must be float16"),
        ([[1.0]], TypeError, "grad_y must be a torch.Tensor"),
    ],
)
def test_bad_upstream_gradients_are_named(grad_y, error, match):
    for backend in ("eager", "interpret"):
        with fastflow.backend(backend), pytest.raises(error, match=match):
            ops.channel_mix_grads(grad_y, torch.randn(2, 3, 4, 4), torch.randn(5, 3))


@pytest.fixture
def as_if_tf32_applied(monkeypatch):
    """CPU tensors take the path of CUDA ones (the IEEE op), whose TF32 handling is under test."""
    monkeypatch.setattr(ops, "tf32_applies", lambda x: True)


@pytest.mark.usefixtures("as_if_tf32_applied")
def test_eager_mix_runs_with_tf32_off_whatever_the_flags_say(monkeypatch):
    """The IEEE mix (the eager twin's path on CUDA tensors, checked here on CPU ones) runs its products,
    forward and backward, with both TF32 flags off and leaves them as it found them."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check_mix_flags(monkeypatch)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _check_mix_flags(monkeypatch):
    """The flags each product of the mix runs under: its convolution on accelerators, its matrix products
    (:func:`pixel_matmul`) on CPU tensors."""
    seen = []

    def recording(run):
        def recorded(*args, **kwargs):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return run(*args, **kwargs)

        return recorded

    monkeypatch.setattr(ops.F, "conv2d", recording(torch.nn.functional.conv2d))
    monkeypatch.setattr(ops, "pixel_matmul", recording(ops.pixel_matmul))
    x, weight = torch.randn(2, 5, 3, 4, requires_grad=True), _weight(5, 5).requires_grad_(True)
    y = ops._ieee_mix(x, weight, torch.randn(5))
    torch.autograd.grad(y.square().sum(), (x, weight))
    assert len(seen) >= 2 and all(flags == (False, False) for flags in seen)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_eager_mix_gradcheck_and_opcheck():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(channel_mix_ref, (x, weight, bias))
    assert torch.autograd.gradgradcheck(channel_mix_ref, (x, weight, bias))
    torch.library.opcheck(torch.ops.fastflow.conv1x1_ieee.default, (x, weight, bias))
    x_cl = x.detach().to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastflow.conv1x1_ieee.default, (x_cl, weight.detach(), None))
    grad_y = torch.randn(2, 4, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fastflow.conv1x1_ieee_grad_weight.default, (grad_y, x))


def _compiled_mix_ops(shape: tuple[int, int, int, int] = (2, 3, 4, 4)) -> set[str]:
    """The ops in the forward and backward graphs of a compiled ``tanh(channel_mix_ref(x, weight))`` of ``x``
    ``shape`` and a square weight, whose gradients must equal eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    def step(x, weight):
        return torch.tanh(channel_mix_ref(x, weight))

    compiled = torch.compile(step, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    x, weight = torch.randn(shape, requires_grad=True), _weight(shape[1], shape[1]).requires_grad_()
    grads = torch.autograd.grad(compiled(x, weight).sum(), (x, weight))
    grads_ref = torch.autograd.grad(step(x, weight).sum(), (x, weight))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    return {str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"}


@pytest.mark.usefixtures("as_if_tf32_applied")
def test_compiled_eager_mix_keeps_both_directions_ieee():
    """Under torch.compile the eager mix stays the IEEE ops in forward and backward where TF32 applies: a traced
    matmul for the weight gradient would follow the TF32 flags."""
    ops_used = _compiled_mix_ops()
    assert {"fastflow.conv1x1_ieee.default", "fastflow.conv1x1_ieee_grad_weight.default"} <= ops_used
    assert not {op for op in ops_used if "mm" in op or ("conv" in op and "ieee" not in op)}, ops_used


@pytest.mark.parametrize("shape, products", [((2, 3, 4, 4), False), ((8, 48, 32, 32), True)])
def test_compiled_cpu_mix_traces_plain_aten_ops(shape, products):
    """On CPU tensors (no TF32) torch.compile sees the mix's own ATen ops, not the IEEE op's wrapper: a small mix
    (:func:`compiles_as_pixel_sum`) as a broadcast product summed over the input channels, which Inductor fuses
    with its neighbours (no ``bmm`` either way), a large one as matrix products."""
    x = torch.empty(shape)
    assert ops.compiles_as_pixel_sum(x, torch.empty(shape[1], shape[1])) is not products
    ops_used = _compiled_mix_ops(shape)
    assert not {op for op in ops_used if "ieee" in op}, ops_used
    assert any("bmm" in op for op in ops_used) is products, ops_used
    assert any("sum" in op for op in ops_used), ops_used


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_pixel_sum_equals_the_matrix_product_mix(layout, with_bias):
    """:func:`pixel_sum` (compiled CPU code's small mix) equals :func:`pixel_matmul`, values and float64 gradients,
    for NCHW, channels_last and channel-slice inputs, odd sizes, batch 1 and a rectangular weight; half-precision
    input is summed in float32 (the result is the float32 mix rounded once, to an ulp)."""
    torch.manual_seed(0)
    base = torch.randn(1, 10, 3, 5, dtype=torch.float64)
    x = base[:, 2:7] if layout == "channel_slice" else base[:, :5]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_()
    weight = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = ops.pixel_sum(x, weight, bias)
    torch.testing.assert_close(out, ops.pixel_matmul(x, weight, bias))
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    inputs = (x, weight) if bias is None else (x, weight, bias)
    assert torch.autograd.gradcheck(lambda *a: ops.pixel_sum(*a), inputs)
    x16, w16 = x.detach().to(torch.bfloat16), weight.detach().to(torch.bfloat16)
    b16 = None if bias is None else bias.detach().to(torch.bfloat16)
    want = ops.pixel_matmul(x16.float(), w16.float(), None if b16 is None else b16.float()).to(torch.bfloat16)
    got = ops.pixel_sum(x16, w16, b16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=0)  # one rounding: at most an ulp


def test_registration_is_traceable_only_where_compiled_kernels_run(monkeypatch):
    """``triton_op`` where torch has it, Triton compiles its kernels and torch is built with CUDA; the
    ``custom_op`` fallback everywhere else (here: the interpreter)."""
    assert not _registration.TRACEABLE
    registered = []

    def recorder(kind):
        return lambda name, **options: lambda fn: registered.append((kind, name, fn.__annotations__["return"]))

    def op(x: torch.Tensor) -> list[torch.Tensor]:  # torch < 2.7 refused this spelling: it is rewritten
        return [x]

    monkeypatch.setattr(torch.library, "custom_op", recorder("custom_op"))
    define, launch = _registration.registration(False)
    define("test::op", mutates_args=())(op)
    assert launch == {} and registered.pop() == ("custom_op", "test::op", typing.List[torch.Tensor])  # noqa: UP006
    monkeypatch.setattr(_registration, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_registration, "triton_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    if hasattr(torch.library, "triton_op"):
        assert _registration.kernels_traceable()
        monkeypatch.setattr(torch.library, "triton_op", recorder("triton_op"))
        define, launch = _registration.registration(True)
        define("test::op", mutates_args=())(op)
        assert registered.pop()[0] == "triton_op" and launch == {"wrap_triton": torch.library.wrap_triton}
        monkeypatch.delattr(torch.library, "triton_op")  # torch < 2.6
    assert not _registration.kernels_traceable()


TRITON_OP_CHECK = """
import torch
from functorch.compile import make_boxed_func
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._library.triton import get_triton_kernels_for_op
from torch._subclasses.fake_tensor import FakeTensorMode

from fastflow.kernels import channel_mix as K
from fastflow.ops import channel_mix as M

traced = M._define_ops("fastflow_traced", traceable=True)
fallback = M._define_ops("fastflow_fallback", traceable=False)
for name, kernel in (("channel_mix", K.channel_mix_fwd_kernel), ("channel_mix_backward", K.channel_mix_bwd_kernel)):
    assert get_triton_kernels_for_op(f"fastflow_traced::{name}") == [kernel], name
    traced_schema = str(getattr(torch.ops.fastflow_traced, name).default._schema)
    fallback_schema = str(getattr(torch.ops.fastflow_fallback, name).default._schema)
    assert traced_schema.replace("fastflow_traced", "fastflow_fallback") == fallback_schema


def kernels_in(graph):
    # the side table keeps each launch as an Autotuner over the launch options, around the kernel
    return [
        kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn
        for node in graph.graph.nodes
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target)
    ]


def run(ops, x, weight, bias):
    return torch.tanh(ops.mix(x * 2.0, weight, bias))


for channels_last in (False, True):
    graphs = []

    def keep(graph, example_inputs):
        graphs.append(graph)
        return make_boxed_func(graph)

    with FakeTensorMode():
        x = torch.randn(2, 12, 5, 6)
        x = x.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format).requires_grad_()
        weight, bias = torch.randn(12, 12, requires_grad=True), torch.randn(12, requires_grad=True)
        y = aot_function(lambda *a: run(traced, *a), fw_compiler=keep, bw_compiler=keep)(x, weight, bias)
        traced_out = [y, *torch.autograd.grad(y.sum(), (x, weight, bias))]
        y = run(fallback, x, weight, bias)
        fallback_out = [y, *torch.autograd.grad(y.sum(), (x, weight, bias))]
    for a, b in zip(traced_out, fallback_out):
        assert (a.shape, a.dtype) == (b.shape, b.dtype), channels_last
    assert traced_out[0].stride() == fallback_out[0].stride(), channels_last
    forward, backward = graphs
    assert kernels_in(forward) == [K.channel_mix_fwd_kernel], forward.code
    assert kernels_in(backward) == [K.channel_mix_bwd_kernel], backward.code
    for graph in graphs:
        assert "fastflow" not in graph.code, graph.code
print("traced")
"""


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="needs torch >= 2.6")
def test_triton_op_registration_is_traced_into_kernel_launches():
    """The ``triton_op`` registration (built here in a fresh interpreter with TRITON_INTERPRET=0, no GPU
    needed): torch finds its kernels (compile caches key on them), AOTAutograd traces forward and backward into
    the kernel launches (no opaque op left), with the schemas, shapes and strides of the ``custom_op``
    fallback."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", TRITON_OP_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "traced" in proc.stdout, proc.stderr[-4000:]


def test_wide_float32_mixes_go_to_cudnn_half_ones_to_the_kernel(monkeypatch):
    """float32 runs the kernel only up to KERNEL_MAX_CHANNELS_FLOAT32 (its IEEE FMA loop loses to cuDNN
    above); bfloat16 up to KERNEL_MAX_CHANNELS."""
    monkeypatch.setattr(ops, "KERNEL_MAX_CHANNELS_FLOAT32", 8)
    calls = []
    launch = kernels.channel_mix_forward
    monkeypatch.setattr(kernels, "channel_mix_forward", lambda *a, **k: calls.append(a[0].dtype) or launch(*a, **k))
    with fastflow.backend("interpret"):
        channel_mix(torch.randn(1, 8, 3, 3), _weight(8, 8))
        channel_mix(torch.randn(1, 12, 3, 3), _weight(12, 12))
        channel_mix(torch.randn(1, 12, 3, 3, dtype=torch.bfloat16), _weight(12, 12))
    assert calls == [torch.float32, torch.bfloat16]


def test_eager_mix_of_vectors_is_a_matmul_with_the_convolution_s_values_and_gradients():
    """``(B, C, 1, 1)`` inputs (vectors) take ``F.linear``: same values and gradients as the 1x1 convolution."""
    x = torch.randn(5, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = channel_mix_ref(x, weight, bias)
    want = F.conv2d(x, weight[:, :, None, None], bias)
    assert y.shape == want.shape and y.stride() == want.stride()
    torch.testing.assert_close(y, want)
    grads = torch.autograd.grad(y.square().sum(), (x, weight, bias))
    for g, g_want in zip(grads, torch.autograd.grad(want.square().sum(), (x, weight, bias))):
        torch.testing.assert_close(g, g_want)
    assert torch.autograd.gradgradcheck(channel_mix_ref, (x, weight, bias))


def test_cpu_eager_mix_is_the_plain_aten_op_and_equals_the_ieee_op():
    """On CPU tensors (no TF32 there) the eager mix skips the IEEE op's wrapper: same values and gradients."""
    for shape in ((4, 6, 1, 1), (2, 6, 3, 5)):
        x, weight, bias = torch.randn(*shape), _weight(6, 6), torch.randn(6)
        results = []
        for mix in (channel_mix_ref, ops._ieee_mix):
            leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
            y = mix(*leaves)
            results.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
            if mix is channel_mix_ref:
                assert "Direct" not in type(y.grad_fn).__name__, type(y.grad_fn).__name__
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["eager", "interpret"])
@pytest.mark.parametrize("c_in, c_out", [(3, 3), (5, 7)])
def test_channel_mix_grads_are_the_autograd_gradients(backend, c_in, c_out):
    """``channel_mix_grads`` (closed form, no autograd) equals autograd's gradients of the mix, on both paths."""
    torch.manual_seed(0)
    x = torch.randn(2, c_in, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = _weight(c_out, c_in, torch.float64).requires_grad_(True)
    bias = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, c_out, 5, 3, dtype=torch.float64)
    with fastflow.backend(backend):
        channel_mix(x, weight, bias).backward(grad_y)
        got = ops.channel_mix_grads(grad_y, x.detach(), weight.detach())
    for g, want in zip(got, (x.grad, weight.grad, bias.grad), strict=True):
        torch.testing.assert_close(g, want, atol=1e-12, rtol=1e-12)
    if backend == "eager":  # the twin, also without the bias gradient: the same two gradients, no sum
        *without, none = ops.channel_mix_grads_ref(grad_y, x.detach(), weight.detach(), bias_grad=False)
        assert none is None
        for g, want in zip(without, got, strict=False):
            assert torch.equal(g, want)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        ops.channel_mix_grads(grad_y[:, :1], x.detach(), weight.detach())


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice", "few_pixels"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_pixel_matmul_equals_the_1x1_convolution(layout, with_bias):
    """The CPU's matrix-product mix equals ``conv2d`` with a 1x1 filter, values and float64 gradients, for NCHW,
    channels_last (whose layout the output keeps), channel-slice inputs and NCHW inputs of fewer pixels than an
    eighth of their channels (the rows product), odd sizes and batch 1."""
    torch.manual_seed(0)
    c_in, c_out = (16, 3) if layout == "few_pixels" else (5, 3)
    size = (1, 2) if layout == "few_pixels" else (3, 7)
    base = torch.randn(1, 2 * c_in if layout == "channel_slice" else c_in, *size, dtype=torch.float64)
    x = base[:, 1 : 1 + c_in] if layout == "channel_slice" else base
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.requires_grad_()
    weight = torch.randn(c_out, c_in, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(c_out, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = ops.pixel_matmul(x, weight, bias)
    torch.testing.assert_close(out, F.conv2d(x, weight[:, :, None, None], bias), atol=1e-13, rtol=1e-13)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert out.is_contiguous() == (layout != "channels_last")
    inputs = (x, weight) if bias is None else (x, weight, bias)
    assert torch.autograd.gradcheck(lambda *a: ops.pixel_matmul(*a), inputs)


def test_eager_cpu_mix_runs_as_matrix_products_not_a_convolution(monkeypatch):
    """On CPU tensors the eager mix, directly and through the op ``fastflow::conv1x1_ieee`` (what
    ``torch.compile`` sees), is :func:`pixel_matmul`, not oneDNN's 1x1 convolution (several times slower there at
    flow channel counts)."""
    calls = []

    def recorded(*args):
        calls.append(args[0].shape)
        return pixel_matmul(*args)

    pixel_matmul = ops.pixel_matmul
    monkeypatch.setattr(ops, "pixel_matmul", recorded)
    monkeypatch.setattr(F, "conv2d", None)  # a convolution would raise
    x, weight = torch.randn(2, 6, 4, 4), torch.randn(6, 6)
    torch.testing.assert_close(channel_mix_ref(x, weight), pixel_matmul(x, weight))
    torch.testing.assert_close(torch.ops.fastflow.conv1x1_ieee(x, weight, None), pixel_matmul(x, weight))
    assert calls == [x.shape, x.shape]


def test_no_input_channels_still_give_the_bias_its_gradient(target):
    """With ``C_in = 0`` the output is the bias at every pixel: its gradient is ``grad_y`` summed, as eager's."""
    backend, device = target
    x, weight = torch.randn(2, 0, 2, 3, device=device), torch.randn(3, 0, device=device)
    grad_y = torch.randn(2, 3, 2, 3, device=device)
    grads = {}
    for name in ("eager", backend):
        bias = torch.randn(3, device=device, requires_grad=True)
        with fastflow.backend(name):
            channel_mix(x, weight, bias).backward(grad_y)
            grads[name] = (bias.grad, channel_mix_grads(grad_y, x, weight)[2])
    for got, want in zip(grads[backend], grads["eager"]):
        torch.testing.assert_close(got.float(), want.float())
        torch.testing.assert_close(want.float(), grad_y.sum((0, 2, 3)))
