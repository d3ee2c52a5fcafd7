"""Affine and additive coupling transforms on the half ``x_b`` that the coupling network does not see.

Math (per element, ``t`` = shift, ``r`` = raw scale from the network):
- Glow (``scale="sigmoid"``): ``s = sigmoid(r + 2)``, ``y = (x + t) * s``, inverse ``x = y / s - t``.
- RealNVP (``scale="exp"``): ``log s = tanh(r)``, ``y = x * s + t``, inverse ``x = (y - t) / s``.
- NICE (additive): ``y = x + t``, inverse ``x = y - t``, log-det 0.
Log-det per sample: ``sum(log s)`` over every non-batch element (negated for the inverse), float32 for
half inputs. Inputs have any shape ``(B, ...)``; ``shift`` and ``raw`` match ``x_b``.

Derivatives (``gy = dL/dy``, ``gl = dL/dlogdet`` per sample) computed by the fused backward:
- Glow: ``gx = gt = gy * s``, ``gr = (1 - s) * (gy * (x + t) * s + gl)``.
- RealNVP: ``gx = gy * s``, ``gt = gy``, ``gr = (1 - tanh(r) ** 2) * (gy * x * s + gl)``.
- NICE: ``gx = gt = gy``.

Dispatch: the public functions run the eager references (autograd through ATen) on the ``"eager"`` backend
and the torch.library custom ops ``fastflow::coupling_fwd`` / ``fastflow::coupling_inv`` (fused Triton
kernels of :mod:`fastflow.kernels.coupling`, fake kernels and autograd registered so
``torch.compile(fullgraph=True)`` traces them) on ``"triton"`` / ``"interpret"``. The forward's backward is
the fused custom op ``fastflow::coupling_bwd``, saving ``x_b``, ``shift`` and ``raw`` (not ``s``); the
inverse's backward is eager math. Neither is differentiable again. The log-det reduction is deterministic
(per-tile partial sums, no atomics), so no ``deterministic`` switch is needed.

Reversible backprop: :func:`affine_coupling_backward_from_output` (and its additive twin) take the forward
*output* ``y_b`` and return the rebuilt ``x_b`` with all input gradients in one fused pass.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fastflow.backend import resolve_backend
from fastflow.ops._checks import check_float_tensor, check_same_shape, logdet_dtype

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
    "additive_coupling_backward_from_output",
    "additive_coupling_backward_from_output_ref",
]

ScaleKind = Literal["sigmoid", "exp"]
SCALE_KINDS = ("sigmoid", "exp")


def _log_scale(raw: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "sigmoid":
        return F.logsigmoid(raw + 2.0)
    return torch.tanh(raw)


def _per_sample_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).reshape(t.shape[0], -1).sum(dim=1)


def affine_coupling_ref(
    x_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: str = "sigmoid", upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager forward: ``(y_b, logdet)``; ``upcast`` computes in float32 and casts ``y_b`` back."""
    out_dtype = x_b.dtype
    if upcast:
        x_b, shift, raw = (t.to(logdet_dtype(out_dtype)) for t in (x_b, shift, raw))
    log_s = _log_scale(raw, scale)
    y_b = (x_b + shift) * torch.exp(log_s) if scale == "sigmoid" else x_b * torch.exp(log_s) + shift
    return y_b.to(out_dtype), _per_sample_sum(log_s, logdet_dtype(out_dtype))


