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

``logdet[b] = sum_n log s[b, n]`` (the inverse stores ``-logdet``). Each program reduces its tile into one
float32/float64 slot of a ``(B, n_col_blocks)`` partial buffer that the launcher sums: deterministic, no
atomics.
The reversible backward receives ``y`` instead of ``x``: it rebuilds ``x`` with the inverse in registers,
stores it, and uses ``(x + t) * s = y`` (Glow) and ``x * s = y - t`` (RealNVP) in the gradients.

Bytes moved per element (``E`` = element size; the per-sample log-det terms are negligible):

=====================  ==========================  ==========================  =================
kernel                  Glow (sigmoid)              RealNVP (exp)               NICE (additive)
=====================  ==========================  ==========================  =================
forward / inverse       4E: x, t, r -> y            4E: x, t, r -> y            3E: x, t -> y
backward                7E: x, t, r, gy -> gx,gt,gr  6E: x, r, gy -> gx,gt,gr    3E: gy -> gx, gt
reversible backward     8E: y, t, r, gy -> x, 3 g   8E: y, t, r, gy -> x, 3 g   5E: y, t, gy -> x, gx, gt
=====================  ==========================  ==========================  =================

Layout: every input keeps its own strides. The non-batch dims are ordered by the first input's strides
(outermost first) and merged where every input allows it, so a channel slice ``h[:, :C]`` of a contiguous
NCHW tensor is one strided run per sample and a channels_last slice is two (pixels x channels). Outputs are
allocated dense in that order (contiguous for NCHW inputs, channels_last for channels_last inputs). Only
inputs that need more than three strided runs per sample are copied.

Launch heuristic (no autotune): a program covers a ``ROWS x BLOCK`` tile of about ``TILE = 1024`` elements:
``BLOCK = min(next_pow2(N), TILE)`` elements of a sample and ``ROWS = TILE // BLOCK`` samples, so large images
get 1024-element strips and tiny per-sample sizes (2-D toy data) still fill a tile; 4 warps give 8 elements
per thread, the Triton tutorials' setting for streaming kernels. The 1-D grid has
``cdiv(B, ROWS) * cdiv(N, BLOCK)`` programs. Element indices within a sample are int32 (``N < 2**31``);
every pointer offset is int64.
"""

# Triton types @triton.jit arguments at launch; Python annotations on them would change their meaning.
# ruff: noqa: ANN001, ANN201, ANN202

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from fastflow.kernels.aot import AotSpec

__all__ = [
    "SIGMOID",
    "EXP",
    "ADDITIVE",
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

SIGMOID, EXP, ADDITIVE = 0, 1, 2
SCALE_CODES = {"sigmoid": SIGMOID, "exp": EXP, "additive": ADDITIVE}
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
def _load(ptr, offs, mask, acc_ty):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(acc_ty)


@triton.jit
def _store(ptr, offs, value, mask):
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_parts(r):
    """``s``, ``1 - s``, ``log s`` and ``1 / s`` for ``s = sigmoid(r + 2)``, from one exp and one log."""
    z = r + 2.0
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
def _tanh(r):
    """tanh from exp(-2|r|) <= 1: no overflow for any r."""
    e = tl.exp(-2.0 * tl.abs(r))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(r < 0.0, -th, th)


@triton.jit
def coupling_fwd_kernel(
    u_ptr, t_ptr, r_ptr, out_ptr, part_ptr,
    B, N, S1, S2,
    u_sb, u_s0, u_s1, u_s2,
    t_sb, t_s0, t_s1, t_s2,
    r_sb, r_s0, r_s1, r_s2,
    SCALE: tl.constexpr, INVERSE: tl.constexpr,
    NDIM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Forward (``u = x``, ``out = y``) or inverse (``u = y``, ``out = x``) of one tile, and its log-det sums.

    ``out`` is dense ``(B, N)`` in iteration order; ``part[b, col_block]`` receives ``sum log s`` (negated
    when ``INVERSE``) unless ``SCALE == 2``; its dtype is the compute dtype.
    """
    acc_ty = part_ptr.dtype.element_ty
    rows, cols, col_block, mask = _tile(tl.program_id(0), B, N, ROWS, BLOCK)
    i0, i1, i2 = _split(cols, S1, S2, NDIM)
    u = _load(u_ptr, _offsets(rows, i0, i1, i2, u_sb, u_s0, u_s1, u_s2, NDIM), mask, acc_ty)
    t = _load(t_ptr, _offsets(rows, i0, i1, i2, t_sb, t_s0, t_s1, t_s2, NDIM), mask, acc_ty)
    out_offs = rows[:, None] * N + cols.to(tl.int64)[None, :]
    if SCALE == 2:
        if INVERSE:
            _store(out_ptr, out_offs, u - t, mask)
        else:
            _store(out_ptr, out_offs, u + t, mask)
    else:
        r = _load(r_ptr, _offsets(rows, i0, i1, i2, r_sb, r_s0, r_s1, r_s2, NDIM), mask, acc_ty)
        if SCALE == 0:
            s, one_minus_s, log_s, inv_s = _sigmoid_parts(r)
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
        _store(out_ptr, out_offs, out, mask)
        partial = tl.sum(tl.where(mask, log_s, 0.0), axis=1)
        if INVERSE:
            partial = -partial
        tl.store(part_ptr + rows * tl.cdiv(N, BLOCK) + col_block, partial, mask=rows < B)


