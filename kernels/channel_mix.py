"""Per-pixel channel mix (a 1x1 convolution): Triton kernels and their launchers on raw tensors.

Math, for ``x`` of shape ``(B, C_in, H, W)``, ``weight`` ``(C_out, C_in)``, optional ``bias`` ``(C_out,)``,
with pixels ``p = h * W + w``:

- forward   ``y[b, :, p] = weight @ x[b, :, p] + bias``
- inverse   the same kernel with ``weight^-1`` (and ``-weight^-1 @ bias`` as bias); the caller supplies it
- backward  ``grad_x[b, :, p] = weight^T @ grad_y[b, :, p]``,
  ``grad_weight = sum_{b, p} grad_y[b, :, p] x[b, :, p]^T``, ``grad_bias = sum_{b, p} grad_y[b, :, p]``

Bytes moved (``e`` = element size of ``x``, ``N = B * H * W`` pixels; the ``C_out * C_in`` weight is
read once per program and is negligible):

- forward:  ``N * (C_in + C_out) * e``  (read ``x`` once, write ``y`` once)
- backward: ``N * (2 * C_in + C_out) * e`` (read ``x`` and ``grad_y`` once, write ``grad_x`` once) plus
  ``P * C_out * (C_in + 1) * a`` for the per-program partial sums (``P`` programs, ``a`` = 4 or 8 bytes),
  which the launcher keeps, at 4 bytes each, below a quarter of the size of ``x`` (half for float64 partials),
  except that every input-channel block gets at least one program.

Layout: a forward program owns ``BLOCK_P`` pixels of one sample and every channel; a backward program
owns ``CI_BLOCK`` input channels (grid axis 0) of the tiles it visits (axis 1), so the weight-gradient
accumulator it keeps in registers is ``C_out x CI_BLOCK``, not ``C_out x C_in``. ``H`` and ``W`` are merged
into one pixel axis with a single stride, which covers NCHW-contiguous, channels_last and channel slices of
a bigger tensor without a copy; only a spatially cropped view (``H``, ``W`` not mergeable) is copied by
``Tensor.flatten``. A tile's offset is int64 (tensors above 2^31 elements are fine), offsets within it are
int32, which takes a third to a half of the registers off the 64- and 128-channel tiles: the launchers copy
an input view whose sample spans 2^31 elements or more (a dense copy may fit) and raise ``ValueError``
where even that does not fit (``fastflow.ops.channel_mix`` sends such sizes to cuDNN instead).

Two compute paths, chosen by the launcher (``USE_DOT``):

- ``tl.dot`` (tensor cores) for float16/bfloat16 when both padded channel counts are >= 16 (the
  tensor-core minimum), with the weight rounded to the input dtype (as ``F.conv2d`` does).
- an outer-product loop over channels (FMA) otherwise: small ``C`` (padding 3 channels to 16 would multiply
  the arithmetic 28x on a memory-bound op), float64, and float32, which must be IEEE whatever
  ``torch.backends.cudnn.allow_tf32`` says (TF32 rounds the operands to a 10-bit mantissa, and a mix so
  computed is no longer inverted by its inverse to float32 rounding: a reversible backward rebuilds its
  inputs with a relative drift of 1e-2 over a few dozen Glow steps). ``tl.dot``'s IEEE float32 mode is an
  FMA loop too, but holds both operand tiles and spills thousands of registers at 64 and 128 channels.

Accumulation is float32 (float64 when ``FP64``). The weight gradient and bias gradient are reduced per
program into partial buffers that the caller sums with ``torch.sum``: deterministic, no atomics, and the
whole backward is one pass over ``x`` and ``grad_y`` (a cuBLAS ``grad_y @ x^T`` would read both again):
each input-channel block reads the ``grad_y`` tile, but the blocks of a tile are neighbours in launch order
and meant to run side by side, so that the repeats come from L2 (not measured yet).

Block sizes (a heuristic, not autotuned; see :func:`_launch_params`). Forward: ``BLOCK_P`` keeps the tile
``C_pad x BLOCK_P`` at about 8K elements (4K in float64), clamped to ``[16, 1024]`` and to the image size,
so each program's weight load is small next to its pixels; 8 warps on the ``tl.dot`` path and from 64
padded channels up, else 4. Backward (persistent: the weight block is loaded once per program): on the
``tl.dot`` path 8 warps, ``CI_BLOCK = min(C_in_pad, 16)`` up to 32 padded output channels and
``min(C_in_pad, 32)`` above, ``BLOCK_P`` 32 at 16 padded output channels and 16 above; on the FMA path
``CI_BLOCK = min(C_in_pad, 16)`` and ``BLOCK_P`` = 2K elements (1K in float64) / ``max(CI_BLOCK, C_out_pad)``.
These come from a sweep of registers and spills of the AOT cubins (no GPU needed) over Triton 3.2, 3.6
and 3.9 for sm_80 and sm_90: in float32 and bfloat16 none spills under register pressure (ptxas still
trades a handful of spill instructions for occupancy in a few FMA-path launches), while the earlier 4-warp
forward tiles spilled under Triton 3.2 / 3.6 at 16 and 32 channels and the ``C_out x C_in`` backward
spilled from 12 (float32) or 24 (bfloat16) channels on. ``tests/kernels/aot_compile.py`` checks every
configuration of :func:`aot_specs` with the installed Triton (``make aot-old-tritons`` with 3.2 and 3.6); float64 (for
gradient checks, not speed) is only required to compile. Not timed yet: a GPU benchmark may move them.
Under Triton's CPU interpreter (tests) the ``tl.dot`` operands are multiplied as float32 copies
(``DOT_FP32``): the interpreter's dot reads bfloat16 bits as integers.

The launchers take a ``wrap_triton`` callable applied to each kernel before its launch: the identity by
default, ``torch.library.wrap_triton`` when :mod:`fastflow.ops.channel_mix` registers them as
``torch.library.triton_op`` (so ``torch.compile`` traces the launch).
"""