def affine_coupling_inverse_ref(
    y_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: str = "sigmoid", upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager inverse: ``(x_b, -logdet)``."""
    out_dtype = y_b.dtype
    if upcast:
        y_b, shift, raw = (t.to(logdet_dtype(out_dtype)) for t in (y_b, shift, raw))
    log_s = _log_scale(raw, scale)
    x_b = y_b * torch.exp(-log_s) - shift if scale == "sigmoid" else (y_b - shift) * torch.exp(-log_s)
    return x_b.to(out_dtype), -_per_sample_sum(log_s, logdet_dtype(out_dtype))


def additive_coupling_ref(x_b: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager additive forward: ``(x_b + shift, 0)``."""
    return x_b + shift, x_b.new_zeros(x_b.shape[0], dtype=logdet_dtype(x_b.dtype))


def additive_coupling_inverse_ref(y_b: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager additive inverse: ``(y_b - shift, 0)``."""
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reversible backward: ``(x_b, grad_x, grad_shift, grad_raw)`` from the forward output ``y_b``.

    ``x_b`` is the inverse of ``y_b``; the gradients are those of :func:`affine_coupling_ref` at ``x_b`` for
    upstream gradients ``grad_y`` (like ``y_b``) and ``grad_logdet`` (``(B,)`` or None for zero), written
    with ``(x + t) * s = y`` (Glow) and ``x * s = y - t`` (RealNVP). ``upcast`` computes in float32.
    """
    out_dtype = y_b.dtype
    if upcast:
        y_b, shift, raw, grad_y = (t.to(logdet_dtype(out_dtype)) for t in (y_b, shift, raw, grad_y))
    x_b, _ = affine_coupling_inverse_ref(y_b, shift, raw, scale)
    gl = 0.0 if grad_logdet is None else _per_sample(grad_logdet.to(y_b.dtype), y_b)
    if scale == "sigmoid":
        s = torch.sigmoid(raw + 2.0)
        grad_x, grad_shift = grad_y * s, grad_y * s
        grad_raw = torch.sigmoid(-(raw + 2.0)) * (grad_y * y_b + gl)
    else:
        log_s = torch.tanh(raw)
        grad_x, grad_shift = grad_y * torch.exp(log_s), grad_y.clone()
        grad_raw = (1.0 - log_s * log_s) * (grad_y * (y_b - shift) + gl)
    return tuple(t.to(out_dtype) for t in (x_b, grad_x, grad_shift, grad_raw))  # type: ignore[return-value]


def additive_coupling_backward_from_output_ref(
    y_b: torch.Tensor, shift: torch.Tensor, grad_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reversible additive backward: ``(y_b - shift, grad_y, grad_y)`` (the last a copy)."""
    return y_b - shift, grad_y.clone(), grad_y.clone()


def _inverse_grads(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor | None,
    grad_x: torch.Tensor,
    grad_neg_logdet: torch.Tensor | None,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(grad_y, grad_shift, grad_raw)`` of ``x = inverse(y)`` and its log-det ``-sum(log s)`` (eager math).

    Computed in float32 (float64 for float64 inputs) and returned in ``y_b``'s dtype.
    Glow ``x = y / s - t``: ``gy = gx / s``, ``gt = -gx``, ``gr = -(1 - s) * (gx * y / s + gl)``.
    RealNVP ``x = (y - t) / s``: ``gy = -gt = gx / s``, ``gr = -(1 - tanh(r) ** 2) * (gx * x + gl)``.
    NICE ``x = y - t``: ``gy = gx``, ``gt = -gx``.
    """
    dtype = y_b.dtype
    acc = logdet_dtype(dtype)
    y_b, shift, grad_x = (t.to(acc) for t in (y_b, shift, grad_x))
    if raw is None:
        return grad_x.to(dtype), (-grad_x).to(dtype), None
    raw = raw.to(acc)
    gl = 0.0 if grad_neg_logdet is None else _per_sample(grad_neg_logdet.to(acc), y_b)
    if kind == "sigmoid":
        inv_s = 1.0 + torch.exp(-(raw + 2.0))
        grad_y, grad_shift = grad_x * inv_s, -grad_x
        grad_raw = -torch.sigmoid(-(raw + 2.0)) * (grad_x * y_b * inv_s + gl)
    else:
        log_s = torch.tanh(raw)
        inv_s = torch.exp(-log_s)
        grad_y = grad_x * inv_s
        grad_shift = -grad_y
        grad_raw = -(1.0 - log_s * log_s) * (grad_x * (y_b - shift) * inv_s + gl)
    return grad_y.to(dtype), grad_shift.to(dtype), grad_raw.to(dtype)


def _kernels() -> ModuleType:
    from fastflow.kernels import coupling  # triton is optional: import on use

    return coupling


_COUPLING_SCHEMA = "(Tensor u, Tensor shift, Tensor? raw, str kind) -> (Tensor, Tensor)"


@torch.library.custom_op("fastflow::coupling_fwd", mutates_args=(), schema=_COUPLING_SCHEMA)
def _coupling_fwd_op(
    x_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor | None, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward ``(y_b, logdet)``; ``kind`` is ``"sigmoid"``, ``"exp"`` or ``"additive"`` (raw None)."""
    kernels = _kernels()
    return kernels.coupling_forward(x_b, shift, raw, kernels.SCALE_CODES[kind], inverse=False)


@torch.library.custom_op("fastflow::coupling_inv", mutates_args=(), schema=_COUPLING_SCHEMA)
def _coupling_inv_op(
    y_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor | None, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused inverse ``(x_b, -logdet)``."""
    kernels = _kernels()
    return kernels.coupling_forward(y_b, shift, raw, kernels.SCALE_CODES[kind], inverse=True)


@_coupling_fwd_op.register_fake
@_coupling_inv_op.register_fake
def _coupling_fake(
    u: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor | None, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _kernels().empty_in_order(u), u.new_empty(u.shape[0], dtype=logdet_dtype(u.dtype))


@torch.library.custom_op(
    "fastflow::coupling_bwd",
    mutates_args=(),
    schema="(Tensor u, Tensor shift, Tensor? raw, Tensor grad_y, Tensor? grad_logdet, str kind, bool rebuild)"
    " -> Tensor[]",
)
def _coupling_bwd_op(
    u: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor | None,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    kind: str,
    rebuild: bool,
) -> list[torch.Tensor]:
    """Fused backward ``[grad_x, grad_shift, grad_raw (not for "additive"), x_b (only if rebuild)]``.

    ``u`` is the forward input ``x_b``, or the forward output ``y_b`` when ``rebuild``.
    """
    kernels = _kernels()
    outs = kernels.coupling_backward(u, shift, raw, grad_y, grad_logdet, kernels.SCALE_CODES[kind], rebuild)
    return [t for t in outs if t is not None]


@_coupling_bwd_op.register_fake
def _coupling_bwd_fake(
    u: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor | None,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    kind: str,
    rebuild: bool,
) -> list[torch.Tensor]:
    count = 2 + (kind != "additive") + rebuild
    return [_kernels().empty_in_order(u) for _ in range(count)]


def _save_inputs(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]
) -> None:
    u, shift, raw, kind = inputs
    ctx.save_for_backward(u, shift, raw)
    ctx.kind = kind


def _coupling_fwd_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, grad_logdet: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
    x_b, shift, raw = ctx.saved_tensors
    grads = torch.ops.fastflow.coupling_bwd(x_b, shift, raw, grad_y, grad_logdet, ctx.kind, False)
    return grads[0], grads[1], grads[2] if raw is not None else None, None


def _coupling_inv_backward(
    ctx: torch.autograd.function.FunctionCtx, grad_x: torch.Tensor, grad_neg_logdet: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, None]:
    y_b, shift, raw = ctx.saved_tensors
    return (*_inverse_grads(y_b, shift, raw, grad_x, grad_neg_logdet, ctx.kind), None)


_coupling_fwd_op.register_autograd(_coupling_fwd_backward, setup_context=_save_inputs)
_coupling_inv_op.register_autograd(_coupling_inv_backward, setup_context=_save_inputs)


def _use_kernel(x: torch.Tensor) -> bool:
    return resolve_backend(x) != "eager"


def _check_affine_args(x_name: str, x: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: str) -> None:
    check_float_tensor(x_name, x, min_dim=2)
    check_same_shape("shift", check_float_tensor("shift", shift), x_name, x)
    check_same_shape("raw", check_float_tensor("raw", raw), x_name, x)
    if scale not in SCALE_KINDS:
        raise ValueError(f"scale must be one of {SCALE_KINDS}, got {scale!r}")


def _check_additive_args(x_name: str, x: torch.Tensor, shift: torch.Tensor) -> None:
    check_float_tensor(x_name, x, min_dim=2)
    check_same_shape("shift", check_float_tensor("shift", shift), x_name, x)


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
    x_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: ScaleKind = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling forward ``(y_b, logdet)`` on the backend chosen by :mod:`fastflow.backend`.

    ``x_b``, ``shift`` and ``raw`` share shape ``(B, ...)``, a float dtype and a device, with any strides;
    ``y_b`` has ``x_b``'s dtype (channels_last when ``x_b`` is), ``logdet`` is ``(B,)`` float32 (float64
    for float64). Differentiable in all three tensors.
    """
    _check_affine_args("x_b", x_b, shift, raw, scale)
    if _use_kernel(x_b):
        return torch.ops.fastflow.coupling_fwd(x_b, shift, raw, scale)
    return affine_coupling_ref(x_b, shift, raw, scale)


def affine_coupling_inverse(
    y_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: ScaleKind = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling inverse ``(x_b, -logdet)`` on the chosen backend; shapes as :func:`affine_coupling`."""
    _check_affine_args("y_b", y_b, shift, raw, scale)
    if _use_kernel(y_b):
        return torch.ops.fastflow.coupling_inv(y_b, shift, raw, scale)
    return affine_coupling_inverse_ref(y_b, shift, raw, scale)


def additive_coupling(x_b: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (NICE) coupling forward ``(y_b, 0)`` on the chosen backend."""
    _check_additive_args("x_b", x_b, shift)
    if _use_kernel(x_b):
        return torch.ops.fastflow.coupling_fwd(x_b, shift, None, "additive")
    return additive_coupling_ref(x_b, shift)


def additive_coupling_inverse(y_b: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (NICE) coupling inverse ``(y_b - shift, 0)`` on the chosen backend."""
    _check_additive_args("y_b", y_b, shift)
    if _use_kernel(y_b):
        return torch.ops.fastflow.coupling_inv(y_b, shift, None, "additive")
    return additive_coupling_inverse_ref(y_b, shift)


def affine_coupling_backward_from_output(
    y_b: torch.Tensor,
    shift: torch.Tensor,
    raw: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    scale: ScaleKind = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reversible backward ``(x_b, grad_x, grad_shift, grad_raw)`` from the forward output ``y_b``.

    Rebuilds ``x_b = inverse(y_b)`` and returns the gradients of :func:`affine_coupling` at ``x_b`` for
    upstream ``grad_y`` (like ``y_b``) and ``grad_logdet`` (``(B,)``, or None for zero); one fused pass on the
    Triton backends. Not differentiable (meant for a reversible container's backward).
    """
    _check_affine_args("y_b", y_b, shift, raw, scale)
    _check_upstream(grad_y, grad_logdet, y_b)
    if _use_kernel(y_b):
        grad_x, grad_shift, grad_raw, x_b = torch.ops.fastflow.coupling_bwd(
            y_b, shift, raw, grad_y, grad_logdet, scale, True
        )
        return x_b, grad_x, grad_shift, grad_raw
    return affine_coupling_backward_from_output_ref(y_b, shift, raw, grad_y, grad_logdet, scale)


def additive_coupling_backward_from_output(
    y_b: torch.Tensor, shift: torch.Tensor, grad_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reversible additive backward: fresh ``(y_b - shift, grad_y, grad_y)`` on the chosen backend."""
    _check_additive_args("y_b", y_b, shift)
    _check_upstream(grad_y, None, y_b)
    if _use_kernel(y_b):
        grad_x, grad_shift, x_b = torch.ops.fastflow.coupling_bwd(y_b, shift, None, grad_y, None, "additive", True)
        return x_b, grad_x, grad_shift
    return additive_coupling_backward_from_output_ref(y_b, shift, grad_y)
