"""Per-pixel channel mix ``y[b, :, h, w] = weight @ x[b, :, h, w] + bias`` (a 1x1 convolution).

Backward: ``grad_x = weight^T @ grad_y`` per pixel, ``grad_weight = sum_{b,h,w} grad_y x^T``,
``grad_bias = sum_{b,h,w} grad_y``.

:func:`channel_mix` dispatches on :func:`fastflow.backend.resolve_backend` (traceable by ``torch.compile``):
on ``"eager"``, for more than :func:`kernel_max_channels` channels and for samples of 2^31 elements or more
it is :func:`channel_mix_ref` (cuDNN; on the CPU :func:`pixel_matmul`; ATen autograd); on ``"triton"`` /
``"interpret"`` it is the torch.library op ``fastflow::channel_mix`` running the Triton kernels of
:mod:`fastflow.kernels.channel_mix`, with autograd registered, whose backward is the op
``fastflow::channel_mix_backward``. The fused path is not
differentiable twice (no double backward).

Registration (:data:`fastflow.ops._registration.TRACEABLE`): on torch >= 2.6 built with CUDA, with compiled
kernels, both ops are ``torch.library.triton_op`` ops launching through ``torch.library.wrap_triton``, so
``torch.compile`` traces into them and Inductor fuses the neighbouring ops around the kernels; otherwise
(older torch, a CPU build, the interpreter) they are opaque ``torch.library.custom_op`` ops with fake kernels.
``torch.compile(fullgraph=True)`` traces either without a graph break. On CPU tensors (the interpreter)
Inductor could not compile a user Triton kernel, so there the opaque op runs it as it runs eagerly.

Precision: float32 mixes are IEEE float32 on every path, whatever ``torch.backends.cudnn.allow_tf32`` /
``torch.backends.cuda.matmul.allow_tf32`` say (the kernels' float32 path is an FMA loop, not ``tl.dot``, and
wider float32 mixes go to the eager path, which runs its convolution with TF32 off). Every caller is an
invertible mix (the 1x1 convolution and its ActNorm fold), and TF32 would break invertibility: the reversible
backward's drift guard fires under it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastflow.backend import functorch_transforms_active, resolve_backend
from fastflow.ops._checks import cast, check_float_tensor, check_same_device, logdet_dtype
from fastflow.ops._registration import TRACEABLE, direct_autograd, kernel_function, registration, use_library_op

__all__ = [
    "KERNEL_MAX_CHANNELS",
    "KERNEL_MAX_CHANNELS_FLOAT32",
    "PIXEL_SUM_MAX_PRODUCTS",
    "channel_mix",
    "channel_mix_grads",
    "channel_mix_grads_ref",
    "channel_mix_ref",
    "compiles_as_pixel_sum",
    "ieee_float32",
    "kernel_max_channels",
    "pixel_matmul",
    "pixel_sum",
    "tf32_applies",
]

KERNEL_MAX_CHANNELS = 128
"""Largest channel count (``max(C_in, C_out)``) for which the Triton backends run the fused kernel on
float16 / bfloat16 (tensor cores) and float64; above it they call :func:`channel_mix_ref` (cuDNN). 128 is
the widest padded width whose launches ``tests/kernels/aot_compile.py`` checks to compile for sm_80 / sm_90
without spilling; on an H100 (2026-11-25, before the float32 path became IEEE) the kernel beat eager from
128x128 pixels up and lost below, where both are host-bound (``benchmarks/results/``). ``python -m
benchmarks --cases actnorm_invconv`` prints the threshold a run supports."""

KERNEL_MAX_CHANNELS_FLOAT32 = 8
"""The same threshold for float32, which must be IEEE (no TF32) and so runs on the kernels' FMA loop: on an
H100 (2026-11-25) that loop against cuDNN's IEEE 1x1 convolution, at 256x256: forward 1.67x at 12 channels
but 0.76x at 48 and 0.39x at 128, forward+backward 0.82x, 0.39x and 0.09x. Up to 8 channels (no tensor-core
tile to miss) the kernel runs; wider float32 mixes go to cuDNN with TF32 off."""


PIXEL_SUM_MAX_PRODUCTS = 2**21
"""Most multiply-adds (``B H W C_in C_out``) of a mix that compiled CPU code runs as :func:`pixel_sum` rather than
:func:`pixel_matmul` (:func:`compiles_as_pixel_sum`). Small mixes gain from Inductor fusing the sum with its
neighbours (the compiled Glow reference step's 24 forward and 48 backward ``bmm`` launches go, its mixes all
below 3e5 products); large ones lose to ``bmm``: ``python -m benchmarks --cases pixel_mix`` (compiled
forward+backward of the mix alone, side by side)."""


def kernel_max_channels(dtype: torch.dtype) -> int:
    """The widest mix (``max(C_in, C_out)``) the fused kernel takes in ``dtype``."""
    if dtype == torch.float32:
        return min(KERNEL_MAX_CHANNELS, KERNEL_MAX_CHANNELS_FLOAT32)
    return KERNEL_MAX_CHANNELS


def channel_mix_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, upcast: bool = False
) -> torch.Tensor:
    """Eager per-pixel channel mix ``weight @ x + bias`` for ``x`` of shape ``(B, C, H, W)``.

    ``weight`` ``(C_out, C_in)`` and ``bias`` ``(C_out,)`` are cast to ``x``'s dtype (as the kernel does);
    ``upcast`` computes in float32 (float64 stays float64) and casts the result back to ``x``'s dtype.
    A 1x1 convolution (cuDNN; on the CPU :func:`pixel_matmul`) run through the custom op
    ``fastflow::conv1x1_ieee`` (on the CPU the ATen ops directly, :func:`tf32_applies`): float32 stays
    IEEE float32 whatever the TF32 flags say (see :func:`ieee_float32`), and ``torch.compile`` keeps the
    op whole instead of lowering it to a convolution that would follow the flags.
    """
    out_dtype = x.dtype
    compute = logdet_dtype(out_dtype) if upcast else out_dtype
    x = cast(x, compute)
    b = None if bias is None else cast(bias, compute)
    if not tf32_applies(x):
        return cast(_mix(x, cast(weight, compute), b), out_dtype)
    return cast(_ieee_mix(x, cast(weight, compute), b), out_dtype)


def tf32_applies(x: torch.Tensor) -> bool:
    """Whether TF32 flags can round ``x``'s products, so that the invertible mix needs the IEEE op: not on the CPU,
    which has no TF32. There the mix is plain ATen ops with their own autograd, eagerly and under
    ``torch.compile`` alike, without the op's wrapper (whose host time a small mix feels: the compiled Glow
    reference step took 124 ms with plain products against 140 ms with the op, one-process A/B, 2026-11-26)."""
    return x.device.type != "cpu"


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and cuBLAS matmuls inside the block, restoring the flags after.

    TF32 rounds float32 operands to a 10-bit mantissa (relative error ~5e-4 per product): fine for a
    coupling network, fatal for an invertible mix, whose inverse must undo the forward to float32 rounding
    (a reversible backward rebuilds inputs through dozens of such mixes).
    """
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The per-pixel mix as ATen ops, under whatever precision flags are set: a convolution on accelerators; on
    the CPU :func:`pixel_matmul`, or :func:`pixel_sum` while ``torch.compile`` traces a small mix
    (:func:`compiles_as_pixel_sum`)."""
    if x.shape[2] * x.shape[3] == 1:  # vectors seen as (B, C, 1, 1): a matmul, not a convolution
        return F.linear(x.flatten(1), weight, bias).view(x.shape[0], weight.shape[0], 1, 1)
    if x.device.type == "cpu":
        if torch.compiler.is_compiling() and compiles_as_pixel_sum(x, weight):
            return pixel_sum(x, weight, bias)
        return pixel_matmul(x, weight, bias)
    return F.conv2d(x, weight[:, :, None, None], bias)


def compiles_as_pixel_sum(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether compiled CPU code runs the mix of ``x`` ``(B, C_in, H, W)`` by ``weight`` ``(C_out, C_in)`` as
    :func:`pixel_sum`: at most :data:`PIXEL_SUM_MAX_PRODUCTS` multiply-adds."""
    return x.numel() * weight.shape[0] <= PIXEL_SUM_MAX_PRODUCTS