# Triton types @triton.jit arguments at launch; Python annotations on them would change their meaning.
# ruff: noqa: ANN001, ANN201, ANN202

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import triton
import triton.language as tl
from fastflow.kernels.aot import AotSpec
from fastflow.kernels.launch import cached_on_sizes, cdiv, launch_device, next_power_of_2

__all__ = [
    "channel_mix_fwd_kernel",
    "channel_mix_bwd_kernel",
    "channel_mix_forward",
    "channel_mix_backward",
    "MAX_TILE_SPAN",
    "AOT_CHANNELS",
    "AOT_RECTANGULAR",
    "aot_specs",
]


@triton.jit
def _mix_dot(a, b, DOT_FP32: tl.constexpr):
    """``a @ b`` accumulated in float32, float32 operands in IEEE precision (never TF32: the mix must stay
    invertible); ``DOT_FP32`` multiplies float32 copies of the operands instead."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
    return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def channel_mix_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    C_IN,
    C_OUT,
    HW,
    N_PBLOCKS,
    stride_xb,
    stride_xc,
    stride_xp,
    stride_wo,
    stride_wi,
    stride_yb,
    stride_yc,
    stride_yp,
    CI_PAD: tl.constexpr,
    CO_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP64: tl.constexpr,
):
    """``y[b, :, p] = W @ x[b, :, p] (+ bias)`` for ``BLOCK_P`` pixels of one sample per program."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // N_PBLOCKS
    p0 = (pid % N_PBLOCKS) * BLOCK_P
    pl = tl.arange(0, BLOCK_P)
    p_mask = p0 + pl < HW
    co = tl.arange(0, CO_PAD)
    co_mask = co < C_OUT
    # int64 offset of the tile, int32 offsets within it (the launcher checks a sample's span fits int32)
    x_tile = x_ptr + b * stride_xb + p0 * stride_xp
    x_pl = pl * stride_xp
    if USE_DOT:
        ci = tl.arange(0, CI_PAD)
        ci_mask = ci < C_IN
        x = tl.load(
            x_tile + (ci[:, None] * stride_xc + x_pl[None, :]),
            mask=ci_mask[:, None] & p_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + co[:, None] * stride_wo + ci[None, :] * stride_wi,
            mask=co_mask[:, None] & ci_mask[None, :],
            other=0.0,
        )
        acc = _mix_dot(w.to(x.dtype), x, DOT_FP32)
    else:
        acc_dtype = tl.float64 if FP64 else tl.float32
        acc = tl.zeros((CO_PAD, BLOCK_P), dtype=acc_dtype)
        w_col = w_ptr + co * stride_wo
        for _ in range(C_IN):
            x_row = tl.load(x_tile + x_pl, mask=p_mask, other=0.0).to(acc_dtype)
            # W rounded to x's dtype first, as on the tl.dot path and in the eager twin
            w_c = tl.load(w_col, mask=co_mask, other=0.0).to(x_ptr.dtype.element_ty).to(acc_dtype)
            acc += w_c[:, None] * x_row[None, :]
            x_tile += stride_xc
            w_col += stride_wi
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_mask, other=0.0).to(acc.dtype)[:, None]
    y_tile = y_ptr + b * stride_yb + p0 * stride_yp
    y_off = co[:, None] * stride_yc + pl[None, :] * stride_yp
    tl.store(y_tile + y_off, acc.to(y_ptr.dtype.element_ty), mask=co_mask[:, None] & p_mask[None, :])


