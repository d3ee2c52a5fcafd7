"""Fused Triton kernels for affine and additive coupling: forward, inverse, backward, reversible backward.

Math per element (``t`` = shift, ``r`` = raw scale from the coupling network, ``gy`` = dL/dy,
``gl[b]`` = dL/dlogdet[b]); registers hold float32 (float64 for float64 inputs) whatever the storage dtype:

- ``SCALE=0`` Glow: ``z = r + 2``, ``s = sigmoid(z)``, ``log s = min(z, 0) - log1p(exp(-|z|))``.
  forward ``y = (x + t) * s``; inverse ``x = y * (1 + exp(-z)) - t`` (``1 / s`` without a division by ``s``);
  backward ``gx = gt = gy * s``, ``gr = (1 - s) * (gy * (x + t) * s + gl)``.
- ``SCALE=1`` RealNVP: ``log s = tanh(r)``, ``s = exp(log s)``.
  forward ``y = x * s + t``; inverse ``x = (y - t) * exp(-log s)``;
  backward ``gx = gy * s``, ``gt = gy``, ``gr = (1 - log s ** 2) * (gy * x * s + gl)``.
- ``SCALE=2`` NICE (additive): ``y = x + t``, ``x = y - t``, ``log s = 0``, ``gx = gt = gy``.
- ``SCALE=3`` Jet: ``s = 2 * sigmoid(r)``, ``log s = log 2 + min(r, 0) - log1p(exp(-|r|))``; forward, inverse
  and backward as Glow's with ``d log s / d r = 1 - sigmoid(r)`` (not ``1 - s``) as the slope:
  ``gr = (1 - sigmoid(r)) * (gy * (x + t) * s + gl)``, ``x = y * (1 + exp(-r)) / 2 - t``.

``logdet[b] = sum_n log s[b, n]`` (the inverse stores ``-logdet``). Each program reduces its tile into one
float32/float64 slot of a ``(B, n_col_blocks)`` partial buffer that the launcher sums: deterministic, no
atomics. The grid covers every ``(sample, column block)`` pair, so every slot is written and the buffer is
allocated uninitialised.
The reversible backward receives ``y`` instead of ``x``: it rebuilds ``x`` with the inverse in registers,
stores it, and uses ``(x + t) * s = y`` (Glow, Jet) and ``x * s = y - t`` (RealNVP) in the gradients.

``gt`` is never stored: it equals ``gx`` (Glow, Jet, NICE) or ``gy`` (RealNVP), so the caller hands out that
tensor (or its transformed channels) instead. The plain additive backward therefore needs no kernel at all.

Channel split (``CH >= 0``): the kernels can also run on the whole coupling input ``x`` of shape
``(B, C, ...)`` whose channels ``[B0, B0 + NB)`` are transformed (``shift``, ``raw`` and ``gr`` have ``NB``
channels) while the others pass through: ``y_a = x_a`` (forward, inverse, rebuilt ``x``) and ``gx_a = gy_a``
(backward) are written in the same pass, so no ``torch.cat`` of the two halves follows.

Bytes moved per element (``E`` = element size; the per-sample log-det terms are negligible), per transformed
element and, with a channel split, per pass-through element (none in the additive backward: ``gx`` is ``gy``):

===================  ============================  ============================  =====================  ============
kernel               Glow, Jet (sigmoid[2])        RealNVP (exp)                 NICE (additive)        pass-through
===================  ============================  ============================  =====================  ============
forward / inverse    4E: x, t, r -> y              4E: x, t, r -> y              3E: x, t -> y          2E: x -> y
backward             6E: x, t, r, gy -> gx, gr     5E: x, r, gy -> gx, gr        none (gx = gt = gy)    2E: gy -> gx
reversible backward  7E: y, t, r, gy -> x, gx, gr  7E: y, t, r, gy -> x, gx, gr  5E: y, t, gy -> x, gx  4E
===================  ============================  ============================  =====================  ============

Layout: every input keeps its own strides. The non-batch dims are ordered by the first input's strides
(outermost first) and merged where every input allows it, so a channel slice ``h[:, :C]`` of a contiguous
NCHW tensor is one strided run per sample and a channels_last slice is two (pixels x channels); with a
channel split the channel dim is a run of its own (NCHW: channels x pixels, channels_last: pixels x
channels). Outputs are allocated dense in that order (contiguous for NCHW inputs, channels_last for
channels_last inputs). Only inputs that need more than three strided runs per sample are copied.

Launch heuristic (no autotune): a program covers a ``ROWS x BLOCK`` tile of about ``TILE = 1024`` elements:
``BLOCK = min(next_pow2(N), TILE)`` elements of a sample and ``ROWS = TILE // BLOCK`` samples, so large images
get 1024-element strips and tiny per-sample sizes (2-D toy data) still fill a tile; 4 warps give 8 elements
per thread, the Triton tutorials' setting for streaming kernels. The 1-D grid has
``cdiv(B, ROWS) * cdiv(N, BLOCK)`` programs. Element indices within a sample are int32 (``N < 2**31``);
every pointer offset is int64.

The launchers take a ``wrap_triton`` callable applied to each kernel before its launch: the identity by
default, ``torch.library.wrap_triton`` when :mod:`fastflow.ops.coupling` registers them as
``torch.library.triton_op`` (so ``torch.compile`` traces the launch). The parameter keeps that name because
``triton_op`` finds an op's kernels by scanning its source for ``wrap_triton(kernel)`` calls (compile caches
key on the kernels' source).
"""

