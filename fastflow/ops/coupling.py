"""Affine and additive coupling transforms on the half ``x_b`` that the coupling network does not see.

Math (per element, ``t`` = shift, ``r`` = raw scale from the network):
- Glow (``scale="sigmoid"``): ``s = sigmoid(r + 2)``, ``y = (x + t) * s``, inverse ``x = y / s - t``.
- RealNVP (``scale="exp"``): ``log s = tanh(r)``, ``y = x * s + t``, inverse ``x = (y - t) / s``.
- Jet (``scale="sigmoid2"``): ``s = 2 * sigmoid(r)``, ``log s = logsigmoid(r) + log 2``, ``y = (x + t) * s``,
  inverse ``x = y / s - t``; ``s = 1`` at ``r = 0``, so a zero-initialised network starts at the identity.
- NICE (additive): ``y = x + t``, inverse ``x = y - t``, log-det 0.
Log-det per sample: ``sum(log s)`` over every non-batch element (negated for the inverse), float32 for
half inputs. Inputs have any shape ``(B, ...)``; ``shift`` and ``raw`` match ``x_b``.

Channel split: with ``b_start`` every function takes the whole coupling input ``x`` of shape ``(B, C, ...)``
instead of ``x_b`` and returns the whole output: channels ``[b_start, b_start + C_b)`` (``C_b`` those of
``shift``) are ``x_b``, the other channels pass through unchanged. The fused kernels write the pass-through
channels in the same pass (no ``torch.cat``, and the backward writes the whole ``grad_x``); the eager twins
split and concatenate.

Derivatives (``gy = dL/dy``, ``gl = dL/dlogdet`` per sample) computed by the fused backward:
- Glow: ``gx = gt = gy * s``, ``gr = (1 - s) * (gy * (x + t) * s + gl)``.
- Jet: ``gx = gt = gy * s``, ``gr = (1 - sigmoid(r)) * (gy * (x + t) * s + gl)``.
- RealNVP: ``gx = gy * s``, ``gt = gy``, ``gr = (1 - tanh(r) ** 2) * (gy * x * s + gl)``.
- NICE: ``gx = gt = gy``.
``gt`` is handed out as the very tensor ``gx`` (Glow, Jet, NICE) or ``gy`` (RealNVP), or a view of its transformed
channels, never stored twice; the NICE backward launches nothing.

Dispatch: the public functions run the eager references (autograd through ATen) on the ``"eager"`` backend
and the torch.library ops ``fastflow::coupling_fwd`` / ``fastflow::coupling_inv`` (fused Triton kernels of
:mod:`fastflow.kernels.coupling`, with autograd) on ``"triton"`` / ``"interpret"``. The forward's backward
is the fused op ``fastflow::coupling_bwd``, saving ``x_b``, ``shift`` and ``raw`` (not ``s``; nothing for
NICE); the inverse's backward is eager math. Neither is differentiable again. The log-det reduction is
deterministic (per-tile partial sums, no atomics), so no ``deterministic`` switch is needed.

Registration (:data:`fastflow.ops._registration.TRACEABLE`): where torch has ``torch.library.triton_op``
(2.6+) and is built with CUDA, and Triton is installed and its kernels are compiled (not ``TRITON_INTERPRET``),
the ops are triton ops that launch through ``torch.library.wrap_triton``: ``torch.compile`` traces into them
and Inductor schedules the kernels among their neighbours. Otherwise (older torch, a CPU build, or the CPU
interpreter, whose kernels Inductor cannot run) they are opaque ``torch.library.custom_op`` ops with fake
kernels. ``torch.compile(fullgraph=True)`` traces either without a graph break.

Reversible backprop: :func:`affine_coupling_backward_from_output` (and its additive twin) take the forward
*output* ``y_b`` and return the rebuilt ``x_b`` with all input gradients in one fused pass;
:func:`affine_coupling_backward_from_output_` writes them over its inputs instead.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F

from fastflow.backend import resolve_backend
from fastflow.ops._checks import (
    cast,
    check_channel_slice,
    check_float_tensor,
    check_same_shape,
    float_tensors_on_one_device,
    logdet_dtype,
    upcasts,
)
from fastflow.ops._registration import TRACEABLE, direct_autograd, kernel_function, registration, use_library_op
from fastflow.ops.overlap import share_elements

__all__ = [
    "ScaleKind",
    "affine_coupling",
    "affine_coupling_inverse",
    "additive_coupling",
    "additive_coupling_inverse",
    "affine_coupling_ref",
    "affine_coupling_inverse_ref",
    "additive_coupling_ref",
    "additive_coupling_inverse_ref",
    "affine_coupling_backward_from_output",
    "affine_coupling_backward_from_output_ref",
    "affine_coupling_backward_from_output_",
    "additive_coupling_backward_from_output",
    "additive_coupling_backward_from_output_ref",
]

ScaleKind = Literal["sigmoid", "exp", "sigmoid2"]
SCALE_KINDS = ("sigmoid", "exp", "sigmoid2")
_LOG2 = math.log(2.0)


def _channels(x: torch.Tensor, b_start: int, count: int) -> torch.Tensor:
    """Channels ``[b_start, b_start + count)`` of ``x`` (a view)."""
    return x.narrow(1, b_start, count)


def _channel_parts(x: torch.Tensor, b_start: int, count: int) -> tuple[torch.Tensor, ...]:
    """``(before, x_b, after)``: channels ``[0, b_start)``, ``[b_start, b_start + count)`` and the rest, as one
    split (views; its backward is one ``cat`` where a slice per part would each build a zero tensor)."""
    return x.split([b_start, count, x.shape[1] - b_start - count], dim=1)


def _joined(before: torch.Tensor, part: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``cat([before, part, after])`` along the channels, leaving out empty parts (no node for them backward)."""
    return torch.cat([t for t in (before, part, after) if t.shape[1]], dim=1)