@triton.jit
def channel_mix_bwd_kernel(
    x_ptr,
    gy_ptr,
    w_ptr,
    gx_ptr,
    gw_part_ptr,
    gb_part_ptr,
    C_IN,
    C_OUT,
    HW,
    N_PBLOCKS,
    N_TILES,
    stride_xb,
    stride_xc,
    stride_xp,
    stride_gyb,
    stride_gyc,
    stride_gyp,
    stride_wo,
    stride_wi,
    stride_gxb,
    stride_gxc,
    stride_gxp,
    CI_BLOCK: tl.constexpr,
    CO_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP64: tl.constexpr,
):
    """One pass over ``x`` and ``grad_y`` for the input channels ``ci`` of block ``program_id(0)``: writes
    ``grad_x[:, ci]`` and this program's partial sums of ``(grad_y x^T)[:, ci]`` (``gw_part[pid, :, ci]``)
    and, in input-channel block 0, of ``grad_y`` (``gb_part[pid]``), ``pid = program_id(1)``.

    The programs of one ``pid`` stride over the ``N_TILES = B * N_PBLOCKS`` pixel tiles together
    (persistent loop); each reads the whole ``grad_y`` tile, which its neighbours in launch order read at
    about the same time, so the repeats should mostly hit L2 (not measured yet).
    """
    ci_block = tl.program_id(0)
    pid = tl.program_id(1)
    n_prog = tl.num_programs(1)
    acc_dtype = tl.float64 if FP64 else tl.float32
    ci = ci_block * CI_BLOCK + tl.arange(0, CI_BLOCK)
    co = tl.arange(0, CO_PAD)
    ci_mask = ci < C_IN
    co_mask = co < C_OUT
    pl = tl.arange(0, BLOCK_P)
    w_mask = co_mask[:, None] & ci_mask[None, :]
    gw_acc = tl.zeros((CO_PAD, CI_BLOCK), dtype=acc_dtype)
    gb_acc = tl.zeros((CO_PAD,), dtype=acc_dtype)
    if USE_DOT:
        w = tl.load(w_ptr + co[:, None] * stride_wo + ci[None, :] * stride_wi, mask=w_mask, other=0.0)
    for t in range(pid, N_TILES, n_prog):
        b = (t // N_PBLOCKS).to(tl.int64)
        p0 = (t % N_PBLOCKS).to(tl.int64) * BLOCK_P
        p_mask = p0 + pl < HW
        # int64 offset of the tile, int32 offsets within it (the launcher checks a sample's span fits int32)
        x_tile = x_ptr + b * stride_xb + p0 * stride_xp
        gy_tile = gy_ptr + b * stride_gyb + p0 * stride_gyp
        gy_pl = pl * stride_gyp
        x_tile_mask = ci_mask[:, None] & p_mask[None, :]
        x = tl.load(x_tile + (ci[:, None] * stride_xc + (pl * stride_xp)[None, :]), mask=x_tile_mask, other=0.0)
        if USE_DOT:
            gy = tl.load(
                gy_tile + (co[:, None] * stride_gyc + gy_pl[None, :]),
                mask=co_mask[:, None] & p_mask[None, :],
                other=0.0,
            )
            gx = _mix_dot(tl.trans(w.to(gy.dtype)), gy, DOT_FP32)
            gw_acc += _mix_dot(gy, tl.trans(x.to(gy.dtype)), DOT_FP32)
            gb_acc += tl.sum(gy.to(tl.float32), axis=1)
        else:
            x = x.to(acc_dtype)
            gx = tl.zeros((CI_BLOCK, BLOCK_P), dtype=acc_dtype)
            w_row = w_ptr + ci * stride_wi
            for o in range(C_OUT):
                gy_o = tl.load(gy_tile + gy_pl, mask=p_mask, other=0.0).to(acc_dtype)
                w_o = tl.load(w_row, mask=ci_mask, other=0.0).to(gy_ptr.dtype.element_ty).to(acc_dtype)  # as forward
                gx += w_o[:, None] * gy_o[None, :]
                gw_o = tl.sum(x * gy_o[None, :], axis=1)
                gw_acc += tl.where(co[:, None] == o, gw_o[None, :], 0.0)
                gb_acc += tl.where(co == o, tl.sum(gy_o, axis=0), 0.0)
                gy_tile += stride_gyc
                w_row += stride_wo
        gx_tile = gx_ptr + b * stride_gxb + p0 * stride_gxp
        gx_off = ci[:, None] * stride_gxc + pl[None, :] * stride_gxp
        tl.store(gx_tile + gx_off, gx.to(gx_ptr.dtype.element_ty), mask=x_tile_mask)
    part = pid.to(tl.int64) * C_OUT
    tl.store(gw_part_ptr + (part + co[:, None]) * C_IN + ci[None, :], gw_acc.to(acc_dtype), mask=w_mask)
    if ci_block == 0:
        tl.store(gb_part_ptr + part + co, gb_acc.to(acc_dtype), mask=co_mask)


@cached_on_sizes
def _launch_params(
    c_in: int, c_out: int, hw: int, dtype: torch.dtype, on_cpu: bool, backward: bool
) -> Mapping[str, Any]:
    """Constexprs and warps for a launch: the tile heuristic described in the module docstring, computed once per
    launch shape (a read-only mapping: every caller shares it)."""
    ci_pad, co_pad = next_power_of_2(c_in), next_power_of_2(c_out)
    use_dot = dtype in (torch.float16, torch.bfloat16) and min(ci_pad, co_pad) >= 16
    if use_dot:
        ci_pad, co_pad = max(ci_pad, 16), max(co_pad, 16)
    widest = max(ci_pad, co_pad)
    fp64 = dtype == torch.float64
    if not backward:
        ci_block, block_p = ci_pad, (4096 if fp64 else 8192) // widest
    elif use_dot:
        ci_block = min(ci_pad, 16 if co_pad <= 32 else 32)
        block_p = 32 if co_pad <= 16 else 16
    else:
        ci_block = min(ci_pad, 16)
        block_p = (1024 if fp64 else 2048) // max(ci_block, co_pad)
    block_p = min(max(16, min(1024, block_p)), max(16, next_power_of_2(hw)))
    return MappingProxyType(
        {
            ("CI_BLOCK" if backward else "CI_PAD"): ci_block,
            "CO_PAD": co_pad,
            "BLOCK_P": block_p,
            "USE_DOT": use_dot,
            "FP64": fp64,
            # CPU tensors only reach a kernel under Triton's interpreter, whose tl.dot multiplies the raw
            # uint16 bits of bfloat16 operands: float32 copies of the (already rounded) operands give the
            # products a bfloat16 tensor-core dot gives, so the tests still exercise the tl.dot path.
            "DOT_FP32": use_dot and on_cpu,
            "num_warps": 8 if use_dot or widest >= 64 else 4,
        }
    )


MAX_TILE_SPAN = 2**31
"""In-tile offsets are int32: every tile's largest offset (:func:`_tile_span`) must stay below this."""


def _tile_span(t3: torch.Tensor, block_p: int) -> int:
    """The largest in-tile offset the kernels form for ``t3`` ``(B, C, P)``: every channel and a whole tile of
    pixels (masked lanes past ``P`` included). They form it in int32."""
    return (t3.shape[1] - 1) * t3.stride(1) + (max(t3.shape[2], block_p) - 1) * t3.stride(2)


def _int32_error(name: str, t: torch.Tensor, span: int) -> ValueError:
    return ValueError(
        f"{name}: the channel-mix kernels address a sample with int32 offsets, but a sample of shape "
        f"{tuple(t.shape[1:])} spans {span} elements; run it on the eager backend (fastflow.backend('eager'))"
    )


def _pixels(t: torch.Tensor, block_p: int, name: str) -> tuple[torch.Tensor, int, int, int]:
    """Input ``t`` as ``(B, C, H*W)`` and its three strides: a view, unless H and W cannot merge or the view
    spans too far for int32 in-tile offsets (then a dense copy)."""
    t3 = t.flatten(2)
    if _tile_span(t3, block_p) >= MAX_TILE_SPAN:
        t3 = t3.contiguous()
        if _tile_span(t3, block_p) >= MAX_TILE_SPAN:
            raise _int32_error(name, t, _tile_span(t3, block_p))
    return t3, t3.stride(0), t3.stride(1), t3.stride(2)


def _output_pixels(out: torch.Tensor, block_p: int, name: str) -> torch.Tensor:
    """Output ``out`` as a ``(B, C, H*W)`` view the kernel writes through (raises unless H and W merge)."""
    batch, channels, height, width = out.shape
    out3 = out.view(batch, channels, height * width)
    if _tile_span(out3, block_p) >= MAX_TILE_SPAN:
        raise _int32_error(name, out, _tile_span(out3, block_p))
    return out3


def _launch_directly(kernel: Any) -> Any:
    """The default ``wrap_triton`` of the launchers: launch the kernel itself."""
    return kernel


def channel_mix_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    wrap_triton: Callable[[Any], Any] = _launch_directly,
) -> torch.Tensor:
    """Launch the forward kernel: ``out[b, :, h, w] = weight @ x[b, :, h, w] + bias``; returns ``out``.

    ``x`` ``(B, C_in, H, W)`` and ``out`` ``(B, C_out, H, W)`` with any strides, ``weight`` ``(C_out, C_in)``
    of any float dtype, ``bias`` ``(C_out,)`` or ``None`` (made contiguous: ``C_out`` elements).
    ``wrap_triton`` is applied to the kernel before its launch (see the module docstring).
    """
    batch, c_in, height, width = x.shape
    c_out = weight.shape[0]
    hw = height * width
    if batch * hw == 0 or c_out == 0:
        return out
    params = _launch_params(c_in, c_out, hw, x.dtype, x.device.type == "cpu", backward=False)
    n_pblocks = cdiv(hw, params["BLOCK_P"])
    x3, sxb, sxc, sxp = _pixels(x, params["BLOCK_P"], "x")
    y3 = _output_pixels(out, params["BLOCK_P"], "out")
    # without a bias, b_ptr gets an input, never another output: a traced launch (wrap_triton) may take every
    # pointer as written
    with launch_device(x):
        wrap_triton(channel_mix_fwd_kernel)[(batch * n_pblocks,)](
            x3,
            weight,
            x3 if bias is None else bias.contiguous(),
            y3,
            c_in,
            c_out,
            hw,
            n_pblocks,
            sxb,
            sxc,
            sxp,
            weight.stride(0),
            weight.stride(1),
            y3.stride(0),
            y3.stride(1),
            y3.stride(2),
            HAS_BIAS=bias is not None,
            **params,
        )
    return out