# Triton types @triton.jit arguments at launch; Python annotations on them would change their meaning.
# ruff: noqa: ANN001, ANN201, ANN202

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from fastflow.kernels.aot import AotSpec
from fastflow.kernels.launch import cached_on_sizes, cdiv, launch_device, next_power_of_2

__all__ = [
    "SIGMOID",
    "EXP",
    "ADDITIVE",
    "SIGMOID2",
    "SCALE_CODES",
    "TILE",
    "NUM_WARPS",
    "coupling_fwd_kernel",
    "coupling_bwd_kernel",
    "coupling_forward",
    "coupling_backward",
    "empty_in_order",
    "aot_specs",
]

SIGMOID, EXP, ADDITIVE, SIGMOID2 = 0, 1, 2, 3
SCALE_CODES = {"sigmoid": SIGMOID, "exp": EXP, "additive": ADDITIVE, "sigmoid2": SIGMOID2}
_LOG2: tl.constexpr = tl.constexpr(0.6931471805599453)  # a constexpr: @triton.jit reads only those globals
TILE = 1024
NUM_WARPS = 4
_MAX_RUNS = 3


@triton.jit
def _tile(pid, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Rows (samples) and columns (elements of a sample) of this program's tile, and its column block."""
    n_col_blocks = tl.cdiv(N, BLOCK)
    col_block = pid % n_col_blocks
    rows = (pid // n_col_blocks) * ROWS + tl.arange(0, ROWS)
    cols = col_block * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64), cols, col_block, mask


@triton.jit
def _split(cols, S1, S2, NDIM: tl.constexpr):
    """Index of each element along the (at most three) merged runs of a sample, as int64."""
    if NDIM == 1:
        i0 = cols
        i1 = cols
        i2 = cols
    elif NDIM == 2:
        i0 = cols // S1
        i1 = cols % S1
        i2 = cols
    else:
        i0 = cols // (S1 * S2)
        i1 = (cols // S2) % S1
        i2 = cols % S2
    return i0.to(tl.int64), i1.to(tl.int64), i2.to(tl.int64)


@triton.jit
def _offsets(rows, i0, i1, i2, sb, s0, s1, s2, NDIM: tl.constexpr):
    """int64 offsets of a strided input for the tile ``rows x (i0, i1, i2)``."""
    inner = i0 * s0
    if NDIM > 1:
        inner += i1 * s1
    if NDIM > 2:
        inner += i2 * s2
    return rows[:, None] * sb + inner[None, :]


@triton.jit
def _transformed(mask, i0, i1, i2, B0, NB, CH: tl.constexpr):
    """Mask of the transformed elements and their run indices into ``shift`` / ``raw`` / ``gr``.

    Without a channel split (``CH < 0``) every element is transformed and the indices are unchanged; with one,
    run ``CH`` is the channel dim, the transformed channels are ``[B0, B0 + NB)`` and the ``NB``-channel tensors
    are indexed from channel ``B0`` (the pass-through elements get negative channel indices, never accessed).
    """
    if CH == 0:
        mask_b = mask & ((i0 >= B0) & (i0 < B0 + NB))[None, :]
        return mask_b, i0 - B0, i1, i2
    elif CH == 1:
        mask_b = mask & ((i1 >= B0) & (i1 < B0 + NB))[None, :]
        return mask_b, i0, i1 - B0, i2
    elif CH == 2:
        mask_b = mask & ((i2 >= B0) & (i2 < B0 + NB))[None, :]
        return mask_b, i0, i1, i2 - B0
    else:
        return mask, i0, i1, i2


@triton.jit
def _load(ptr, offs, mask, acc_ty):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(acc_ty)


@triton.jit
def _store(ptr, offs, value, mask):
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_parts(z):
    """``s``, ``1 - s``, ``log s`` and ``1 / s`` for ``s = sigmoid(z)``, from one exp and one log."""
    e = tl.exp(-tl.abs(z))
    d = 1.0 + e
    pos = z >= 0.0
    s = tl.where(pos, 1.0 / d, e / d)
    one_minus_s = tl.where(pos, e / d, 1.0 / d)
    # log1p(e) accurate for tiny e (Kahan's trick): log(d) * e / (d - 1), and e itself once d rounds to 1.
    log1p_e = tl.where(d == 1.0, e, tl.log(d) * e / tl.where(d == 1.0, 1.0, d - 1.0))
    log_s = tl.minimum(z, 0.0) - log1p_e
    inv_s = tl.where(pos, d, d / e)
    return s, one_minus_s, log_s, inv_s


@triton.jit
def _sigmoid_scale(r, SCALE: tl.constexpr):
    """``s``, ``d log s / d r``, ``log s`` and ``1 / s`` for Glow's ``s = sigmoid(r + 2)`` (``SCALE == 0``) or
    Jet's ``s = 2 * sigmoid(r)`` (``SCALE == 3``)."""
    if SCALE == 0:
        s, slope, log_s, inv_s = _sigmoid_parts(r + 2.0)
    else:
        sig, slope, log_sig, inv_sig = _sigmoid_parts(r)
        s = 2.0 * sig
        # log 2 in the compute dtype: a bare float literal would be rounded to float32 in float64 kernels
        log_s = log_sig + tl.full(r.shape, _LOG2, r.dtype)
        inv_s = 0.5 * inv_sig
    return s, slope, log_s, inv_s


@triton.jit
def _tanh(r):
    """tanh from exp(-2|r|) <= 1: no overflow for any r."""
    e = tl.exp(-2.0 * tl.abs(r))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(r < 0.0, -th, th)


@triton.jit
def coupling_fwd_kernel(
    u_ptr, t_ptr, r_ptr, out_ptr, part_ptr,
    B, N, S1, S2, B0, NB,
    u_sb, u_s0, u_s1, u_s2,
    t_sb, t_s0, t_s1, t_s2,
    r_sb, r_s0, r_s1, r_s2,
    SCALE: tl.constexpr, INVERSE: tl.constexpr,
    NDIM: tl.constexpr, CH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Forward (``u = x``, ``out = y``) or inverse (``u = y``, ``out = x``) of one tile, and its log-det sums.

    ``out`` is dense ``(B, N)`` in iteration order; elements outside the transformed channels (``CH >= 0``)
    are copied from ``u``. ``part[b, col_block]`` receives ``sum log s`` (negated when ``INVERSE``) unless
    ``SCALE == 2``; its dtype is the compute dtype.
    """
    acc_ty = part_ptr.dtype.element_ty
    rows, cols, col_block, mask = _tile(tl.program_id(0), B, N, ROWS, BLOCK)
    i0, i1, i2 = _split(cols, S1, S2, NDIM)
    mask_b, j0, j1, j2 = _transformed(mask, i0, i1, i2, B0, NB, CH)
    u = _load(u_ptr, _offsets(rows, i0, i1, i2, u_sb, u_s0, u_s1, u_s2, NDIM), mask, acc_ty)
    t = _load(t_ptr, _offsets(rows, j0, j1, j2, t_sb, t_s0, t_s1, t_s2, NDIM), mask_b, acc_ty)
    out_offs = rows[:, None] * N + cols.to(tl.int64)[None, :]
    if SCALE == 2:
        # off the transformed channels t is 0, so u + t and u - t pass u through (up to the sign of a zero)
        if INVERSE:
            _store(out_ptr, out_offs, u - t, mask)
        else:
            _store(out_ptr, out_offs, u + t, mask)
    else:
        r = _load(r_ptr, _offsets(rows, j0, j1, j2, r_sb, r_s0, r_s1, r_s2, NDIM), mask_b, acc_ty)
        if SCALE == 0 or SCALE == 3:
            s, slope, log_s, inv_s = _sigmoid_scale(r, SCALE)
            if INVERSE:
                out = u * inv_s - t
            else:
                out = (u + t) * s
        else:
            log_s = _tanh(r)
            if INVERSE:
                out = (u - t) * tl.exp(-log_s)
            else:
                out = u * tl.exp(log_s) + t
        if CH >= 0:
            out = tl.where(mask_b, out, u)
        _store(out_ptr, out_offs, out, mask)
        partial = tl.sum(tl.where(mask_b, log_s, 0.0), axis=1)
        if INVERSE:
            partial = -partial
        tl.store(part_ptr + rows * tl.cdiv(N, BLOCK) + col_block, partial, mask=rows < B)


@triton.jit
def coupling_bwd_kernel(
    u_ptr, t_ptr, r_ptr, gy_ptr, gl_ptr, gx_ptr, gr_ptr, x_ptr,
    B, N, S1, S2, B0, NB,
    u_sb, u_s0, u_s1, u_s2,
    t_sb, t_s0, t_s1, t_s2,
    r_sb, r_s0, r_s1, r_s2,
    g_sb, g_s0, g_s1, g_s2,
    o_sb, o_s0, o_s1, o_s2,
    gl_sb,
    SCALE: tl.constexpr, REBUILD: tl.constexpr,
    NDIM: tl.constexpr, CH: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Gradients of the forward w.r.t. ``x`` and ``r`` for one tile (``gt`` is ``gx`` or ``gy``: not stored).

    ``u`` is the forward input ``x``, or its output ``y`` when ``REBUILD`` (reversible backprop): then ``x``
    is rebuilt and stored to ``x_ptr``. ``gl`` is ``(B,)`` with stride ``gl_sb`` and sets the compute dtype.
    ``gx`` and ``x`` are dense ``(B, N)`` in iteration order, with ``gx = gy`` and ``x = u`` outside the
    transformed channels (``CH >= 0``); ``gr`` (strides ``o_*``, shaped like ``raw``) is not written for
    ``SCALE == 2``, which has a kernel only to rebuild ``x``.
    """
    tl.static_assert(REBUILD or SCALE != 2, "the additive backward without rebuild is gx = gt = gy: no kernel")
    acc_ty = gl_ptr.dtype.element_ty
    rows, cols, col_block, mask = _tile(tl.program_id(0), B, N, ROWS, BLOCK)
    i0, i1, i2 = _split(cols, S1, S2, NDIM)
    mask_b, j0, j1, j2 = _transformed(mask, i0, i1, i2, B0, NB, CH)
    gy = _load(gy_ptr, _offsets(rows, i0, i1, i2, g_sb, g_s0, g_s1, g_s2, NDIM), mask, acc_ty)
    out_offs = rows[:, None] * N + cols.to(tl.int64)[None, :]
    # the rebuilt x needs u everywhere (it passes through off the transformed channels), gradients only on them
    u_mask = mask if REBUILD else mask_b
    u = _load(u_ptr, _offsets(rows, i0, i1, i2, u_sb, u_s0, u_s1, u_s2, NDIM), u_mask, acc_ty)
    if SCALE == 2:
        t = _load(t_ptr, _offsets(rows, j0, j1, j2, t_sb, t_s0, t_s1, t_s2, NDIM), mask_b, acc_ty)
        _store(x_ptr, out_offs, u - t, mask)  # t is 0 off the transformed channels and u - 0 == u exactly
        _store(gx_ptr, out_offs, gy, mask)
    else:
        r = _load(r_ptr, _offsets(rows, j0, j1, j2, r_sb, r_s0, r_s1, r_s2, NDIM), mask_b, acc_ty)
        gl = tl.load(gl_ptr + rows * gl_sb, mask=rows < B, other=0.0).to(acc_ty)[:, None]
        if SCALE != 1 or REBUILD:
            t = _load(t_ptr, _offsets(rows, j0, j1, j2, t_sb, t_s0, t_s1, t_s2, NDIM), mask_b, acc_ty)
        if SCALE == 0 or SCALE == 3:
            s, slope, log_s, inv_s = _sigmoid_scale(r, SCALE)
            if REBUILD:
                x = u * inv_s - t
                xt_s = u
            else:
                xt_s = (u + t) * s
            gx = gy * s
            gr = slope * (gy * xt_s + gl)
        else:
            log_s = _tanh(r)
            if REBUILD:
                x_s = u - t
                x = x_s * tl.exp(-log_s)
            else:
                x_s = u * tl.exp(log_s)
            gx = gy * tl.exp(log_s)
            gr = (1.0 - log_s * log_s) * (gy * x_s + gl)
        if CH >= 0:
            gx = tl.where(mask_b, gx, gy)
        _store(gx_ptr, out_offs, gx, mask)
        _store(gr_ptr, _offsets(rows, j0, j1, j2, o_sb, o_s0, o_s1, o_s2, NDIM), gr, mask_b)
        if REBUILD:
            if CH >= 0:
                x = tl.where(mask_b, x, u)
            _store(x_ptr, out_offs, x, mask)


class _Runs(NamedTuple):
    """A sample's elements as at most three strided runs: sizes ``(S0, S1, S2)``, per-tensor strides, and the
    index of the run that is the channel dim of a channel split (-1 without one)."""

    ndim: int
    sizes: tuple[int, int, int]
    strides: tuple[tuple[int, int, int, int], ...]
    channel: int


# The launch geometry below is a pure function of shapes and strides, cached on them: a training step calls the
# launchers thousands of times with a few dozen distinct layouts, and the host time per launch is what bounds it.


@cached_on_sizes
def _order_and_permutation(stride: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Dims batch first, then the others outermost in memory first (stable for ties), and the permutation that
    views a tensor laid out in that order in the original dim order (None when the order is the identity)."""
    order = (0, *sorted(range(1, len(stride)), key=lambda d: -stride[d]))
    if order == tuple(range(len(stride))):
        return order, None
    return order, tuple(order.index(d) for d in range(len(stride)))


def _inner_order(x: torch.Tensor) -> tuple[int, ...]:
    """Non-batch dims of ``x``, outermost in memory first (stable for ties)."""
    return _order_and_permutation(x.stride())[0][1:]


def empty_in_order(
    x: torch.Tensor, dtype: torch.dtype | None = None, shape: torch.Size | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Empty tensor shaped like ``x`` (or ``shape``, of ``x``'s rank), dense in ``x``'s memory order of
    non-batch dims, batch outermost."""
    order, permutation = _order_and_permutation(x.stride())
    shape = x.shape if shape is None else shape
    dtype = dtype or x.dtype
    if permutation is None:
        return torch.empty(shape, dtype=dtype, device=x.device)
    return torch.empty([shape[d] for d in order], dtype=dtype, device=x.device).permute(permutation)


def _runs(tensors: list[torch.Tensor], order: tuple[int, ...], channel_dim: int | None) -> _Runs | None:
    """Merge the dims in ``order`` into runs every tensor can stride through; None if more than three.

    The tensors share the first one's shape except along ``channel_dim`` (a channel split), which is never
    merged with a neighbour: its index is a run index of its own.
    """
    return _runs_of(tuple(tensors[0].shape), tuple(t.stride() for t in tensors), order, channel_dim)


@cached_on_sizes
def _runs_of(
    shape: tuple[int, ...], strides: tuple[tuple[int, ...], ...], order: tuple[int, ...], channel_dim: int | None
) -> _Runs | None:
    """:func:`_runs` on shapes and strides."""
    sizes: list[int] = []
    inner: list[list[int]] = [[] for _ in strides]  # innermost stride of each run, per tensor
    channel, previous = -1, None
    for d in (d for d in order if shape[d] != 1 or d == channel_dim):
        mergeable = channel_dim not in (d, previous)
        if sizes and mergeable and all(st[-1] == stride[d] * shape[d] for st, stride in zip(inner, strides)):
            sizes[-1] *= shape[d]
            for st, stride in zip(inner, strides):
                st[-1] = stride[d]
        else:
            sizes.append(shape[d])
            for st, stride in zip(inner, strides):
                st.append(stride[d])
        if d == channel_dim:
            channel = len(sizes) - 1
        previous = d
    if len(sizes) > _MAX_RUNS:
        return None
    pad = _MAX_RUNS - len(sizes)
    padded = tuple((stride[0], *st, *[0] * pad) for st, stride in zip(inner, strides))
    return _Runs(max(len(sizes), 1), (*sizes, *[1] * pad), padded, channel)  # type: ignore[arg-type]


def _prepare(inputs: list[torch.Tensor], channel_dim: int | None) -> tuple[list[torch.Tensor], tuple[int, ...], _Runs]:
    """Inputs, the iteration order and their runs; inputs are copied (dense in the first one's order) only
    beyond three runs."""
    order = _inner_order(inputs[0])
    runs = _runs(inputs, order, channel_dim)
    if runs is None:
        inputs = [empty_in_order(inputs[0], t.dtype, t.shape).copy_(t) for t in inputs]
        runs = _runs(inputs, order, channel_dim)
        assert runs is not None
    return inputs, order, runs


@cached_on_sizes
def _block_sizes(batch: int, n: int) -> tuple[int, int]:
    """``(ROWS, BLOCK)`` of the launch heuristic described in the module docstring."""
    block = min(next_power_of_2(n), TILE)
    return min(TILE // block, next_power_of_2(batch)), block


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_args(u: torch.Tensor, runs: _Runs, b_start: int | None, b_channels: int) -> tuple[int, ...]:
    """``B, N, S1, S2, B0, NB`` and every tensor's four strides, in kernel argument order."""
    batch = u.shape[0]
    return _launch_ints(batch, u.numel() // batch, runs, b_start, b_channels)


@cached_on_sizes
def _launch_ints(batch: int, n: int, runs: _Runs, b_start: int | None, b_channels: int) -> tuple[int, ...]:
    """:func:`_launch_args` on the sizes."""
    if n >= 2**31 - TILE:
        raise ValueError(f"coupling kernels index a sample with int32, got {n} elements per sample")
    split = (0, 0) if b_start is None else (b_start, b_channels)  # unused without a split
    return (batch, n, runs.sizes[1], runs.sizes[2], *split, *(s for st in runs.strides for s in st))


def _launch_directly(kernel: Any) -> Any:
    """The default ``wrap_triton`` of the launchers: launch the kernel itself."""
    return kernel


def _check_split(u: torch.Tensor, shift: torch.Tensor, b_start: int | None) -> None:
    """``shift`` matches ``u``, or ``u``'s channels ``[b_start, b_start + shift.shape[1])`` with a split."""
    if b_start is None:
        assert shift.shape == u.shape, (shift.shape, u.shape)
    else:
        assert u.dim() >= 2 and 0 <= b_start <= b_start + shift.shape[1] <= u.shape[1], (u.shape, b_start)
        assert shift.shape == (*u.shape[:1], shift.shape[1], *u.shape[2:]), (shift.shape, u.shape)


def coupling_forward(
    u: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor | None,
    kind: str,
    inverse: bool,
    b_start: int | None = None,
    wrap_triton: Callable[[Any], Any] = _launch_directly,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``(y, logdet)`` of ``u = x``, or inverse ``(x, -logdet)`` of ``u = y``, in one pass.

    ``kind`` is a key of :data:`SCALE_CODES`. ``u``, ``shift`` and ``raw`` share shape ``(B, ...)``, dtype and
    device, with any strides; ``raw`` is ignored (may be None) for ``"additive"``. With ``b_start``, ``u`` is
    ``(B, C, ...)`` and ``shift`` / ``raw`` are ``(B, NB, ...)``: channels ``[b_start, b_start + NB)`` of ``u``
    are transformed and the others are copied into the output in the same pass. The output has ``u``'s shape
    and dtype, dense in ``u``'s memory order; ``logdet`` is ``(B,)`` float32 (float64 for float64 inputs).
    ``wrap_triton`` is applied to the kernel before its launch (see the module docstring).
    """
    _check_split(u, shift, b_start)
    scale = SCALE_CODES[kind]
    out = empty_in_order(u)
    batch, acc = u.shape[0], _compute_dtype(u.dtype)
    if u.numel() == 0:
        return out, torch.zeros(batch, dtype=acc, device=u.device)
    channel_dim = None if b_start is None else 1
    inputs, _, runs = _prepare([u, shift, shift if raw is None else raw], channel_dim)
    rows, block = _block_sizes(batch, u.numel() // batch)
    n_col_blocks = cdiv(u.numel() // batch, block)
    if scale == ADDITIVE:
        # log s = 0: the kernel writes no partial sums, and the zero log-det stands in for the unused pointer
        partial = torch.zeros(batch, dtype=acc, device=u.device)
    else:
        # every (sample, column block) slot is written (module docstring): no zero fill
        partial = torch.empty(batch, n_col_blocks, dtype=acc, device=u.device)
    grid = (cdiv(batch, rows) * n_col_blocks,)
    with launch_device(u):
        wrap_triton(coupling_fwd_kernel)[grid](
            *inputs, out, partial, *_launch_args(u, runs, b_start, shift.shape[1]),
            SCALE=scale, INVERSE=inverse, NDIM=runs.ndim, CH=runs.channel, ROWS=rows, BLOCK=block,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return out, partial if scale == ADDITIVE else partial.sum(dim=1)


def coupling_backward(
    u: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor | None,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    kind: str,
    rebuild: bool,
    b_start: int | None = None,
    wrap_triton: Callable[[Any], Any] = _launch_directly,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x, grad_raw, x)`` of the coupling forward in one pass; ``grad_shift`` is not computed.

    ``grad_shift`` is ``grad_x`` for ``"sigmoid"``, ``"sigmoid2"`` and ``"additive"`` and ``grad_y`` for ``"exp"`` (with
    ``b_start``: their channels ``[b_start, b_start + NB)``), so the caller hands those out. ``u`` is the forward
    input ``x``, or the forward output ``y`` when ``rebuild`` (then ``x`` is rebuilt and returned, else None);
    the additive coupling has a kernel only with ``rebuild`` (else ``grad_x = grad_y``). ``grad_y`` matches
    ``u``; ``grad_logdet`` is ``(B,)`` or None (zero); shapes and ``b_start`` as in :func:`coupling_forward`.
    ``grad_raw`` (None for ``"additive"``) matches ``raw``; all outputs have ``u``'s dtype, dense in ``u``'s
    memory order.
    """
    _check_split(u, shift, b_start)
    scale = SCALE_CODES[kind]
    if scale == ADDITIVE and not rebuild:
        raise ValueError("the additive backward is grad_x = grad_shift = grad_y: no kernel to launch")
    acc = _compute_dtype(u.dtype)
    batch = u.shape[0]
    if grad_logdet is None:
        grad_logdet = torch.zeros((), dtype=acc, device=u.device).expand(batch)
    grad_x = empty_in_order(u)
    grad_raw = None if raw is None or scale == ADDITIVE else empty_in_order(u, shape=raw.shape)
    x = empty_in_order(u) if rebuild else None
    if u.numel() == 0:
        return grad_x, grad_raw, x
    channel_dim = None if b_start is None else 1
    inputs, order, _ = _prepare([u, shift, shift if raw is None else raw, grad_y], channel_dim)
    # grad_raw is dense in the iteration order, so adding it never splits a run
    runs = _runs([*inputs, inputs[1] if grad_raw is None else grad_raw], order, channel_dim)
    assert runs is not None
    rows, block = _block_sizes(batch, u.numel() // batch)
    grid = (cdiv(batch, rows) * cdiv(u.numel() // batch, block),)
    gl = grad_logdet.to(acc)
    # a slot this launch never stores to gets an input, never another output: a traced launch (wrap_triton)
    # may take every pointer as written
    with launch_device(u):
        wrap_triton(coupling_bwd_kernel)[grid](
            *inputs, gl, grad_x, u if grad_raw is None else grad_raw, u if x is None else x,
            *_launch_args(u, runs, b_start, shift.shape[1]), gl.stride(0),
            SCALE=scale, REBUILD=rebuild, NDIM=runs.ndim, CH=runs.channel, ROWS=rows, BLOCK=block,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return grad_x, grad_raw, x


_CONSTEXPRS = ("SCALE", "INVERSE", "REBUILD", "NDIM", "CH", "ROWS", "BLOCK")


def _signature(kernel: Any, elem: str, int_type: str) -> dict[str, str]:
    """``triton.compile`` signature: ``elem`` data pointers, log-det pointers in the compute dtype."""
    acc = "fp64" if elem == "fp64" else "fp32"

    def arg_type(name: str) -> str:
        if name in _CONSTEXPRS:
            return "constexpr"
        if name.endswith("_ptr"):
            return f"*{acc}" if name in ("part_ptr", "gl_ptr") else f"*{elem}"
        return int_type

    return {name: arg_type(name) for name in kernel.arg_names}


def _glow_launch_ints(kernel: Any, split: bool, channels_last: bool = False) -> dict[str, int]:
    """The integer arguments of ``kernel`` in Glow's usual launch: the coupling input a ``(16, 96, 32, 32)``
    activation (NCHW or channels_last), ``shift``/``raw`` the two halves of the network output, a dense upstream
    gradient and a ``(B,)`` log-det gradient; ``x_b`` its channel slice, or with ``split`` the whole activation
    with channels ``[48, 96)`` transformed. Computed by the launcher's own helpers on CPU tensors."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    h, net = (torch.empty(16, 96, 32, 32, memory_format=fmt) for _ in range(2))
    u, (shift, raw) = (h if split else h[:, 48:]), net.chunk(2, dim=1)
    backward = kernel is coupling_bwd_kernel
    channel_dim = 1 if split else None
    inputs, order, _ = _prepare([u, shift, raw, *([empty_in_order(u)] if backward else [])], channel_dim)
    outputs = [empty_in_order(u, shape=raw.shape)] if backward else []  # grad_raw
    runs = _runs([*inputs, *outputs], order, channel_dim)
    assert runs is not None
    values = [*_launch_args(u, runs, 48 if split else None, 48), *([1] if backward else [])]  # gl_sb
    names = [n for n in kernel.arg_names if not n.endswith("_ptr") and n not in _CONSTEXPRS]
    assert len(names) == len(values), (names, values)
    return dict(zip(names, values))


def aot_specs() -> list[AotSpec]:
    """Launch configurations of every kernel here, to compile ahead of time for a GPU target.

    Every ``SCALE`` and direction (but the additive backward without rebuild, which has no kernel) for
    Glow's usual launches: a channel slice of an NCHW tensor (one run per sample, 1024-element strips) in
    float32 and bfloat16, and the channel split of the whole NCHW activation (two runs) in float32; the
    channel split of a channels_last activation (two runs, the channel run innermost) in its heavier
    direction (inverse, reversible backward); float32 with int64 strides and three runs, channel split
    (channels_last slices of huge tensors); bfloat16 with two runs and 64 samples per tile; float64 (gradcheck
    on GPU) with one element per sample, which need only compile (the others must not spill).
    """
    glow, split = {"NDIM": 1, "CH": -1, "ROWS": 1, "BLOCK": TILE}, {"NDIM": 2, "ROWS": 1, "BLOCK": TILE}
    variants = (  # elem, int type, tile, INVERSE / REBUILD flags, Glow launch (split, channels_last) or None
        ("fp32", "i32", glow, (False, True), (False, False)),
        ("bf16", "i32", glow, (False, True), (False, False)),
        ("fp32", "i32", {**split, "CH": 0}, (False, True), (True, False)),
        ("fp32", "i32", {**split, "CH": 1}, (True,), (True, True)),
        ("fp32", "i64", {"NDIM": 3, "CH": 1, "ROWS": 1, "BLOCK": TILE}, (False, True), None),
        ("bf16", "i32", {"NDIM": 2, "CH": -1, "ROWS": 64, "BLOCK": 16}, (False, True), None),
        ("fp64", "i32", {"NDIM": 1, "CH": -1, "ROWS": TILE, "BLOCK": 1}, (False,), None),
    )
    specs = []
    for elem, int_type, tile, flags, launch in variants:
        for scale in (SIGMOID, EXP, ADDITIVE, SIGMOID2):
            for flag in flags:
                for kernel, flag_name in ((coupling_fwd_kernel, "INVERSE"), (coupling_bwd_kernel, "REBUILD")):
                    if kernel is coupling_bwd_kernel and scale == ADDITIVE and not flag:
                        continue
                    constexprs = {**tile, "SCALE": scale, flag_name: flag}
                    signature = _signature(kernel, elem, int_type)
                    ints = None if launch is None else _glow_launch_ints(kernel, *launch)
                    specs.append(AotSpec(kernel, signature, constexprs, NUM_WARPS, elem != "fp64", ints))
    return specs