def pixel_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x[b, :, h, w] + bias`` per pixel as a broadcast product summed over the input channels,
    ``sum_i weight[o, i] x[b, i, h, w]``: for Inductor, which generates it as one loop fused with its neighbours
    (and its backward's two reductions likewise), where :func:`pixel_matmul` is an extern ``bmm`` each way.
    Eagerly it would materialise ``(B, C_out, C_in, H, W)``: only ``torch.compile`` calls it (:func:`_mix`).
    Shapes and the output's layout as in :func:`pixel_matmul`."""
    acc = logdet_dtype(x.dtype)  # half-precision products summed in float32, as the matmul accumulates
    out = (cast(weight, acc)[None, :, :, None, None] * cast(x, acc)[:, None]).sum(2)
    out = cast(out if bias is None else out + cast(bias, acc)[:, None, None], x.dtype)
    return out.contiguous(memory_format=_output_format(x))  # x's layout, as pixel_matmul's


def pixel_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ x[b, :, h, w] + bias`` per pixel (a 1x1 convolution) as matrix products, with ATen autograd:
    one ``(C_out, C_in) @ (C_in, H W)`` product per sample (``bmm``) for NCHW ``x``; one ``(B H W, C_in) @
    (C_in, C_out)`` product (``addmm``) for channels_last ``x`` and for NCHW ``x`` of few pixels against its
    channels (``8 H W <= C_in``, copied to rows and back), where the per-sample products are too small. The
    output has ``x``'s layout (channels_last or contiguous).

    The CPU's path: there oneDNN's 1x1 convolution costs several times these products at the channel counts of
    flows (forward and backward, 2026-11-26: 8 x 12 x 16 x 16 float32 0.93 ms against 0.29 ms; 64 x 64 x 2 x 2
    with bias 0.70-1.02 ms against 0.38-0.65 ms by rows, 1.04-1.39 ms by per-sample products).
    ``x`` ``(B, C_in, H, W)``, ``weight`` ``(C_out, C_in)``, ``bias`` ``(C_out,)`` or None, one dtype.
    """
    batch, channels, height, width = x.shape
    c_out = weight.shape[0]
    channels_last = _output_format(x) == torch.channels_last
    if channels_last or 8 * height * width <= channels:
        rows = x.permute(0, 2, 3, 1).reshape(batch * height * width, channels)
        out = F.linear(rows, weight, bias).view(batch, height, width, c_out).permute(0, 3, 1, 2)
        return out if channels_last else out.contiguous()
    out = torch.bmm(weight.expand(batch, c_out, channels), x.reshape(batch, channels, height * width))
    if bias is not None:
        out = out.add_(bias[:, None])
    return out.view(batch, c_out, height, width)


def _conv1x1_ieee(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    with ieee_float32():
        return _mix(x, weight, bias)


def _weight_products(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_{b,h,w} grad_y x^T`` ``(C_out, C_in)``, under whatever precision flags are set."""
    if x.shape[2] * x.shape[3] == 1:  # vectors seen as (B, C, 1, 1): one (C_out, B) @ (B, C_in) product
        return grad_y.flatten(1).t() @ x.flatten(1)
    # per-sample (C_out, HW) @ (HW, C_in) products summed over the batch: one bmm on the tensors' own
    # strides (NCHW or channels_last) and one reduction, where einsum's Python planning costs more host time
    return torch.bmm(grad_y.flatten(2), x.flatten(2).transpose(1, 2)).sum(0)


def _conv1x1_ieee_grad_weight(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_{b,h,w} grad_y x^T`` ``(C_out, C_in)``, IEEE float32 whatever the TF32 flags say."""
    with ieee_float32():
        return _weight_products(grad_y, x)


def _ieee_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The op ``fastflow::conv1x1_ieee`` (or its direct twin, :mod:`fastflow.ops._registration`); under functorch
    transforms, which refuse both (their autograd has no functorch rule), the plain convolution under IEEE flags
    (its backward then follows the TF32 flags)."""
    if functorch_transforms_active():
        return _conv1x1_ieee(x, weight, bias)
    if use_library_op():
        return torch.ops.fastflow.conv1x1_ieee(x, weight, bias)
    return _CONV1X1_IEEE_DIRECT(x, weight, bias)


def _ieee_grad_weight(grad_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The op ``fastflow::conv1x1_ieee_grad_weight`` (or its direct twin); plain products where TF32 does not
    apply (:func:`tf32_applies`)."""
    if not tf32_applies(x):
        return _weight_products(grad_y, x)
    if use_library_op():
        return torch.ops.fastflow.conv1x1_ieee_grad_weight(grad_y, x)
    return _CONV1X1_IEEE_GRAD_WEIGHT_DIRECT(grad_y, x)


def _conv1x1_ieee_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _conv1x1_ieee_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    # grad_x = weight^T @ grad_y per pixel and grad_weight = sum_{b,h,w} grad_y x^T, both IEEE ops (so twice
    # differentiable, and opaque to torch.compile: a traced matmul would follow the TF32 flags);
    # grad_bias = sum_{b,h,w} grad_y
    x, weight = ctx.saved_tensors
    grad_x = _ieee_mix(grad_y, weight.t(), None).contiguous(memory_format=_output_format(x))
    grad_weight = _ieee_grad_weight(grad_y, x)
    grad_bias = grad_y.sum((0, 2, 3)) if ctx.has_bias else None
    return grad_x, grad_weight, grad_bias


def _conv1x1_ieee_grad_weight_setup(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
) -> None:
    ctx.save_for_backward(*inputs)


def _conv1x1_ieee_grad_weight_backward(
    ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # d/d grad_y = grad @ x per pixel, d/dx = grad^T @ grad_y per pixel: the IEEE mix again
    grad_y, x = ctx.saved_tensors
    return _ieee_mix(x, grad, None), _ieee_mix(grad_y, grad.t(), None)


_conv1x1_ieee_op = torch.library.custom_op(
    "fastflow::conv1x1_ieee", mutates_args=(), schema="(Tensor x, Tensor weight, Tensor? bias) -> Tensor"
)(_conv1x1_ieee)
_conv1x1_ieee_op.register_fake(lambda x, weight, bias: _empty_pixels(x, weight.shape[0]))
_conv1x1_ieee_op.register_autograd(_conv1x1_ieee_backward, setup_context=_conv1x1_ieee_setup)
_CONV1X1_IEEE_DIRECT = direct_autograd(
    _conv1x1_ieee, _conv1x1_ieee_setup, _conv1x1_ieee_backward, differentiable_backward=True
)

_conv1x1_ieee_grad_weight_op = torch.library.custom_op(
    "fastflow::conv1x1_ieee_grad_weight", mutates_args=(), schema="(Tensor grad_y, Tensor x) -> Tensor"
)(_conv1x1_ieee_grad_weight)
_conv1x1_ieee_grad_weight_op.register_fake(lambda grad_y, x: grad_y.new_empty((grad_y.shape[1], x.shape[1])))
_conv1x1_ieee_grad_weight_op.register_autograd(
    _conv1x1_ieee_grad_weight_backward, setup_context=_conv1x1_ieee_grad_weight_setup
)
_CONV1X1_IEEE_GRAD_WEIGHT_DIRECT = direct_autograd(
    _conv1x1_ieee_grad_weight,
    _conv1x1_ieee_grad_weight_setup,
    _conv1x1_ieee_grad_weight_backward,
    differentiable_backward=True,
)


def _output_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last for channels_last inputs, else contiguous: the layout of every output built from ``x``
    (the fake kernels use it too, so traced and real strides agree). Contiguous under functorch transforms, where
    ``vmap`` cannot query other layouts."""
    if functorch_transforms_active():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _empty_pixels(x: torch.Tensor, channels: int) -> torch.Tensor:
    batch, _, height, width = x.shape
    return torch.empty(
        (batch, channels, height, width), dtype=x.dtype, device=x.device, memory_format=_output_format(x)
    )


def _channel_mix_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _empty_pixels(x, weight.shape[0])


def _channel_mix_backward_fake(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = logdet_dtype(x.dtype)
    c_out, c_in = weight.shape
    return _empty_pixels(x, c_in), x.new_empty((c_out, c_in), dtype=acc), x.new_empty((c_out,), dtype=acc)


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


class _ChannelMixOps(NamedTuple):
    """The fused ops of one registration (:func:`_define_ops`)."""

    mix: Any
    backward: Any


def _define_ops(namespace: str, traceable: bool) -> _ChannelMixOps:
    """Register ``{namespace}::channel_mix`` (with its autograd) and ``{namespace}::channel_mix_backward``.

    ``traceable``: as ``torch.library.triton_op`` launching through ``torch.library.wrap_triton``; else as
    ``torch.library.custom_op`` with fake kernels (:mod:`fastflow.ops._registration`). Both give the same
    schemas, results, strides and gradients. The package's ops are ``_define_ops("fastflow", TRACEABLE)``;
    tests build the other registration under another namespace.
    """
    define, launch = registration(traceable)
    if traceable:
        # bound by name here: triton_op scans the op's source for the kernels it launches (torch.compile's
        # caches key on their source), following calls by name into the launchers
        from fastflow.kernels.channel_mix import channel_mix_backward, channel_mix_forward
    else:
        channel_mix_forward, channel_mix_backward = (
            kernel_function("channel_mix", "channel_mix_forward"),
            kernel_function("channel_mix", "channel_mix_backward"),
        )

    # Optional[...] rather than "X | None" in the op signatures: torch infers the schema from these strings
    # and must evaluate them on Python 3.9 too
    @define(f"{namespace}::channel_mix", mutates_args=())
    def mix(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``weight @ x + bias`` per pixel (:func:`channel_mix`)."""
        return channel_mix_forward(x, weight, bias, _empty_pixels(x, weight.shape[0]), **launch)

    @define(f"{namespace}::channel_mix_backward", mutates_args=())
    def backward(
        grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(grad_x, grad_weight, grad_bias)``; the last two in float32 (float64 for float64 ``x``)."""
        return channel_mix_backward(grad_y, x, weight, _empty_pixels(x, x.shape[1]), **launch)

    if not traceable:
        mix.register_fake(_channel_mix_fake)
        backward.register_fake(_channel_mix_backward_fake)
    mix.register_autograd(
        _mix_backward(getattr(torch.ops, namespace).channel_mix_backward.default), setup_context=_setup_context
    )
    return _ChannelMixOps(mix, backward)


def _mix_backward(backward: Any) -> Any:
    """The mix's backward, running the fused backward ``backward`` (the op ``channel_mix_backward`` or its
    direct twin)."""

    def mix_backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = backward(grad_y, x, weight)
        grad_bias = None if ctx.bias_dtype is None else cast(grad_bias, ctx.bias_dtype)
        return grad_x, cast(grad_weight, weight.dtype), grad_bias

    return mix_backward


def _direct_mix() -> Any:
    """The direct twin of ``fastflow::channel_mix`` (:func:`fastflow.ops._registration.direct_autograd`)."""
    forward = kernel_function("channel_mix", "channel_mix_forward")

    def mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return forward(x, weight, bias, _empty_pixels(x, weight.shape[0]))

    return direct_autograd(mix, _setup_context, _mix_backward(_direct_mix_grads), name="channel_mix")


_MIX_BACKWARD_KERNEL = kernel_function("channel_mix", "channel_mix_backward")


def _direct_mix_grads(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The direct twin of ``fastflow::channel_mix_backward``."""
    return _MIX_BACKWARD_KERNEL(grad_y, x, weight, _empty_pixels(x, x.shape[1]))


_define_ops("fastflow", TRACEABLE)
_DIRECT_MIX = _direct_mix()


def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    check_float_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (C_out, C_in), got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"channel mismatch: weight has C_in={weight.shape[1]} but x has {x.shape[1]} channels")
    check_same_device("weight", weight, "x", x)
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape (C_out,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        check_same_device("bias", bias, "x", x)


INT32_SAMPLE_LIMIT = 2**31
"""The kernels' in-tile offsets are int32: a sample (with a tile of padding) must have fewer elements."""


def _fits_int32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a dense sample of ``x`` and of the output, with a tile of up to 1024 pixels of padding, is
    addressable with the kernels' int32 in-tile offsets (more than 2^31 elements per sample go to cuDNN)."""
    return max(weight.shape) * (x.shape[2] * x.shape[3] + 1024) < INT32_SAMPLE_LIMIT


def channel_mix_grads(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`channel_mix` at ``(x, weight)`` for the upstream ``grad_y``,
    without autograd (for a caller that has them in closed form, such as a reversible backward): the fused
    backward op on the Triton backends (one pass), else :func:`channel_mix_grads_ref`. ``grad_x`` is in ``x``'s
    dtype; the other two in float32 (float64 for float64 ``x``) on the fused path and in ``x``'s dtype on the
    eager one."""
    _check_args(x, weight, None)
    check_float_tensor("grad_y", grad_y)
    want = (x.shape[0], weight.shape[0], *x.shape[2:])
    if tuple(grad_y.shape) != want:
        raise ValueError(f"grad_y must have shape {want}, got {tuple(grad_y.shape)}")
    check_same_device("grad_y", grad_y, "x", x)
    too_wide = max(weight.shape) > kernel_max_channels(x.dtype)
    if resolve_backend(x) == "eager" or too_wide or not _fits_int32(x, weight):
        grad_x, grad_weight, grad_bias = channel_mix_grads_ref(grad_y, x, weight)
        assert grad_bias is not None
        return grad_x, grad_weight, grad_bias
    if use_library_op():
        return torch.ops.fastflow.channel_mix_backward(grad_y, x, weight)
    return _direct_mix_grads(grad_y, x, weight)


def channel_mix_grads_ref(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *, bias_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Eager twin of :func:`channel_mix_grads`, without its argument checks (for a caller whose tensors are known
    good): ``grad_y`` cast to ``x``'s dtype, then ``grad_x = weight^T @ grad_y`` per pixel (an IEEE mix),
    ``grad_weight = sum grad_y x^T`` (one ``bmm``) and ``grad_bias = sum grad_y`` (None with ``bias_grad=False``),
    all in ``x``'s dtype."""
    grad_y = cast(grad_y, x.dtype)
    grad_bias = grad_y.sum((0, 2, 3)) if bias_grad else None
    return channel_mix_ref(grad_y, weight.t()), _ieee_grad_weight(grad_y, x), grad_bias


def channel_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Channel mix ``weight @ x[b, :, h, w] + bias`` on the backend chosen by :mod:`fastflow.backend`.

    ``x`` ``(B, C_in, H, W)`` float16/bfloat16/float32/float64, any strides (NCHW, channels_last and channel
    slices run without a copy); ``weight`` ``(C_out, C_in)`` and ``bias`` ``(C_out,)`` of any float dtype
    (cast to ``x``'s dtype as in :func:`channel_mix_ref`). Returns ``(B, C_out, H, W)`` in ``x``'s dtype,
    channels_last when ``x`` is. Accumulates in float32 (float64 for float64). Differentiable in all three
    arguments.
    """
    _check_args(x, weight, bias)
    too_wide = max(weight.shape) > kernel_max_channels(x.dtype)
    if resolve_backend(x) == "eager" or too_wide or not _fits_int32(x, weight):
        return channel_mix_ref(x, weight, bias)
    if use_library_op():
        return torch.ops.fastflow.channel_mix(x, weight, bias)
    return _DIRECT_MIX(x, weight, bias)