def _backward_programs(x: torch.Tensor, n_tiles: int, n_ci_blocks: int, c_in: int, c_out: int) -> int:
    """Persistent programs per input-channel block for the backward: about 4 per SM in all (2 on the CPU
    interpreter), no more than the tiles, and few enough that the partial buffers, counted at 4 bytes an entry,
    stay under a quarter of the bytes of ``x`` (at least one, whatever the budget)."""
    per_device = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2
    partial_budget = (x.numel() * x.element_size()) // (4 * 4 * c_out * (c_in + 1))
    return max(1, min(n_tiles, per_device // n_ci_blocks, partial_budget))


def channel_mix_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    grad_x: torch.Tensor,
    wrap_triton: Callable[[Any], Any] = _launch_directly,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel; returns ``(grad_x, grad_weight, grad_bias)``.

    ``grad_x`` (the caller's output buffer, shaped like ``x`` with mergeable H and W) receives
    ``weight^T @ grad_y`` per pixel. ``grad_weight`` ``(C_out, C_in)`` and ``grad_bias`` ``(C_out,)`` come
    back in float32 (float64 for float64 ``x``): the caller casts them to the parameters' dtypes.
    ``wrap_triton`` is applied to the kernel before its launch (see the module docstring).
    """
    batch, c_in, height, width = x.shape
    c_out = weight.shape[0]
    hw = height * width
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    params = _launch_params(c_in, c_out, hw, x.dtype, x.device.type == "cpu", backward=True)
    n_pblocks = cdiv(hw, params["BLOCK_P"])
    n_tiles = batch * n_pblocks
    if n_tiles == 0 or c_in == 0 or c_out == 0:
        grad_x.zero_()
        # the bias's gradient is grad_y summed whatever else is empty (no input channels: y is the bias)
        grad_bias = grad_y.sum((0, 2, 3), dtype=acc_dtype)
        return grad_x, x.new_zeros((c_out, c_in), dtype=acc_dtype), grad_bias
    n_ci_blocks = cdiv(c_in, params["CI_BLOCK"])
    n_prog = _backward_programs(x, n_tiles, n_ci_blocks, c_in, c_out)
    gw_part = torch.empty((n_prog, c_out, c_in), dtype=acc_dtype, device=x.device)
    gb_part = torch.empty((n_prog, c_out), dtype=acc_dtype, device=x.device)
    x3, sxb, sxc, sxp = _pixels(x, params["BLOCK_P"], "x")
    gy3, sgb, sgc, sgp = _pixels(grad_y, params["BLOCK_P"], "grad_y")
    gx3 = _output_pixels(grad_x, params["BLOCK_P"], "grad_x")
    with launch_device(x):
        wrap_triton(channel_mix_bwd_kernel)[(n_ci_blocks, n_prog)](
            x3,
            gy3,
            weight,
            gx3,
            gw_part,
            gb_part,
            c_in,
            c_out,
            hw,
            n_pblocks,
            n_tiles,
            sxb,
            sxc,
            sxp,
            sgb,
            sgc,
            sgp,
            weight.stride(0),
            weight.stride(1),
            gx3.stride(0),
            gx3.stride(1),
            gx3.stride(2),
            **params,
        )
    return grad_x, gw_part.sum(0), gb_part.sum(0)


_INT_ARGS = ("C_IN", "C_OUT", "HW", "N_PBLOCKS", "N_TILES")
_ACTIVATIONS = ("x_ptr", "gy_ptr", "gx_ptr", "y_ptr")  # pointers in the activations' dtype, the rest float32
AOT_CHANNELS = (6, 12, 24, 48, 128)
"""Channel counts of :func:`aot_specs`: one per launch configuration class up to 128 (FMA loop, then
``tl.dot`` with 16, 32, 64 and 128 padded channels)."""
AOT_RECTANGULAR = ((128, 8), (8, 128), (16, 128), (128, 16))
"""``(C_in, C_out)`` pairs of :func:`aot_specs` beyond square weights: the FMA loop and ``tl.dot`` at their
most lopsided, where one channel count sets the tile and the other the loop or the block count."""


def _aot_spec(kernel: Any, pointers: dict[str, str], constexprs: dict[str, Any], num_warps: int) -> AotSpec:
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            assert name in _INT_ARGS or name.startswith("stride_"), name
            signature[name] = "i32"
    return AotSpec(kernel, signature, constexprs, num_warps, spill_free=not constexprs["FP64"])


def _aot_launch(c_in: int, c_out: int, act: str, dtype: torch.dtype, backward: bool) -> AotSpec:
    """The spec of one launch as the GPU launcher builds it for a 256x256 image, parameters in float32
    (float64 for float64 activations)."""
    params = dict(_launch_params(c_in, c_out, 256 * 256, dtype, on_cpu=False, backward=backward))
    num_warps = params.pop("num_warps")
    if backward:
        kernel, constexprs = channel_mix_bwd_kernel, params
        names = ("x_ptr", "gy_ptr", "w_ptr", "gx_ptr", "gw_part_ptr", "gb_part_ptr")
    else:
        kernel, constexprs = channel_mix_fwd_kernel, {"HAS_BIAS": True, **params}
        names = ("x_ptr", "w_ptr", "b_ptr", "y_ptr")
    param = "*fp64" if act == "fp64" else "*fp32"
    pointers = {name: f"*{act}" if name in _ACTIVATIONS else param for name in names}
    return _aot_spec(kernel, pointers, constexprs, num_warps)


def aot_specs() -> list[AotSpec]:
    """Launch configurations of both kernels as the GPU launchers build them, for ahead-of-time compile
    checks, forward (with bias) and backward: square weights of every :data:`AOT_CHANNELS` in float32 (TF32
    dot), bfloat16 and float64 activations, and the :data:`AOT_RECTANGULAR` weights in float32. All but the
    float64 ones must not spill under register pressure."""
    shapes = [(c, c, act) for act in ("fp32", "bf16", "fp64") for c in AOT_CHANNELS]
    shapes += [(c_in, c_out, "fp32") for c_in, c_out in AOT_RECTANGULAR]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
    return [
        _aot_launch(c_in, c_out, act, dtypes[act], backward)
        for c_in, c_out, act in shapes
        for backward in (False, True)
    ]