def _with_channels(x: torch.Tensor, part: torch.Tensor, b_start: int) -> torch.Tensor:
    """``x`` with channels ``[b_start, b_start + part.shape[1])`` replaced by ``part`` (a new tensor)."""
    before, _, after = _channel_parts(x, b_start, part.shape[1])
    return _joined(before, part, after)


def _log_scale(raw: torch.Tensor, scale: str) -> torch.Tensor:
    """``log s`` per element: ``logsigmoid(raw + 2)`` (Glow), ``tanh(raw)`` (RealNVP) or
    ``logsigmoid(raw) + log 2`` (Jet); the one place the eager math writes it (the kernels write it in Triton)."""
    if scale == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    if scale == "sigmoid2":
        return F.logsigmoid(raw) + _LOG2
    return torch.tanh(raw)


def _log_scale_and_slope(raw: torch.Tensor, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log s, d log s / d raw)``: the slope is ``1 - s = sigmoid(-(raw + 2))`` (Glow),
    ``1 - tanh(raw) ** 2`` (RealNVP) or ``1 - sigmoid(raw) = sigmoid(-raw)`` (Jet)."""
    log_s = _log_scale(raw, scale)
    if scale == "sigmoid":
        return log_s, torch.sigmoid(-2.0 - raw)  # -(raw + 2) to the bit, one op
    if scale == "sigmoid2":
        return log_s, torch.sigmoid(-raw)
    return log_s, 1.0 - log_s * log_s


def _per_sample_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return cast(t, dtype).reshape(t.shape[0], math.prod(t.shape[1:])).sum(dim=1)


def affine_coupling_ref(
    x_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    scale: str = "sigmoid",
    upcast: bool = False,
    b_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager forward: ``(y_b, logdet)``; ``upcast`` computes in float32 and casts ``y_b`` back. With
    ``b_start``: ``(y, logdet)`` of the whole input (module docstring)."""
    if b_start is not None:
        before, part, after = _channel_parts(x_b, b_start, shift.shape[1])
        y_b, logdet = affine_coupling_ref(part, shift, raw, scale, upcast)
        return _joined(before, y_b, after), logdet
    out_dtype = x_b.dtype
    if upcast:
        x_b, shift, raw = (cast(t, logdet_dtype(out_dtype)) for t in (x_b, shift, raw))
    log_s = _log_scale(raw, scale)
    y_b = x_b * torch.exp(log_s) + shift if scale == "exp" else (x_b + shift) * torch.exp(log_s)
    return cast(y_b, out_dtype), _per_sample_sum(log_s, logdet_dtype(out_dtype))


