"""Fused Triton kernels for the monotonic rational-quadratic spline (Durkan et al., 2019, "Neural Spline Flows"):
forward, inverse, their backwards and the reversible backward.

Math per element ``x`` with ``K`` bins on ``[-BOUND, BOUND]`` and ``3K - 1`` raw parameters (``K`` widths,
``K`` heights, ``K - 1`` interior derivatives, in that order along the last dim of ``raw``); registers hold
float32 (float64 for float64 inputs) whatever the storage dtype:

- sizes ``w = MIN_W + (1 - K MIN_W) softmax(raw_w)``, ``h`` likewise from ``raw_h`` with ``MIN_H``; right knots
  ``x_j = -BOUND + 2 BOUND cumsum(w)_j`` and ``y_j`` likewise, the last exactly ``BOUND``; knot derivatives
  ``d_j = MIN_D + softplus(raw_d[j - 1])`` inside and ``1`` at both ends (the identity tails' slope).
- bin ``k`` = the number of interior right knots ``<= x``; in it ``xl, W = 2 BOUND w_k, yl, H`` (left knot, width),
  ``s = H / W``, ``u = (x - xl) / W``, ``t = u (1 - u)``, ``d0 = d_k``, ``d1 = d_{k+1}``:
  ``y = yl + H (s u^2 + d0 t) / D`` with ``D = s + (d0 + d1 - 2 s) t``, and
  ``log dy/dx = 2 log(s / D) + log M`` with ``M = d1 u^2 + 2 s t + d0 (1 - u)^2``.
  Outside ``[-BOUND, BOUND]`` the map is the identity with log-det 0 (continuous: the end slopes are 1).
- inverse: ``u`` is the root in ``[0, 1]`` of ``a u^2 + b u + c`` with ``a = (s - d0) + e kappa``,
  ``b = d0 - e kappa``, ``c = -s e`` (``e = (y - yl) / H``, ``kappa = d0 + d1 - 2 s``: the quadratic divided by
  ``H``, free of the bound's scale), taken as ``2 c / (-b - sqrt(b^2 - 4 a c))`` for ``b >= 0`` and
  ``(sqrt(b^2 - 4 a c) - b) / (2 a)`` for ``b < 0`` (then ``a > s > 0``): neither form cancels. In a bin's upper
  half ``v = 1 - u`` is solved for, from ``yr - y`` with ``d0`` and ``d1`` swapped (the spline mirrored: the same
  rational function), so the offset stays small and ``a`` does not cancel. ``x = xl + u W``, log-det ``-log dy/dx``.
- positions are measured from the nearer knot (``v = 1 - u = (xr - x) / W`` in the upper half of the bin in
  ``x``, ``y = yr - H (s v^2 + d1 t) / D`` in its upper half in ``y``, and likewise in the inverse), so knots
  and the bound map to knots and the bound exactly and a round trip measures ``y`` from the same knot both
  ways; results are clamped between their bin's knots (monotone across bins whatever the rounding).
- backward (upstream ``gy``, ``gl[b]``): the partials of ``y`` and of ``log dy/dx`` w.r.t. ``u, s, d0, d1, H``
  (module :func:`_grads`) chain to ``gx = G_u / W``, ``G_xl = -gx``, ``G_W = -(G_u u + G_s s) / W``,
  ``G_H += G_s / W``, ``G_yl = gy``; the knots' gradients go through the cumulative sum
  (``xl = -BOUND + 2 BOUND sum_{i<k} w_i``, ``W = 2 BOUND w_k``) and the softmax
  (``g_raw_i = p_i (g_i - sum_j p_j g_j)``, written without cancellation via the sums of ``p`` below, at and
  above ``k``), and ``d(softplus)/dr = sigmoid(r)``.
- inverse backward (upstream ``gx``, ``gl`` for ``-log dy/dx``): ``gy = (gx - gl L_x) / (dy/dx)`` with
  ``L_x = d(log dy/dx)/dx``, and the raw gradients are the forward's for upstream ``(-gy, -gl)``.
- reversible backward: the forward's gradients from the output ``y``, rebuilding ``x`` in the same pass.
- NaN: an element whose input or any raw parameter is NaN has a NaN log-det, and in every backward NaN gradients
  for its input and all its raw parameters (NaN added to its upstream gradients), whatever it reads.

``logdet[b] = sum_n log dy/dx`` (the inverse stores ``-logdet``): each program reduces its tile into one slot of a
``(B, n_col_blocks)`` partial buffer that the launcher sums: deterministic, no atomics; every slot is written.

Bytes moved per element (``E`` = element size, ``P = 3K - 1``):

====================  =======================================  =============
kernel                reads / writes                           bytes
====================  =======================================  =============
forward / inverse     x, raw -> y                              (P + 2) E
backward (both ways)  x, raw, gy -> gx, graw                   (2 P + 3) E
reversible backward   y, raw, gy -> x, gx, graw                (2 P + 4) E
====================  =======================================  =============

Layout: ``u`` is ``(B, ...)`` and ``raw`` ``(B, ..., P)``; the kernels index them as ``(B, N)`` and ``(B, N, P)``
with the non-batch dims merged into one stride, which every tensor whose strides merge allows (a contiguous
tensor, a channel slice of one, a parameter dim of any stride); others (channels_last images, for one) are
copied. Outputs are contiguous.

Launch heuristic (no autotune): a program covers ``ROWS x BLOCK`` elements (samples x elements of a sample) with
``KP = next_pow2(K)`` parameter slots each, about ``TILE_VALUES = 512`` values per ``[elements, KP]`` tile
(``ELEMENTS = 512 / KP``, clamped to ``[16, 256]``): 4 values per thread in 4 warps for each of the per-bin tiles
the kernels keep live. ``BLOCK = min(next_pow2(N), ELEMENTS)`` and ``ROWS`` fills the rest with samples, so small
``N`` (2-D toy data) still fills a tile. The AOT check (``tests/kernels/aot_compile.py``) measures the cost in
registers, with 8 bins on sm_90 in float32 (Triton 3.9): 86 (forward) to 146 (reversible backward) per thread; 1024
values per tile took up to 209 when measured (half the warps per SM for the backward); no configuration spills.
Not timed on a GPU yet. Pointer offsets are int64.

The launchers take a ``wrap_triton`` callable applied to each kernel before its launch, as in
:mod:`fastflow.kernels.coupling` (``torch.library.wrap_triton`` when the ops are triton ops).
"""