@triton.jit
def coupling_bwd_kernel(
    u_ptr, t_ptr, r_ptr, gy_ptr, gl_ptr, gx_ptr, gt_ptr, gr_ptr, x_ptr,
    B, N, S1, S2,
    u_sb, u_s0, u_s1, u_s2,
    t_sb, t_s0, t_s1, t_s2,
    r_sb, r_s0, r_s1, r_s2,
    g_sb, g_s0, g_s1, g_s2,
    gl_sb,
    SCALE: tl.constexpr, REBUILD: tl.constexpr,
    NDIM: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Gradients of the forward w.r.t. ``x``, ``t`` and ``r`` for one tile.

    ``u`` is the forward input ``x``, or its output ``y`` when ``REBUILD`` (reversible backprop): then ``x``
    is rebuilt and stored to ``x_ptr``. ``gl`` is ``(B,)`` with stride ``gl_sb`` and sets the compute dtype.
    Outputs are dense ``(B, N)`` in iteration order; ``gr`` is not written for ``SCALE == 2``.
    """
    acc_ty = gl_ptr.dtype.element_ty
    rows, cols, col_block, mask = _tile(tl.program_id(0), B, N, ROWS, BLOCK)
    i0, i1, i2 = _split(cols, S1, S2, NDIM)
    gy = _load(gy_ptr, _offsets(rows, i0, i1, i2, g_sb, g_s0, g_s1, g_s2, NDIM), mask, acc_ty)
    out_offs = rows[:, None] * N + cols.to(tl.int64)[None, :]
    if SCALE == 2:
        if REBUILD:
            u = _load(u_ptr, _offsets(rows, i0, i1, i2, u_sb, u_s0, u_s1, u_s2, NDIM), mask, acc_ty)
            t = _load(t_ptr, _offsets(rows, i0, i1, i2, t_sb, t_s0, t_s1, t_s2, NDIM), mask, acc_ty)
            _store(x_ptr, out_offs, u - t, mask)
        _store(gx_ptr, out_offs, gy, mask)
        _store(gt_ptr, out_offs, gy, mask)
    else:
        u = _load(u_ptr, _offsets(rows, i0, i1, i2, u_sb, u_s0, u_s1, u_s2, NDIM), mask, acc_ty)
        r = _load(r_ptr, _offsets(rows, i0, i1, i2, r_sb, r_s0, r_s1, r_s2, NDIM), mask, acc_ty)
        gl = tl.load(gl_ptr + rows * gl_sb, mask=rows < B, other=0.0).to(acc_ty)[:, None]
        if SCALE == 0 or REBUILD:
            t = _load(t_ptr, _offsets(rows, i0, i1, i2, t_sb, t_s0, t_s1, t_s2, NDIM), mask, acc_ty)
        if SCALE == 0:
            s, one_minus_s, log_s, inv_s = _sigmoid_parts(r)
            if REBUILD:
                _store(x_ptr, out_offs, u * inv_s - t, mask)
                xt_s = u
            else:
                xt_s = (u + t) * s
            gx = gy * s
            _store(gx_ptr, out_offs, gx, mask)
            _store(gt_ptr, out_offs, gx, mask)
            _store(gr_ptr, out_offs, one_minus_s * (gy * xt_s + gl), mask)
        else:
            log_s = _tanh(r)
            if REBUILD:
                x_s = u - t
                _store(x_ptr, out_offs, x_s * tl.exp(-log_s), mask)
            else:
                x_s = u * tl.exp(log_s)
            _store(gx_ptr, out_offs, gy * tl.exp(log_s), mask)
            _store(gt_ptr, out_offs, gy, mask)
            _store(gr_ptr, out_offs, (1.0 - log_s * log_s) * (gy * x_s + gl), mask)


class _Runs(NamedTuple):
    """A sample's elements as at most three strided runs: sizes ``(S0, S1, S2)`` and per-input strides."""

    ndim: int
    sizes: tuple[int, int, int]
    strides: list[tuple[int, int, int, int]]


def _inner_order(x: torch.Tensor) -> list[int]:
    """Non-batch dims of ``x``, outermost in memory first (stable for ties)."""
    return sorted(range(1, x.dim()), key=lambda d: -x.stride(d))


def empty_in_order(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Empty tensor shaped like ``x``, dense in ``x``'s memory order of non-batch dims, batch outermost."""
    order = [0, *_inner_order(x)]
    out = torch.empty([x.shape[d] for d in order], dtype=dtype or x.dtype, device=x.device)
    return out.permute([order.index(d) for d in range(x.dim())])


def _runs(inputs: list[torch.Tensor], order: list[int]) -> _Runs | None:
    """Merge the dims in ``order`` into runs every input can stride through; None if more than three."""
    shape = inputs[0].shape
    sizes: list[int] = []
    strides: list[list[int]] = [[] for _ in inputs]  # innermost stride of each run, per input
    for d in (d for d in order if shape[d] != 1):
        if sizes and all(st[-1] == t.stride(d) * shape[d] for st, t in zip(strides, inputs)):
            sizes[-1] *= shape[d]
            for st, t in zip(strides, inputs):
                st[-1] = t.stride(d)
        else:
            sizes.append(shape[d])
            for st, t in zip(strides, inputs):
                st.append(t.stride(d))
    if len(sizes) > _MAX_RUNS:
        return None
    pad = _MAX_RUNS - len(sizes)
    padded = [(t.stride(0), *st, *[0] * pad) for st, t in zip(strides, inputs)]
    return _Runs(max(len(sizes), 1), (*sizes, *[1] * pad), padded)  # type: ignore[arg-type]


def _prepare(inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], _Runs]:
    """Inputs and their runs; inputs are copied (dense in the first one's order) only beyond three runs."""
    order = _inner_order(inputs[0])
    runs = _runs(inputs, order)
    if runs is None:
        inputs = [empty_in_order(inputs[0], t.dtype).copy_(t) for t in inputs]
        runs = _runs(inputs, order)
        assert runs is not None
    return inputs, runs


def _block_sizes(batch: int, n: int) -> tuple[int, int]:
    """``(ROWS, BLOCK)`` of the launch heuristic described in the module docstring."""
    block = min(triton.next_power_of_2(n), TILE)
    return min(TILE // block, triton.next_power_of_2(batch)), block


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_args(inputs: list[torch.Tensor], runs: _Runs) -> list[int]:
    """``B, N, S1, S2`` and every input's four strides, in kernel argument order."""
    batch = inputs[0].shape[0]
    n = inputs[0].numel() // batch
    if n >= 2**31 - TILE:
        raise ValueError(f"coupling kernels index a sample with int32, got {n} elements per sample")
    return [batch, n, runs.sizes[1], runs.sizes[2], *(s for st in runs.strides for s in st)]


def coupling_forward(
    u: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor | None, scale: int, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``(y, logdet)`` of ``u = x``, or inverse ``(x, -logdet)`` of ``u = y``, in one pass.

    ``u``, ``shift`` and ``raw`` share shape ``(B, ...)``, dtype and device, with any strides; ``raw`` is
    ignored (may be None) for ``scale == ADDITIVE``. The output has ``u``'s dtype, dense in ``u``'s memory
    order; ``logdet`` is ``(B,)`` float32 (float64 for float64 inputs).
    """
    out = empty_in_order(u)
    batch = u.shape[0]
    if u.numel() == 0:
        return out, torch.zeros(batch, dtype=_compute_dtype(u.dtype), device=u.device)
    inputs, runs = _prepare([u, shift, shift if raw is None else raw])
    rows, block = _block_sizes(batch, u.numel() // batch)
    n_col_blocks = triton.cdiv(u.numel() // batch, block)
    partial = torch.zeros(batch, n_col_blocks, dtype=_compute_dtype(u.dtype), device=u.device)
    grid = (triton.cdiv(batch, rows) * n_col_blocks,)
    coupling_fwd_kernel[grid](
        *inputs, out, partial, *_launch_args(inputs, runs),
        SCALE=scale, INVERSE=inverse, NDIM=runs.ndim, ROWS=rows, BLOCK=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out, partial.sum(dim=1)


def coupling_backward(
    u: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor | None,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    scale: int,
    rebuild: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x, grad_shift, grad_raw, x)`` of the coupling forward in one pass.

    ``u`` is the forward input ``x``, or the forward output ``y`` when ``rebuild`` (then ``x`` is rebuilt and
    returned, else None). ``grad_y`` matches ``u``; ``grad_logdet`` is ``(B,)`` or None (zero). ``grad_raw``
    is None for ``scale == ADDITIVE``. Outputs have ``u``'s dtype, dense in ``u``'s memory order.
    """
    acc = _compute_dtype(u.dtype)
    batch = u.shape[0]
    if grad_logdet is None:
        grad_logdet = torch.zeros((), dtype=acc, device=u.device).expand(batch)
    grad_x, grad_shift = empty_in_order(u), empty_in_order(u)
    grad_raw = None if scale == ADDITIVE else empty_in_order(u)
    x = empty_in_order(u) if rebuild else None
    if u.numel() == 0:
        return grad_x, grad_shift, grad_raw, x
    inputs, runs = _prepare([u, shift, shift if raw is None else raw, grad_y])
    rows, block = _block_sizes(batch, u.numel() // batch)
    grid = (triton.cdiv(batch, rows) * triton.cdiv(u.numel() // batch, block),)
    gl = grad_logdet.to(acc)
    coupling_bwd_kernel[grid](
        *inputs, gl, grad_x, grad_shift, grad_x if grad_raw is None else grad_raw, grad_x if x is None else x,
        *_launch_args(inputs, runs), gl.stride(0),
        SCALE=scale, REBUILD=rebuild, NDIM=runs.ndim, ROWS=rows, BLOCK=block, num_warps=NUM_WARPS,
    )  # fmt: skip
    return grad_x, grad_shift, grad_raw, x


_CONSTEXPRS = ("SCALE", "INVERSE", "REBUILD", "NDIM", "ROWS", "BLOCK")


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


def _glow_launch_ints(kernel: Any) -> dict[str, int]:
    """The integer arguments of ``kernel`` in Glow's usual launch: ``x_b`` a channel slice of a contiguous
    ``(16, 96, 32, 32)`` activation, ``shift``/``raw`` the two halves of the network output, a dense upstream
    gradient and a ``(B,)`` log-det gradient. Computed by the launcher's own helpers on CPU tensors."""
    h, net = torch.empty(16, 96, 32, 32), torch.empty(16, 96, 32, 32)
    inputs = [h[:, 48:], *net.chunk(2, dim=1)]
    if kernel is coupling_bwd_kernel:
        inputs.append(torch.empty(16, 48, 32, 32))
    inputs, runs = _prepare(inputs)
    values = _launch_args(inputs, runs) + ([1] if kernel is coupling_bwd_kernel else [])  # gl_sb
    names = [n for n in kernel.arg_names if not n.endswith("_ptr") and n not in _CONSTEXPRS]
    assert len(names) == len(values), (names, values)
    return dict(zip(names, values))


def aot_specs() -> list[AotSpec]:
    """Launch configurations of every kernel here, to compile ahead of time for a GPU target.

    Every ``SCALE`` and direction for Glow's usual launch (a channel slice of an NCHW tensor: one run per
    sample, 1024-element strips) in float32 and bfloat16, and in float32 with int64 strides and three runs
    (channels_last slices of huge tensors) and bfloat16 with two runs and 64 samples per tile; float64
    (gradcheck on GPU) with one element per sample, which need only compile (the others must not spill).
    """
    variants = (  # the first two are Glow's usual launch, compiled with its integer arguments
        ("fp32", "i32", {"NDIM": 1, "ROWS": 1, "BLOCK": TILE}, (False, True), True),
        ("bf16", "i32", {"NDIM": 1, "ROWS": 1, "BLOCK": TILE}, (False, True), True),
        ("fp32", "i64", {"NDIM": 3, "ROWS": 1, "BLOCK": TILE}, (False, True), False),
        ("bf16", "i32", {"NDIM": 2, "ROWS": 64, "BLOCK": 16}, (False, True), False),
        ("fp64", "i32", {"NDIM": 1, "ROWS": TILE, "BLOCK": 1}, (False,), False),
    )
    glow_ints = {kernel: _glow_launch_ints(kernel) for kernel in (coupling_fwd_kernel, coupling_bwd_kernel)}
    specs = []
    for elem, int_type, tile, flags, glow_launch in variants:
        for scale in (SIGMOID, EXP, ADDITIVE):
            for flag in flags:
                for kernel, flag_name in ((coupling_fwd_kernel, "INVERSE"), (coupling_bwd_kernel, "REBUILD")):
                    constexprs = {**tile, "SCALE": scale, flag_name: flag}
                    signature = _signature(kernel, elem, int_type)
                    ints = glow_ints[kernel] if glow_launch else None
                    specs.append(AotSpec(kernel, signature, constexprs, NUM_WARPS, elem != "fp64", ints))
    return specs