def affine_coupling_inverse_ref(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    scale: str = "sigmoid",
    upcast: bool = False,
    b_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager inverse: ``(x_b, -logdet)``; with ``b_start`` of the whole output."""
    if b_start is not None:
        before, part, after = _channel_parts(y_b, b_start, shift.shape[1])
        x_b, neg_logdet = affine_coupling_inverse_ref(part, shift, raw, scale, upcast)
        return _joined(before, x_b, after), neg_logdet
    out_dtype = y_b.dtype
    if upcast:
        y_b, shift, raw = (cast(t, logdet_dtype(out_dtype)) for t in (y_b, shift, raw))
    log_s = _log_scale(raw, scale)
    x_b = (y_b - shift) * torch.exp(-log_s) if scale == "exp" else y_b * torch.exp(-log_s) - shift
    return cast(x_b, out_dtype), -_per_sample_sum(log_s, logdet_dtype(out_dtype))


def additive_coupling_ref(
    x_b: torch.Tensor, shift: torch.Tensor, b_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager additive forward: ``(x_b + shift, 0)``; with ``b_start`` of the whole input."""
    if b_start is not None:
        before, part, after = _channel_parts(x_b, b_start, shift.shape[1])
        y_b, zero = additive_coupling_ref(part, shift)
        return _joined(before, y_b, after), zero
    return x_b + shift, x_b.new_zeros(x_b.shape[0], dtype=logdet_dtype(x_b.dtype))


def additive_coupling_inverse_ref(
    y_b: torch.Tensor, shift: torch.Tensor, b_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager additive inverse: ``(y_b - shift, 0)``; with ``b_start`` of the whole output."""
    if b_start is not None:
        before, part, after = _channel_parts(y_b, b_start, shift.shape[1])
        x_b, zero = additive_coupling_inverse_ref(part, shift)
        return _joined(before, x_b, after), zero
    return y_b - shift, y_b.new_zeros(y_b.shape[0], dtype=logdet_dtype(y_b.dtype))


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(B,)`` vector shaped to broadcast against ``like`` ``(B, ...)``."""
    return v.reshape(-1, *[1] * (like.dim() - 1))


def affine_coupling_backward_from_output_ref(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None = None,
    scale: str = "sigmoid",
    upcast: bool = False,
    b_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reversible backward: ``(x_b, grad_x, grad_shift, grad_raw)`` from the forward output ``y_b``.

    ``x_b`` is the inverse of ``y_b``; the gradients are those of :func:`affine_coupling_ref` at ``x_b`` for
    upstream gradients ``grad_y`` (like ``y_b``) and ``grad_logdet`` (``(B,)`` or None for zero), written
    with ``(x + t) * s = y`` (Glow, Jet) and ``x * s = y - t`` (RealNVP). ``upcast`` computes in float32. With
    ``b_start``, ``y_b`` and ``grad_y`` are whole and so are the rebuilt ``x`` and ``grad_x`` (``grad_y`` on
    the pass-through channels). ``x_b``, ``grad_x`` and ``grad_raw`` are new tensors; ``grad_shift`` is ``grad_x``
    (``grad_y`` for ``"exp"``) or its transformed channels, as on the kernel path (no copy).
    """
    if b_start is not None:
        count = shift.shape[1]
        x_b, grad_x, _, grad_raw = affine_coupling_backward_from_output_ref(
            _channels(y_b, b_start, count), shift, raw, _channels(grad_y, b_start, count), grad_logdet, scale, upcast
        )
        grad_x = _with_channels(grad_y, grad_x, b_start)
        grad_shift = _channels(grad_y if scale == "exp" else grad_x, b_start, count)
        return _with_channels(y_b, x_b, b_start), grad_x, grad_shift, grad_raw
    out_dtype = y_b.dtype
    if upcast:
        y_b, shift, raw, grad_y = (cast(t, logdet_dtype(out_dtype)) for t in (y_b, shift, raw, grad_y))
    gl = 0.0 if grad_logdet is None else _per_sample(cast(grad_logdet, y_b.dtype), y_b)
    log_s, slope = _log_scale_and_slope(raw, scale)
    s = log_s.exp_()  # s in place of log s: one temporary fewer
    if scale == "exp":  # y = x * s + t: x = (y - t) / s, the raw gradient reads y - t
        y_b = y_b - shift
        x_b = y_b / s
    else:  # y = (x + t) * s: x = y / s - t
        x_b = (y_b / s).sub_(shift)
    grad_raw = (grad_y * y_b).add_(gl).mul_(slope)
    grad_x = cast(grad_y * s, out_dtype)
    grad_shift = cast(grad_y, out_dtype) if scale == "exp" else grad_x
    return cast(x_b, out_dtype), grad_x, grad_shift, cast(grad_raw, out_dtype)


def _backward_from_output_in_place_ref(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    scale: str,
) -> None:
    """:func:`affine_coupling_backward_from_output_ref` (float32 / float64, no ``b_start``) written over its
    inputs, with the same operations in the same order (bit-identical results) and at most three scratch
    tensors of their size alive at once."""
    gl = 0.0 if grad_logdet is None else _per_sample(cast(grad_logdet, y_b.dtype), y_b)
    log_s, grad_raw = _log_scale_and_slope(raw, scale)
    s = log_s.exp_()
    if scale == "exp":  # y = x * s + t: x = (y - t) / s, the raw gradient reads y - t
        y_b.sub_(shift)
    grad_raw.mul_(torch.mul(grad_y, y_b).add_(gl))
    raw.copy_(grad_raw)
    del grad_raw
    y_b.div_(s)
    if scale == "exp":
        shift.copy_(grad_y)  # grad_shift = grad_y
    else:  # y = (x + t) * s: x = y / s - t
        y_b.sub_(shift)
    grad_y.mul_(s)
    if scale != "exp":
        shift.copy_(grad_y)  # grad_shift = grad_x


def additive_coupling_backward_from_output_ref(
    y_b: torch.Tensor, shift: torch.Tensor, grad_y: torch.Tensor, b_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reversible additive backward: ``(y_b - shift, grad_x, grad_shift)`` with ``grad_x`` a new copy of
    ``grad_y`` and ``grad_shift`` that copy (its transformed channels with ``b_start``, when the first two are
    whole), as on the kernel path."""
    grad_x = grad_y.clone()
    if b_start is not None:
        x, _ = additive_coupling_inverse_ref(y_b, shift, b_start)
        return x, grad_x, _channels(grad_x, b_start, shift.shape[1])
    return y_b - shift, grad_x, grad_x


def _inverse_grads(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    grad_x: torch.Tensor,
    grad_neg_logdet: torch.Tensor | None,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_y, grad_shift, grad_raw)`` of the affine ``x = inverse(y)`` and its log-det ``-sum(log s)``.

    Eager math in float32 (float64 for float64 inputs), returned in ``y_b``'s dtype.
    Glow ``x = y / s - t``: ``gy = gx / s``, ``gt = -gx``, ``gr = -(1 - s) * (gx * y / s + gl)``; Jet the same
    with the slope ``1 - sigmoid(r)`` for ``1 - s``.
    RealNVP ``x = (y - t) / s``: ``gy = -gt = gx / s``, ``gr = -(1 - tanh(r) ** 2) * (gx * x + gl)``.
    (NICE ``x = y - t``: ``gy = gx``, ``gt = -gx``, written by its caller.)
    """
    dtype = y_b.dtype
    acc = logdet_dtype(dtype)
    y_b, shift, raw, grad_x = (cast(t, acc) for t in (y_b, shift, raw, grad_x))
    gl = 0.0 if grad_neg_logdet is None else _per_sample(cast(grad_neg_logdet, acc), y_b)
    log_s, slope = _log_scale_and_slope(raw, kind)
    grad_y = grad_x * torch.exp(-log_s)
    if kind == "exp":  # x = (y - t) / s
        grad_shift, grad_raw = -grad_y, -slope * (grad_y * (y_b - shift) + gl)
    else:  # x = y / s - t
        grad_shift, grad_raw = -grad_x, -slope * (grad_y * y_b + gl)
    return cast(grad_y, dtype), cast(grad_shift, dtype), cast(grad_raw, dtype)


class _CouplingOps(NamedTuple):
    """The fused ops of one registration (:func:`_define_ops`), or their direct twins (:func:`_direct_ops`)."""

    fwd: Any
    inv: Any
    bwd: Any


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]
) -> None:
    u, shift, raw, kind, b_start = inputs
    if kind != "additive":  # the additive gradients need no saved tensor
        ctx.save_for_backward(u, shift, raw)
    ctx.kind, ctx.b_start, ctx.b_channels = kind, b_start, shift.shape[1]
    # an unused output's gradient arrives as None, not as a zero-filled tensor (the NICE log-det: a launch)
    ctx.set_materialize_grads(False)


def _forward_backward(bwd: Any) -> Any:
    """The forward's backward, running the fused backward ``bwd`` (the op ``coupling_bwd`` or its direct twin)."""

    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor | None, grad_logdet: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
        if ctx.kind == "additive":
            grad_x, grad_raw = grad_y, None
        else:
            x, shift, raw = ctx.saved_tensors
            grad_y = torch.zeros_like(x) if grad_y is None else grad_y
            grad_x, grad_raw = bwd(x, shift, raw, grad_y, grad_logdet, ctx.kind, False, ctx.b_start)
        # one tensor, not two equal ones: autograd adds rather than accumulates in place into a shared one
        grad_shift = grad_y if ctx.kind == "exp" else grad_x
        if ctx.b_start is not None and grad_shift is not None:
            grad_shift = _channels(grad_shift, ctx.b_start, ctx.b_channels)
        return grad_x, grad_shift, grad_raw, None, None

    return backward


def _inverse_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_x: torch.Tensor | None, grad_neg_logdet: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None]:
    """The inverse's backward (eager math, :func:`_inverse_grads`)."""
    b_start = ctx.b_start
    if ctx.kind == "additive":
        if grad_x is None:
            return None, None, None, None, None
        grad_x_b = grad_x if b_start is None else _channels(grad_x, b_start, ctx.b_channels)
        return grad_x, -grad_x_b, None, None, None
    y, shift, raw = ctx.saved_tensors
    grad_x = torch.zeros_like(y) if grad_x is None else grad_x
    grad_x_b = grad_x if b_start is None else _channels(grad_x, b_start, ctx.b_channels)
    y_b = y if b_start is None else _channels(y, b_start, ctx.b_channels)
    grad_y_b, grad_shift, grad_raw = _inverse_grads(y_b, shift, raw, grad_x_b, grad_neg_logdet, ctx.kind)
    grad_y = grad_y_b if b_start is None else _with_channels(grad_x, grad_y_b, b_start)
    return grad_y, grad_shift, grad_raw, None, None


def _define_ops(namespace: str, traceable: bool) -> _CouplingOps:
    """Register ``{namespace}::coupling_fwd``, ``coupling_inv`` and ``coupling_bwd`` with their autograd.

    ``traceable``: as ``torch.library.triton_op`` launching through ``torch.library.wrap_triton`` (its fake
    kernel is the op itself, traced with fake tensors); else as ``torch.library.custom_op`` with the fake
    kernels below. Both give the same schemas, results, strides and gradients. The package's ops are
    ``_define_ops("fastflow", TRACEABLE)``; tests build the other registration under another namespace.
    """
    define, launch = registration(traceable)
    if traceable:
        # bound by name here: triton_op scans the op's source for the kernels it launches (torch.compile's
        # caches key on their source), following calls by name into the launchers
        from fastflow.kernels.coupling import coupling_backward, coupling_forward
    else:
        coupling_forward, coupling_backward = (
            kernel_function("coupling", "coupling_forward"),
            kernel_function("coupling", "coupling_backward"),
        )
    empty_in_order = kernel_function("coupling", "empty_in_order")

    # Optional[...] rather than "X | None" in the op signatures: torch infers the schema from these strings
    # and must evaluate them on Python 3.9 too
    @define(f"{namespace}::coupling_fwd", mutates_args=())
    def fwd(
        u: torch.Tensor, shift: torch.Tensor, raw: Optional[torch.Tensor], kind: str, b_start: Optional[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused forward ``(y, logdet)``; ``kind`` is ``"sigmoid"``, ``"exp"``, ``"sigmoid2"`` or ``"additive"``
        (raw None)."""
        return coupling_forward(u, shift, raw, kind, False, b_start, **launch)

    @define(f"{namespace}::coupling_inv", mutates_args=())
    def inv(
        u: torch.Tensor, shift: torch.Tensor, raw: Optional[torch.Tensor], kind: str, b_start: Optional[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused inverse ``(x, -logdet)``."""
        return coupling_forward(u, shift, raw, kind, True, b_start, **launch)

    @define(f"{namespace}::coupling_bwd", mutates_args=())
    def bwd(
        u: torch.Tensor,
        shift: torch.Tensor,
        raw: Optional[torch.Tensor],
        grad_y: torch.Tensor,
        grad_logdet: Optional[torch.Tensor],
        kind: str,
        rebuild: bool,
        b_start: Optional[int],
    ) -> list[torch.Tensor]:
        """Fused backward ``[grad_x, grad_raw (not for "additive"), x (only if rebuild)]``.

        ``u`` is the forward input, or the forward output when ``rebuild``; ``grad_shift`` is not computed
        (module docstring). The additive kernel runs only with ``rebuild``.
        """
        outs = coupling_backward(u, shift, raw, grad_y, grad_logdet, kind, rebuild, b_start, **launch)
        return [t for t in outs if t is not None]

    if not traceable:

        @fwd.register_fake
        @inv.register_fake
        def coupling_fake(
            u: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor | None, kind: str, b_start: int | None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return empty_in_order(u), u.new_empty(u.shape[0], dtype=logdet_dtype(u.dtype))

        @bwd.register_fake
        def bwd_fake(
            u: torch.Tensor,
            shift: torch.Tensor,
            raw: torch.Tensor | None,
            grad_y: torch.Tensor,
            grad_logdet: torch.Tensor | None,
            kind: str,
            rebuild: bool,
            b_start: int | None,
        ) -> list[torch.Tensor]:
            grad_raw = [] if kind == "additive" else [empty_in_order(u, shape=shift.shape)]
            return [empty_in_order(u), *grad_raw, *([empty_in_order(u)] if rebuild else [])]

    fwd.register_autograd(_forward_backward(bwd), setup_context=_setup_context)
    inv.register_autograd(_inverse_backward, setup_context=_setup_context)
    return _CouplingOps(fwd, inv, bwd)


def _direct_ops() -> _CouplingOps:
    """The direct twins of the ops (:func:`fastflow.ops._registration.direct_autograd`): the same launchers,
    ``setup_context`` and backwards, without ``torch.library``'s dispatch."""
    coupling_forward = kernel_function("coupling", "coupling_forward")
    coupling_backward = kernel_function("coupling", "coupling_backward")

    def fwd(
        u: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor | None, kind: str, b_start: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return coupling_forward(u, shift, raw, kind, False, b_start)

    def inv(
        u: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor | None, kind: str, b_start: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return coupling_forward(u, shift, raw, kind, True, b_start)

    def bwd(*args: Any) -> list[torch.Tensor]:
        return [t for t in coupling_backward(*args) if t is not None]

    return _CouplingOps(
        direct_autograd(fwd, _setup_context, _forward_backward(bwd), name="coupling"),
        direct_autograd(inv, _setup_context, _inverse_backward, name="coupling inverse"),
        bwd,
    )


_OPS = _define_ops("fastflow", TRACEABLE)
# called by their torch.ops names, which every supported torch traces
_LIBRARY = _CouplingOps(
    torch.ops.fastflow.coupling_fwd, torch.ops.fastflow.coupling_inv, torch.ops.fastflow.coupling_bwd
)
_DIRECT = _direct_ops()


def _ops() -> _CouplingOps:
    """The ``torch.library`` ops while tracing or under a dispatch mode, else their direct twins."""
    return _LIBRARY if use_library_op() else _DIRECT


def _use_kernel(x: torch.Tensor) -> bool:
    return resolve_backend(x) != "eager"


def _check_shift(x_name: str, x: torch.Tensor, shift: torch.Tensor, b_start: int | None) -> None:
    check_float_tensor(x_name, x, min_dim=2)
    check_float_tensor("shift", shift)
    if b_start is None:
        check_same_shape("shift", shift, x_name, x)
    else:
        check_channel_slice("shift", shift, x_name, x, "b_start", b_start)


def _affine_args_fit(x: object, shift: object, raw: object, scale: object, b_start: object) -> bool:
    """Whether :func:`_check_affine_args` passes, tested in one call (a layer's every forward): float tensors of one
    dtype and device, ``raw`` shaped as ``shift``, ``shift`` as ``x`` or as its channels from ``b_start``."""
    if not (scale in SCALE_KINDS and float_tensors_on_one_device(x, shift, raw)):
        return False
    x_shape, shift_shape = x.shape, shift.shape  # type: ignore[attr-defined]
    if not (x.dtype == shift.dtype == raw.dtype and raw.shape == shift_shape and len(x_shape) >= 2):  # type: ignore
        return False
    if b_start is None:
        return shift_shape == x_shape
    return (
        type(b_start) is int
        and len(shift_shape) == len(x_shape)
        and shift_shape[0] == x_shape[0]
        and shift_shape[2:] == x_shape[2:]
        and 0 <= b_start <= b_start + shift_shape[1] <= x_shape[1]
    )


def _check_affine_args(
    x_name: str, x: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: str, b_start: int | None
) -> None:
    if _affine_args_fit(x, shift, raw, scale, b_start):
        return
    _check_shift(x_name, x, shift, b_start)
    check_same_shape("raw", check_float_tensor("raw", raw), "shift", shift)
    if scale not in SCALE_KINDS:
        raise ValueError(f"scale must be one of {SCALE_KINDS}, got {scale!r}")


def _check_upstream(grad_y: torch.Tensor, grad_logdet: torch.Tensor | None, y_b: torch.Tensor) -> None:
    check_same_shape("grad_y", check_float_tensor("grad_y", grad_y), "y_b", y_b)
    if grad_logdet is None:
        return
    check_float_tensor("grad_logdet", grad_logdet)
    if tuple(grad_logdet.shape) != (y_b.shape[0],):
        raise ValueError(f"grad_logdet must have shape ({y_b.shape[0]},), got {tuple(grad_logdet.shape)}")
    if grad_logdet.device != y_b.device:
        raise ValueError(f"grad_logdet must be on {y_b.device} like y_b, got {grad_logdet.device}")


def affine_coupling(
    x_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    scale: ScaleKind = "sigmoid",
    b_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling forward ``(y_b, logdet)`` on the backend chosen by :mod:`fastflow.backend`.

    ``x_b``, ``shift`` and ``raw`` share shape ``(B, ...)``, a float dtype and a device, with any strides;
    ``y_b`` has ``x_b``'s dtype (channels_last when ``x_b`` is), ``logdet`` is ``(B,)`` float32 (float64
    for float64). With ``b_start``, ``x_b`` is the whole input ``(B, C, ...)``, transformed on channels
    ``[b_start, b_start + shift.shape[1])``, and ``y_b`` the whole output (module docstring). Differentiable in
    all three tensors. float16 / bfloat16 inputs are computed in float32 on every backend, rounded once.
    """
    _check_affine_args("x_b", x_b, shift, raw, scale, b_start)
    if _use_kernel(x_b):
        return _ops().fwd(x_b, shift, raw, scale, b_start)
    return affine_coupling_ref(x_b, shift, raw, scale, upcasts(x_b), b_start)


def affine_coupling_inverse(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    scale: ScaleKind = "sigmoid",
    b_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling inverse ``(x_b, -logdet)`` on the chosen backend; shapes as :func:`affine_coupling`."""
    _check_affine_args("y_b", y_b, shift, raw, scale, b_start)
    if _use_kernel(y_b):
        return _ops().inv(y_b, shift, raw, scale, b_start)
    return affine_coupling_inverse_ref(y_b, shift, raw, scale, upcasts(y_b), b_start)


def additive_coupling(
    x_b: torch.Tensor, shift: torch.Tensor, b_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (NICE) coupling forward ``(y_b, 0)`` on the chosen backend; ``b_start`` as in
    :func:`affine_coupling`."""
    _check_shift("x_b", x_b, shift, b_start)
    if _use_kernel(x_b):
        return _ops().fwd(x_b, shift, None, "additive", b_start)
    return additive_coupling_ref(x_b, shift, b_start)


def additive_coupling_inverse(
    y_b: torch.Tensor, shift: torch.Tensor, b_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (NICE) coupling inverse ``(y_b - shift, 0)`` on the chosen backend."""
    _check_shift("y_b", y_b, shift, b_start)
    if _use_kernel(y_b):
        return _ops().inv(y_b, shift, None, "additive", b_start)
    return additive_coupling_inverse_ref(y_b, shift, b_start)


def affine_coupling_backward_from_output(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    scale: ScaleKind = "sigmoid",
    b_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reversible backward ``(x_b, grad_x, grad_shift, grad_raw)`` from the forward output ``y_b``.

    Rebuilds ``x_b = inverse(y_b)`` and returns the gradients of :func:`affine_coupling` at ``x_b`` for
    upstream ``grad_y`` (like ``y_b``) and ``grad_logdet`` (``(B,)``, or None for zero); one fused pass on the
    Triton backends. With ``b_start``, ``y_b``, ``grad_y`` and the returned ``x_b``, ``grad_x`` are whole (the
    pass-through channels of ``grad_x`` are those of ``grad_y``). ``x_b``, ``grad_x`` and ``grad_raw`` are new
    tensors; ``grad_shift`` may be ``grad_x`` or ``grad_y`` or a view of their transformed channels, so update
    ``grad_x`` in place only outside them. Not differentiable (meant for a reversible container's backward).
    """
    _check_affine_args("y_b", y_b, shift, raw, scale, b_start)
    _check_upstream(grad_y, grad_logdet, y_b)
    if not _use_kernel(y_b):
        return affine_coupling_backward_from_output_ref(
            y_b, shift, raw, grad_y, grad_logdet, scale, upcasts(y_b), b_start
        )
    grad_x, grad_raw, x_b = _ops().bwd(y_b, shift, raw, grad_y, grad_logdet, scale, True, b_start)
    grad_shift = grad_y if scale == "exp" else grad_x
    if b_start is not None:
        grad_shift = _channels(grad_shift, b_start, shift.shape[1])
    return x_b, grad_x, grad_shift, grad_raw


def affine_coupling_backward_from_output_(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    scale: ScaleKind = "sigmoid",
) -> None:
    """:func:`affine_coupling_backward_from_output` written over its inputs: ``y_b`` becomes ``x_b``, ``grad_y``
    ``grad_x``, ``shift`` ``grad_shift`` and ``raw`` ``grad_raw`` (four distinct, non-overlapping tensors the caller
    owns, none requiring grad, such as halves a reversible walk gathered; ``grad_logdet`` must not overlap them).

    The eager path (float32 / float64) computes in place with at most three scratch tensors of their size, so the
    results take no new memory, and gives the eager twin's results bit for bit. The Triton backends, and half
    dtypes, run the fused (or eager) op and copy its results over: there is no in-place kernel, so on those the
    op's outputs exist beside the inputs until copied. Not differentiable.
    """
    _check_affine_args("y_b", y_b, shift, raw, scale, None)
    _check_upstream(grad_y, grad_logdet, y_b)
    named = (("y_b", y_b), ("shift", shift), ("raw", raw), ("grad_y", grad_y))
    for name, t in named:
        if t.requires_grad:
            raise ValueError(f"{name} requires grad: the in-place backward writes over it (pass a detached tensor)")
    for i, (name, t) in enumerate(named):  # one written over another would corrupt both
        for other, u in named[:i]:
            if share_elements(t, u):
                raise ValueError(f"{name} and {other} share memory: pass four tensors that do not overlap")
    for name, t in named if grad_logdet is not None else ():  # read after the first writes
        if share_elements(grad_logdet, t):
            raise ValueError(f"grad_logdet and {name} share memory: the in-place backward would overwrite it")
    if not _use_kernel(y_b) and y_b.dtype in (torch.float32, torch.float64):
        _backward_from_output_in_place_ref(y_b, shift, raw, grad_y, grad_logdet, scale)
        return
    x_b, grad_x, grad_shift, grad_raw = affine_coupling_backward_from_output(
        y_b, shift, raw, grad_y, grad_logdet, scale
    )
    shift.copy_(grad_shift)  # first: grad_shift may be grad_y itself ("exp")
    raw.copy_(grad_raw)
    y_b.copy_(x_b)
    grad_y.copy_(grad_x)


def additive_coupling_backward_from_output(
    y_b: torch.Tensor, shift: torch.Tensor, grad_y: torch.Tensor, b_start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reversible additive backward ``(y_b - shift, grad_y, grad_y)`` on the chosen backend: the first two are
    new tensors (whole with ``b_start``), the last may be the second (its transformed channels with
    ``b_start``), as in :func:`affine_coupling_backward_from_output`."""
    _check_shift("y_b", y_b, shift, b_start)
    _check_upstream(grad_y, None, y_b)
    if not _use_kernel(y_b):
        return additive_coupling_backward_from_output_ref(y_b, shift, grad_y, b_start)
    grad_x, x_b = _ops().bwd(y_b, shift, None, grad_y, None, "additive", True, b_start)
    return x_b, grad_x, grad_x if b_start is None else _channels(grad_x, b_start, shift.shape[1])