# Triton types @triton.jit arguments at launch; Python annotations on them would change their meaning.
# ruff: noqa: ANN001, ANN201, ANN202

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from fastflow.kernels.aot import AotSpec
from fastflow.kernels.launch import cached_on_sizes, cdiv, launch_device, next_power_of_2

__all__ = [
    "FORWARD",
    "INVERSE",
    "REBUILD",
    "MODES",
    "NUM_WARPS",
    "rq_spline_fwd_kernel",
    "rq_spline_bwd_kernel",
    "rq_spline_forward",
    "rq_spline_backward",
    "aot_specs",
]

# constexpr globals: the kernels compare MODE with them
FORWARD, INVERSE, REBUILD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
MODES = {"forward": FORWARD.value, "inverse": INVERSE.value, "rebuild": REBUILD.value}
"""Backward modes: gradients of the forward at ``x``, of the inverse at ``y``, or of the forward from ``y``."""
NUM_WARPS = 4
TILE_VALUES = 512
_MIN_ELEMENTS, _MAX_ELEMENTS = 16, 256


@triton.jit
def _tile(pid, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Flat ``ROWS x BLOCK`` tile: per element its sample and index (int64), the mask, and the tile's place."""
    n_col_blocks = tl.cdiv(N, BLOCK)
    col_block = pid % n_col_blocks
    first_row = (pid // n_col_blocks) * ROWS
    e = tl.arange(0, ROWS * BLOCK)
    rows = first_row + e // BLOCK
    cols = col_block * BLOCK + e % BLOCK
    mask = (rows < B) & (cols < N)
    return rows.to(tl.int64), cols.to(tl.int64), mask, first_row, col_block, n_col_blocks


@triton.jit
def _raw_tiles(raw_ptr, offs, mask, r_sk, acc_ty, K: tl.constexpr, KP: tl.constexpr):
    """``[elements, KP]`` tiles of raw widths, heights and interior derivatives (0 in the padding). Offsets in
    int64: ``2K * r_sk`` passes 2^31 for a parameter stride (int32 when below it) of ``2^31 / 2K``."""
    j = tl.arange(0, KP)
    k64 = j.to(tl.int64)[None, :]
    base = raw_ptr + offs[:, None]
    in_bins = mask[:, None] & (j < K)[None, :]
    widths = tl.load(base + k64 * r_sk, mask=in_bins, other=0.0).to(acc_ty)
    heights = tl.load(base + (k64 + K) * r_sk, mask=in_bins, other=0.0).to(acc_ty)
    derivs = tl.load(base + (k64 + 2 * K) * r_sk, mask=mask[:, None] & (j < K - 1)[None, :], other=0.0).to(acc_ty)
    return j, widths, heights, derivs


@triton.jit
def _raw_nan(widths, heights, derivs):
    """Per element: whether any of its raw parameters (the padding is 0) is NaN."""
    nan = (widths != widths) | (heights != heights) | (derivs != derivs)
    return tl.max(nan.to(tl.int32), axis=1) > 0


@triton.jit
def _knots(raw, j, K: tl.constexpr, BOUND: tl.constexpr, MIN_SIZE: tl.constexpr):
    """Softmax ``p`` of raw bin sizes (0 in the padding), the bin sizes ``2 BOUND (MIN + (1 - K MIN) p)`` and the
    right knots, the last exactly ``BOUND``."""
    z = tl.where((j < K)[None, :], raw, float("-inf"))
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    size = (2.0 * BOUND) * (MIN_SIZE + (1.0 - K * MIN_SIZE) * p)
    right = tl.cumsum(size, axis=1) - BOUND
    return p, size, tl.where((j == K - 1)[None, :], BOUND, right)


@triton.jit
def _softplus(r):
    """``log(1 + exp(r))`` for any ``r``; ``log1p`` of tiny ``exp(-|r|)`` by Kahan's trick."""
    e = tl.exp(-tl.abs(r))
    d = 1.0 + e
    log1p_e = tl.where(d == 1.0, e, tl.log(d) * e / tl.where(d == 1.0, 1.0, d - 1.0))
    return tl.maximum(r, 0.0) + log1p_e


@triton.jit
def _sigmoid(r):
    e = tl.exp(-tl.abs(r))
    return tl.where(r >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _pick(tile, onehot):
    """The entry of each row of ``tile`` where ``onehot`` holds (a sum with one nonzero term: exact)."""
    return tl.sum(tl.where(onehot, tile, 0.0), axis=1)


@triton.jit
def _edges(right, size, k, at, before, BOUND: tl.constexpr):
    """Left knot, size and right knot of bin ``k``. The size is its own (relative error eps), not the difference
    of the knots, whose rounding (about ``K eps BOUND``) would be large next to a small bin's size."""
    return tl.where(k == 0, -BOUND, _pick(right, before)), _pick(size, at), _pick(right, at)


@triton.jit
def _between(v, lo, hi):
    """``v`` clamped to ``[lo, hi]``: results stay in their bin between its knots (so the map is monotone across
    bins and sends the bound to itself) however the rounding of ``lo + size`` falls; a NaN stays NaN."""
    return tl.minimum(tl.maximum(v, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _position_x(u, v, xl, w, xr):
    """``x`` at position ``u = 1 - v`` of its bin, from the nearer knot and kept between the knots."""
    return _between(tl.where(u > 0.5, xr - v * w, xl + u * w), xl, xr)


@triton.jit
def _position_y(v, s, d1, t, num, den, yl, h, yr):
    """``y`` at position ``u = 1 - v`` of its bin (``t``, ``num``, ``den`` from :func:`_rqs`), from the nearer
    knot in ``y`` (the inverse measures from the same one, so a round trip is consistent) and kept between the
    knots."""
    from_lo = h * num / den
    from_hi = h * (s * v * v + d1 * t) / den
    return _between(tl.where(from_hi < from_lo, yr - from_hi, yl + from_lo), yl, yr)


@triton.jit
def _root(e, h, s, d0, d1):
    """Root in ``[0, 1]`` of ``a u^2 + b u + c`` for the offset ``e = y - yl`` (module docstring), divided by the
    bin height ``h`` (coefficients free of the bound's scale: no overflow of ``b * b`` for large bounds), in its
    non-cancelling form; from the right knot, ``e = yr - y`` with ``d0``, ``d1`` swapped gives ``1 - u``; where
    ``a`` and ``b`` both cancel to rounding, the linearised root ``e / h``."""
    e = e / h
    kappa = d0 + d1 - 2.0 * s
    a = (s - d0) + e * kappa
    b = d0 - e * kappa
    c = -s * e
    disc = tl.maximum(b * b - 4.0 * a * c, 0.0)
    if disc.dtype == tl.float64:
        root = tl.sqrt(disc)
    else:
        root = tl.sqrt_rn(disc)  # the correctly rounded root (tl.sqrt is approximate in float32)
    pos = b >= 0.0
    numerator = tl.where(pos, 2.0 * c, root - b)
    denominator = tl.where(pos, -b - root, 2.0 * a)
    u = numerator / tl.where(denominator == 0.0, 1.0, denominator)
    # a and b cancelled to rounding (a flat bin between steep knots): the linearised root e / h (a + b = s)
    sane = ((denominator != 0.0) & (u >= -0.5) & (u <= 1.5)) | (u != u)  # a NaN parameter stays NaN
    return tl.where(sane, u, e)


@triton.jit
def _locate(
    val, j, widths, heights, derivs,
    K: tl.constexpr, BOUND: tl.constexpr, MIN_W: tl.constexpr, MIN_H: tl.constexpr, MIN_D: tl.constexpr,
    INVERSE: tl.constexpr,
):  # fmt: skip
    """Bin and position of ``val`` (``x``, or ``y`` when ``INVERSE``), with the knot quantities of its bin.

    Returns ``inside, k, at, before, pw, ph, xl, W, xr, yl, H, yr, s, d0, d1, u, v``: ``xr``, ``yr`` the right
    knots, ``at`` / ``before`` the one-hot masks of bins ``k`` and ``k - 1``, ``pw`` / ``ph`` the width / height
    softmaxes, ``v = 1 - u``. The position is measured from the nearer knot, so a knot or the bound maps to
    itself exactly, and in the inverse the offset stays small: from the right knot the mirrored spline (``v``
    from ``yr - y`` with ``d0``, ``d1`` swapped: the same rational function) is solved, whose quadratic's ``a``
    does not cancel terms of size ``H d`` (1e-3 relative with ``d = 1e4``).
    Outside the bound the quantities are those of the clamped value (finite; the callers mask them out).
    """
    pw, x_size, x_right = _knots(widths, j, K, BOUND, MIN_W)
    ph, y_size, y_right = _knots(heights, j, K, BOUND, MIN_H)
    d_right = tl.where((j == K - 1)[None, :], 1.0, MIN_D + _softplus(derivs))
    inside = (val >= -BOUND) & (val <= BOUND)
    vc = tl.minimum(tl.maximum(val, -BOUND), BOUND)
    interior = (j < K - 1)[None, :]
    if INVERSE:
        k = tl.sum(((y_right <= vc[:, None]) & interior).to(tl.int32), axis=1)
    else:
        k = tl.sum(((x_right <= vc[:, None]) & interior).to(tl.int32), axis=1)
    at = j[None, :] == k[:, None]
    before = j[None, :] == (k - 1)[:, None]
    xl, w, xr = _edges(x_right, x_size, k, at, before, BOUND)
    yl, h, yr = _edges(y_right, y_size, k, at, before, BOUND)
    d0 = tl.where(k == 0, 1.0, _pick(d_right, before))
    d1 = _pick(d_right, at)
    s = h / w
    if INVERSE:
        upper = yr - vc < vc - yl
        frac = _root(tl.where(upper, yr - vc, vc - yl), h, s, tl.where(upper, d1, d0), tl.where(upper, d0, d1))
    else:
        upper = xr - vc < vc - xl
        frac = tl.where(upper, xr - vc, vc - xl) / w
    frac = _between(frac, 0.0, 1.0)  # a NaN (from NaN raw parameters) stays NaN
    u = tl.where(upper, 1.0 - frac, frac)
    v = tl.where(upper, frac, 1.0 - frac)
    return inside, k, at, before, pw, ph, xl, w, xr, yl, h, yr, s, d0, d1, u, v


@triton.jit
def _rqs(u, v, s, d0, d1):
    """``t = u v``, the numerator and denominator ``D`` of ``(y - yl) / H``, and ``M`` (module docstring)."""
    t = u * v
    num = s * u * u + d0 * t
    den = s + (d0 + d1 - 2.0 * s) * t
    m = d1 * u * u + 2.0 * s * t + d0 * v * v
    return t, num, den, m


@triton.jit
def _log_slope_du(u, v, s, d0, d1, den, m):
    """``d(log dy/dx)/du = M_u / M - 2 D_u / D``."""
    m_u = 2.0 * (d1 * u + s * (v - u) - d0 * v)
    return m_u / m - 2.0 * (d0 + d1 - 2.0 * s) * (v - u) / den


@triton.jit
def _grads(u, v, s, d0, d1, h, t, num, den, m, gy, gl):
    """Gradients of ``gy y + gl log(dy/dx)`` w.r.t. ``u, s, d0, d1`` (at fixed ``yl, H``) and ``H`` (at fixed
    ``s``), from ``y - yl = H num / D``: ``d/du = s M / D^2``, ``d/ds = t (d1 u^2 - d0 v^2) / D^2``,
    ``d/dd0 = t (s v^2 + d1 t) / D^2``, ``d/dd1 = -num t / D^2`` (times ``H``; ``v = 1 - u``), and from
    ``log dy/dx = 2 log s + log M - 2 log D``: ``d/ds = 2 t ((d0 + d1) / (s D) + 1 / M)``,
    ``d/dd0 = v^2 / M - 2 t / D``, ``d/dd1 = u^2 / M - 2 t / D``."""
    inv_den = 1.0 / den
    inv_m = 1.0 / m
    hy = gy * h * inv_den * inv_den
    g_u = hy * s * m + gl * _log_slope_du(u, v, s, d0, d1, den, m)
    g_s = hy * t * (d1 * u * u - d0 * v * v) + gl * 2.0 * t * ((d0 + d1) * inv_den / s + inv_m)
    g_d0 = hy * t * (s * v * v + d1 * t) + gl * (v * v * inv_m - 2.0 * t * inv_den)
    g_d1 = -hy * num * t + gl * (u * u * inv_m - 2.0 * t * inv_den)
    return g_u, g_s, g_d0, g_d1, gy * num * inv_den


@triton.jit
def _size_grads(p, j, k, at, g_lo, g_size, SCALE: tl.constexpr, K: tl.constexpr):
    """Raw-size gradients of a loss through the left knot ``lo`` and size of bin ``k``: with
    ``g_i = g_lo [i < k] + g_size [i == k]`` (per unit of ``SCALE p_i``), ``SCALE p_i (g_i - sum_j p_j g_j)``,
    where ``1 - sum_{i<k} p_i`` and ``1 - p_k`` are summed, not subtracted."""
    below = j[None, :] < k[:, None]
    above_or_at = (j[None, :] >= k[:, None]) & (j < K)[None, :]
    p_k = _pick(p, at)
    p_below = tl.sum(tl.where(below, p, 0.0), axis=1)
    p_from_k = tl.sum(tl.where(above_or_at, p, 0.0), axis=1)
    # no ~at: Triton 3.2's interpreter cannot invert a bool block
    p_others = tl.sum(tl.where((j < K)[None, :], tl.where(at, 0.0, p), 0.0), axis=1)
    g_below = (g_lo * p_from_k - g_size * p_k)[:, None]
    g_at = (g_size * p_others - g_lo * p_below)[:, None]
    g_above = (-(g_lo * p_below + g_size * p_k))[:, None]
    return SCALE * p * tl.where(below, g_below, tl.where(at, g_at, g_above))


@triton.jit
def rq_spline_fwd_kernel(
    u_ptr, raw_ptr, out_ptr, part_ptr,
    B, N, u_sb, u_sn, r_sb, r_sn, r_sk,
    K: tl.constexpr, KP: tl.constexpr, BOUND: tl.constexpr,
    MIN_W: tl.constexpr, MIN_H: tl.constexpr, MIN_D: tl.constexpr,
    INVERSE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Forward (``u = x``, ``out = y``) or inverse (``u = y``, ``out = x``) of one tile and its log-det sums.

    ``out`` is dense ``(B, N)``; ``part[b, col_block]`` receives ``sum log dy/dx`` (negated when ``INVERSE``)
    in the compute dtype, which ``part`` sets.
    """
    acc_ty = part_ptr.dtype.element_ty
    rows, cols, mask, first_row, col_block, n_col_blocks = _tile(tl.program_id(0), B, N, ROWS, BLOCK)
    val = tl.load(u_ptr + rows * u_sb + cols * u_sn, mask=mask, other=0.0).to(acc_ty)
    j, widths, heights, derivs = _raw_tiles(raw_ptr, rows * r_sb + cols * r_sn, mask, r_sk, acc_ty, K, KP)
    inside, k, at, before, pw, ph, xl, w, xr, yl, h, yr, s, d0, d1, u, v = _locate(
        val, j, widths, heights, derivs, K, BOUND, MIN_W, MIN_H, MIN_D, INVERSE
    )
    t, num, den, m = _rqs(u, v, s, d0, d1)
    log_slope = 2.0 * tl.log(s / den) + tl.log(m)
    if INVERSE:
        out = _position_x(u, v, xl, w, xr)
        log_slope = -log_slope
    else:
        out = _position_y(v, s, d1, t, num, den, yl, h, yr)
    tl.store(out_ptr + rows * N + cols, tl.where(inside, out, val).to(out_ptr.dtype.element_ty), mask=mask)
    # outside the bound: 0, or NaN for a NaN input (the bound's comparisons send it there); NaN wherever a raw
    # parameter of the element is NaN, even one it does not read (outside the bound, another bin's derivative)
    log_slope = tl.where(inside & mask, log_slope, tl.where(val != val, val, 0.0))
    log_slope = tl.where(_raw_nan(widths, heights, derivs), float("nan"), log_slope)
    partial = tl.sum(tl.reshape(log_slope, (ROWS, BLOCK)), axis=1)
    r = first_row + tl.arange(0, ROWS)
    tl.store(part_ptr + r.to(tl.int64) * n_col_blocks + col_block, partial, mask=r < B)


@triton.jit
def rq_spline_bwd_kernel(
    u_ptr, raw_ptr, g_ptr, gl_ptr, gu_ptr, graw_ptr, x_ptr,
    B, N, u_sb, u_sn, r_sb, r_sn, r_sk, g_sb, g_sn, gl_sb,
    K: tl.constexpr, KP: tl.constexpr, BOUND: tl.constexpr,
    MIN_W: tl.constexpr, MIN_H: tl.constexpr, MIN_D: tl.constexpr,
    MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Input and raw gradients of one tile (``MODE``: :data:`FORWARD`, :data:`INVERSE` or :data:`REBUILD`).

    ``u`` is ``x`` (``FORWARD``) or ``y``; ``g`` the upstream gradient of the op's output and ``gl`` (``(B,)``,
    stride ``gl_sb``, setting the compute dtype) that of its log-det. ``gu`` (dense ``(B, N)``) receives the
    gradient w.r.t. ``u`` (for ``REBUILD`` w.r.t. the rebuilt ``x``, stored to ``x`` dense ``(B, N)``), ``graw``
    (dense ``(B, N, 3K - 1)``) that w.r.t. ``raw``.
    """
    acc_ty = gl_ptr.dtype.element_ty
    rows, cols, mask, first_row, col_block, n_col_blocks = _tile(tl.program_id(0), B, N, ROWS, BLOCK)
    val = tl.load(u_ptr + rows * u_sb + cols * u_sn, mask=mask, other=0.0).to(acc_ty)
    g = tl.load(g_ptr + rows * g_sb + cols * g_sn, mask=mask, other=0.0).to(acc_ty)
    gl = tl.load(gl_ptr + rows * gl_sb, mask=mask, other=0.0).to(acc_ty)
    j, widths, heights, derivs = _raw_tiles(raw_ptr, rows * r_sb + cols * r_sn, mask, r_sk, acc_ty, K, KP)
    # 0, or NaN for an element whose input or any raw parameter is NaN (its log-det is NaN): added to the upstream
    # gradients it makes every partial below NaN, so the element's input and raw gradients all are
    nan = tl.where((val != val) | _raw_nan(widths, heights, derivs), float("nan"), 0.0)
    inside, k, at, before, pw, ph, xl, w, xr, yl, h, yr, s, d0, d1, u, v = _locate(
        val, j, widths, heights, derivs, K, BOUND, MIN_W, MIN_H, MIN_D, MODE != FORWARD
    )
    t, num, den, m = _rqs(u, v, s, d0, d1)
    if MODE == INVERSE:
        # gradients of the inverse are the forward's for upstream (-gy, -gl), gy = (gx - gl L_x) / (dy/dx)
        g_in = (g - gl * _log_slope_du(u, v, s, d0, d1, den, m) / w) * (den * den) / (s * s * m)
        gy = tl.where(inside, -g_in, 0.0) + nan
        gl_fwd = tl.where(inside, -gl, 0.0) + nan
    else:
        gy = tl.where(inside, g, 0.0) + nan
        gl_fwd = tl.where(inside, gl, 0.0) + nan
    g_u, g_s, g_d0, g_d1, g_h = _grads(u, v, s, d0, d1, h, t, num, den, m, gy, gl_fwd)
    g_x = g_u / w
    g_w = -(g_u * u + g_s * s) / w
    g_h += g_s / w
    if MODE == INVERSE:
        g_out = tl.where(inside, g_in, g) + nan
    else:
        g_out = tl.where(inside, g_x, g) + nan
    dense = rows * N + cols
    tl.store(gu_ptr + dense, g_out.to(gu_ptr.dtype.element_ty), mask=mask)
    grad_w = _size_grads(pw, j, k, at, -g_x, g_w, 2.0 * BOUND * (1.0 - K * MIN_W), K)
    grad_h = _size_grads(ph, j, k, at, gy, g_h, 2.0 * BOUND * (1.0 - K * MIN_H), K)
    # raw_d[j] is the derivative at knot j + 1: bin j's right end (d1 of bin k = j) and the next bin's left (d0);
    # the others get 0 (NaN for a NaN element)
    grad_d = _sigmoid(derivs) * tl.where(at, g_d1[:, None], tl.where(before, g_d0[:, None], nan[:, None]))
    out_ty = graw_ptr.dtype.element_ty
    ptrs = graw_ptr + dense[:, None] * (3 * K - 1) + j[None, :]
    in_bins = mask[:, None] & (j < K)[None, :]
    tl.store(ptrs, grad_w.to(out_ty), mask=in_bins)
    tl.store(ptrs + K, grad_h.to(out_ty), mask=in_bins)
    tl.store(ptrs + 2 * K, grad_d.to(out_ty), mask=mask[:, None] & (j < K - 1)[None, :])
    if MODE == REBUILD:
        x = tl.where(inside, _position_x(u, v, xl, w, xr), val)
        tl.store(x_ptr + dense, x.to(x_ptr.dtype.element_ty), mask=mask)


def _launch_directly(kernel: Any) -> Any:
    """The default ``wrap_triton`` of the launchers: launch the kernel itself."""
    return kernel


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bins(raw: torch.Tensor) -> int:
    params = raw.shape[-1]
    assert params % 3 == 2, f"raw's last dim must be 3K - 1, got {params}"
    return (params + 1) // 3


@cached_on_sizes
def _tile_sizes(batch: int, n: int, bins: int) -> tuple[int, int, int]:
    """``(KP, ROWS, BLOCK)`` of the launch heuristic described in the module docstring."""
    kp = next_power_of_2(bins)
    elements = max(_MIN_ELEMENTS, min(_MAX_ELEMENTS, TILE_VALUES // kp))
    block = min(next_power_of_2(n), elements)
    return kp, min(elements // block, next_power_of_2(batch)), block


def _merged_stride(t: torch.Tensor, dims: range) -> int | None:
    """The stride of ``t``'s dims ``dims`` (consecutive) merged into one, or None where they do not merge."""
    return _merged_stride_of(tuple(t.shape), t.stride(), dims.start, dims.stop)


@cached_on_sizes
def _merged_stride_of(shape: tuple[int, ...], stride: tuple[int, ...], start: int, stop: int) -> int | None:
    """:func:`_merged_stride` on a shape and strides (cached: it runs per launch)."""
    kept = [d for d in range(start, stop) if shape[d] != 1]
    if any(stride[outer] != stride[inner] * shape[inner] for outer, inner in zip(kept, kept[1:])):
        return None
    return stride[kept[-1]] if kept else 1


def _strided(t: torch.Tensor, dims: range) -> tuple[torch.Tensor, list[int]]:
    """``t`` (a dense copy where its dims ``dims`` do not merge) and its strides with those dims merged.

    The kernels get ``t`` itself, never a view of it: a traced launch (``wrap_triton``) may take every pointer as
    written, and AOTAutograd cannot partition a graph that writes into views of its inputs.
    """
    stride = _merged_stride(t, dims)
    if stride is None:
        t = t.contiguous()
        stride = _merged_stride(t, dims)
    outer, inner = [t.stride(d) for d in range(dims.start)], [t.stride(d) for d in range(dims.stop, t.dim())]
    return t, [*outer, stride, *inner]


def _elements_per_sample(u: torch.Tensor, raw: torch.Tensor) -> int:
    """``N``, the elements of a sample of ``u``, ``raw`` being ``(*u.shape, 3K - 1)``."""
    assert raw.shape == (*u.shape, raw.shape[-1]), (raw.shape, u.shape)
    n = u.numel() // u.shape[0]
    if n >= 2**31 - _MAX_ELEMENTS:
        raise ValueError(f"spline kernels index a sample with int32, got {n} elements per sample")
    return n


def _constexprs(bins: int, bound: float, min_width: float, min_height: float, min_derivative: float) -> dict[str, Any]:
    return {
        "K": bins,
        "BOUND": float(bound),
        "MIN_W": float(min_width),
        "MIN_H": float(min_height),
        "MIN_D": float(min_derivative),
    }


def rq_spline_forward(
    u: torch.Tensor,
    raw: torch.Tensor,
    bound: float,
    min_width: float,
    min_height: float,
    min_derivative: float,
    inverse: bool,
    wrap_triton: Callable[[Any], Any] = _launch_directly,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``(y, logdet)`` of ``u = x``, or inverse ``(x, -logdet)`` of ``u = y``, in one pass.

    ``u`` is ``(B, ...)``, ``raw`` ``(B, ..., 3K - 1)`` of the same dtype and device, any strides. The output is
    contiguous in ``u``'s shape and dtype; ``logdet`` is ``(B,)`` float32 (float64 for float64 inputs).
    """
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    batch, acc = u.shape[0], _compute_dtype(u.dtype)
    if u.numel() == 0:
        return out, torch.zeros(batch, dtype=acc, device=u.device)
    bins = _bins(raw)
    n = _elements_per_sample(u, raw)
    (u_arg, u_strides), (raw_arg, raw_strides) = _strided(u, range(1, u.dim())), _strided(raw, range(1, u.dim()))
    kp, rows, block = _tile_sizes(batch, n, bins)
    n_col_blocks = cdiv(n, block)
    partial = torch.empty(batch, n_col_blocks, dtype=acc, device=u.device)  # every slot is written
    grid = (cdiv(batch, rows) * n_col_blocks,)
    with launch_device(u):
        wrap_triton(rq_spline_fwd_kernel)[grid](
            u_arg, raw_arg, out, partial, batch, n, *u_strides, *raw_strides,
            KP=kp, INVERSE=inverse, ROWS=rows, BLOCK=block, num_warps=NUM_WARPS,
            **_constexprs(bins, bound, min_width, min_height, min_derivative),
        )  # fmt: skip
    return out, partial.sum(dim=1)


def rq_spline_backward(
    u: torch.Tensor,
    raw: torch.Tensor,
    grad: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    bound: float,
    min_width: float,
    min_height: float,
    min_derivative: float,
    mode: str,
    wrap_triton: Callable[[Any], Any] = _launch_directly,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(grad_u, grad_raw, x)`` in one pass; ``mode`` is a key of :data:`MODES`.

    ``"forward"``: ``u = x``, gradients of the forward for upstream ``grad`` (of ``y``) and ``grad_logdet``.
    ``"inverse"``: ``u = y``, gradients of the inverse for upstream ``grad`` (of ``x``) and ``grad_logdet`` (of
    ``-logdet``). ``"rebuild"``: ``u = y``, ``x`` rebuilt and returned (else None) with the forward's gradients
    at it. ``grad`` matches ``u``; ``grad_logdet`` is ``(B,)`` or None (zero). Outputs are contiguous in ``u``'s
    dtype, ``grad_raw`` shaped like ``raw``.
    """
    code = MODES[mode]
    acc, batch = _compute_dtype(u.dtype), u.shape[0]
    if grad_logdet is None:
        grad_logdet = torch.zeros((), dtype=acc, device=u.device).expand(batch)
    grad_u = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    grad_raw = torch.empty(raw.shape, dtype=u.dtype, device=u.device)
    x = torch.empty(u.shape, dtype=u.dtype, device=u.device) if mode == "rebuild" else None
    if u.numel() == 0:
        return grad_u, grad_raw, x
    bins = _bins(raw)
    n = _elements_per_sample(u, raw)
    (u_arg, u_strides), (raw_arg, raw_strides) = _strided(u, range(1, u.dim())), _strided(raw, range(1, u.dim()))
    g_arg, g_strides = _strided(grad, range(1, u.dim()))
    kp, rows, block = _tile_sizes(batch, n, bins)
    grid = (cdiv(batch, rows) * cdiv(n, block),)
    gl = grad_logdet.to(acc)
    # an unused slot gets an input, never another output: a traced launch may take every pointer as written
    with launch_device(u):
        wrap_triton(rq_spline_bwd_kernel)[grid](
            u_arg, raw_arg, g_arg, gl, grad_u, grad_raw, u_arg if x is None else x,
            batch, n, *u_strides, *raw_strides, *g_strides, gl.stride(0),
            KP=kp, MODE=code, ROWS=rows, BLOCK=block, num_warps=NUM_WARPS,
            **_constexprs(bins, bound, min_width, min_height, min_derivative),
        )  # fmt: skip
    return grad_u, grad_raw, x


_CONSTEXPRS = ("K", "KP", "BOUND", "MIN_W", "MIN_H", "MIN_D", "INVERSE", "MODE", "ROWS", "BLOCK")


def _signature(kernel: Any, elem: str) -> dict[str, str]:
    """``triton.compile`` signature: ``elem`` data pointers, log-det pointers in the compute dtype."""
    acc = "fp64" if elem == "fp64" else "fp32"

    def arg_type(name: str) -> str:
        if name in _CONSTEXPRS:
            return "constexpr"
        if name.endswith("_ptr"):
            return f"*{acc}" if name in ("part_ptr", "gl_ptr") else f"*{elem}"
        return "i32"

    return {name: arg_type(name) for name in kernel.arg_names}


def _tabular_launch(
    kernel: Any, bins: int, batch: int = 256, features: int = 16
) -> tuple[dict[str, Any], dict[str, int]]:
    """Constexprs and integer arguments of a tabular launch: contiguous ``x`` ``(batch, features)``, ``raw``
    ``(batch, features, 3K - 1)`` (a network output viewed per feature), a dense upstream gradient."""
    kp, rows, block = _tile_sizes(batch, features, bins)
    p = 3 * bins - 1
    ints = [batch, features, features, 1, features * p, p, 1]
    if kernel is rq_spline_bwd_kernel:
        ints += [features, 1, 1]
    names = [n for n in kernel.arg_names if not n.endswith("_ptr") and n not in _CONSTEXPRS]
    assert len(names) == len(ints), (names, ints)
    constexprs = {"KP": kp, "ROWS": rows, "BLOCK": block, **_constexprs(bins, 3.0, 1e-3, 1e-3, 1e-3)}
    return constexprs, dict(zip(names, ints))


def aot_specs() -> list[AotSpec]:
    """Launch configurations to compile ahead of time for a GPU target: a tabular launch (``(256, 16)`` features,
    the default bound and minimums) in every direction and backward mode with 8 bins in float32 and bfloat16 and
    with 16 and 32 bins (the most the ops launch: ``fastflow.ops.spline.KERNEL_MAX_BINS``) in float32; the
    forward and its backward with 3 bins in float32 (padded tiles) and with 8 bins in float64 (gradient checks on
    GPU), which need only compile. The others must not spill."""
    every_mode = (
        (rq_spline_fwd_kernel, "INVERSE", (False, True)),
        (rq_spline_bwd_kernel, "MODE", tuple(MODES.values())),
    )
    forward_only = ((rq_spline_fwd_kernel, "INVERSE", (False,)), (rq_spline_bwd_kernel, "MODE", (FORWARD.value,)))
    variants = (("fp32", 8, every_mode), ("bf16", 8, every_mode), ("fp32", 16, every_mode), ("fp32", 32, every_mode))
    variants += (("fp32", 3, forward_only), ("fp64", 8, forward_only))
    specs = []
    for elem, bins, kernels in variants:
        for kernel, flag, values in kernels:
            constexprs, ints = _tabular_launch(kernel, bins)
            signature = _signature(kernel, elem)
            for value in values:
                specs.append(AotSpec(kernel, signature, {**constexprs, flag: value}, NUM_WARPS, elem != "fp64", ints))
    return specs
