"""ActNorm folded into the invertible 1x1 convolution: one channel-mix pass instead of two passes.

ActNorm ``y1 = (x + bias) * exp(logs)`` then ``y = W @ y1`` per pixel equals ``y = W' @ x + b'`` with
``W' = W diag(exp(logs))`` and ``b' = W' @ bias``. Inverse: ``x = W'^-1 @ y - bias`` with
``W'^-1 = diag(exp(-logs)) @ W^-1``; ``W^-1`` comes from the caller (LU solves,
:func:`fastflow.ops.invconv.lu_inverse_weight`), never ``torch.inverse``. Log-det per sample:
``H * W * (sum(logs) + log|det W|)``, negated for the inverse. The fold is plain torch ops on ``C x C``
tensors around :func:`fastflow.ops.channel_mix.channel_mix`, so gradients reach ``bias``, ``logs``,
``weight`` and ``weight_logdet`` through autograd.

Precision: ``b'`` is added in the float32 accumulator, but ``W'`` multiplies ``x`` rather than
``x + bias``; where the operands are rounded (bfloat16/float16 inputs) the rounding error scales with
``|x|`` instead of ``|x + bias|``, so channels whose mean is large against their spread lose up to
``|mean| / std`` times more relative precision than ActNorm-then-conv. float32 is IEEE float32 on every
path, whatever the TF32 flags say (:mod:`fastflow.ops.channel_mix`); ``b'`` is a sum of elementwise
products, not a matmul that TF32 could round.

Dispatch: on the ``"eager"`` backend the two functions are their eager twins (ActNorm, then the conv: two
passes), except on vectors, where the folded mix is one ``addmm``; on ``"triton"`` / ``"interpret"`` they fold
and run one fused channel mix (:func:`actnorm_is_folded`).

Batched fold: :func:`fold_actnorm` and :func:`fold_actnorm_inverse` take parameters with leading batch
dimensions, so a level of ``K`` flow steps folds its ``K`` pairs in one launch per operation and hands each
step its :class:`FoldedMix` (the ``folded`` argument of the two ops), instead of each step folding its own.

Shapes: ``x`` ``(B, C, H, W)`` or vectors ``(B, C)`` (folded on every backend: one ``linear`` on the eager
backend on the CPU, the channel mix of ``(B, C, 1, 1)`` pixels elsewhere); ``bias`` and ``logs`` ``(1, C, 1, 1)``;
``weight`` and ``weight_inverse`` ``(C, C)``; ``weight_logdet`` a scalar tensor (``log|det W|``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastflow.backend import resolve_backend
from fastflow.ops._checks import cast, check_float_tensor, check_same_device, float_tensors_on_one_device, logdet_dtype
from fastflow.ops.actnorm import actnorm_inverse_ref, actnorm_ref
from fastflow.ops.channel_mix import channel_mix, channel_mix_ref, tf32_applies

__all__ = [
    "FoldedMix",
    "actnorm_invconv",
    "actnorm_invconv_inverse",
    "actnorm_invconv_ref",
    "actnorm_invconv_inverse_ref",
    "actnorm_is_folded",
    "fold_actnorm",
    "fold_actnorm_inverse",
]


class FoldedMix(NamedTuple):
    """ActNorm folded into the 1x1 convolution, one direction: per pixel ``out = weight @ in + bias``, log-det
    ``logdet`` per pixel (``H * W * logdet`` per sample). Shapes ``(..., C, C)``, ``(..., C)`` and ``(...)``:
    leading dimensions batch the steps of a level."""

    weight: torch.Tensor
    bias: torch.Tensor
    logdet: torch.Tensor


def actnorm_is_folded(x: torch.Tensor) -> bool:
    """Whether :func:`actnorm_invconv` and its inverse fold ActNorm into the weight for input ``x`` rather than
    run their eager twins: on the Triton backends, and for vectors (``(B, C)``, or ``(B, C, 1, 1)`` pixels) on
    every backend, where the folded mix is one ``addmm`` in place of ActNorm's elementwise passes and a matmul.
    A caller batching the fold does it only then."""
    vectors = x.dim() == 2 or (x.dim() == 4 and x.shape[2] * x.shape[3] == 1)
    return vectors or resolve_backend(x) != "eager"


def _logdet_per_pixel(logs: torch.Tensor, weight_logdet: torch.Tensor) -> torch.Tensor:
    """``sum(logs) + log|det W|`` over the last dimension of ``logs``, in float32 (float64 for float64)."""
    dtype = logdet_dtype(logs.dtype)
    return cast(logs, dtype).sum(-1) + cast(weight_logdet, dtype)


def fold_actnorm(
    bias: torch.Tensor, logs: torch.Tensor, weight: torch.Tensor, weight_logdet: torch.Tensor
) -> FoldedMix:
    """Forward fold ``W' = W diag(exp(logs))``, ``b' = W' @ bias``, log-det ``sum(logs) + log|det W|``.

    ``bias`` and ``logs`` ``(..., C)``, ``weight`` ``(..., C, C)``, ``weight_logdet`` ``(...)``: any leading
    dimensions, shared by all four. ``W'`` and ``b'`` are in ``weight``'s dtype.
    """
    weight_folded = weight * torch.exp(cast(logs, weight.dtype)).unsqueeze(-2)
    bias_folded = (weight_folded * cast(bias, weight.dtype).unsqueeze(-2)).sum(-1)
    return FoldedMix(weight_folded, bias_folded, _logdet_per_pixel(logs, weight_logdet))


def fold_actnorm_inverse(
    bias: torch.Tensor, logs: torch.Tensor, weight_inverse: torch.Tensor, weight_logdet: torch.Tensor
) -> FoldedMix:
    """Inverse fold ``W'^-1 = diag(exp(-logs)) W^-1``, bias ``-bias``, log-det ``-(sum(logs) + log|det W|)``.

    Shapes as in :func:`fold_actnorm`; ``weight_logdet`` is ``log|det W|`` (of ``W``, not of its inverse).
    """
    inverse_folded = torch.exp(-cast(logs, weight_inverse.dtype)).unsqueeze(-1) * weight_inverse
    return FoldedMix(inverse_folded, -cast(bias, weight_inverse.dtype), -_logdet_per_pixel(logs, weight_logdet))


def _check_args(
    x_name: str,
    x: torch.Tensor,
    bias: torch.Tensor,
    logs: torch.Tensor,
    weight_name: str,
    weight: torch.Tensor,
    weight_logdet: torch.Tensor,
) -> None:
    if float_tensors_on_one_device(x, bias, logs, weight, weight_logdet):  # then the shapes alone, in one test
        channels = x.shape[1] if x.dim() in (2, 4) else -1
        pixel = (1, channels, 1, 1)
        if bias.shape == pixel and logs.shape == pixel and weight.shape == (channels, channels):
            if weight_logdet.numel() == 1:
                return
    check_float_tensor(x_name, x)
    if x.dim() not in (2, 4):
        raise ValueError(f"{x_name} must have shape (B, C, H, W) or (B, C), got {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("bias", bias), ("logs", logs)):
        check_float_tensor(name, t)
        if tuple(t.shape) != (1, channels, 1, 1):
            raise ValueError(f"{name} must have shape (1, {channels}, 1, 1) for {x_name}, got {tuple(t.shape)}")
    check_float_tensor(weight_name, weight)
    if tuple(weight.shape) != (channels, channels):
        raise ValueError(
            f"channel mismatch: {weight_name} must have shape ({channels}, {channels}) for {x_name}, "
            f"got {tuple(weight.shape)}"
        )
    check_float_tensor("weight_logdet", weight_logdet, min_dim=0)
    if weight_logdet.numel() != 1:
        raise ValueError(f"weight_logdet must be a scalar tensor, got shape {tuple(weight_logdet.shape)}")
    for name, t in (("bias", bias), ("logs", logs), (weight_name, weight), ("weight_logdet", weight_logdet)):
        check_same_device(name, t, x_name, x)


def _per_sample(logdet: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-pixel log-det times ``H * W`` (1 for vectors), expanded to ``(B,)``, float32 (float64 for float64
    ``x``)."""
    logdet = cast(logdet, logdet_dtype(x.dtype))
    if x.dim() == 4 and x.shape[2] * x.shape[3] != 1:
        logdet = logdet * (x.shape[2] * x.shape[3])
    return logdet.expand(x.shape[0])


def _folded_mix(x: torch.Tensor, folded: FoldedMix) -> torch.Tensor:
    """``folded.weight @ x + folded.bias`` per pixel (per row for vectors): :func:`channel_mix`, except that vectors
    on the eager backend on the CPU (no kernel, no TF32 to keep out) take the one ``linear`` it would run, without
    the pixel view and checks around it. Elsewhere a vector batch ``(B, C)`` is mixed as the ``B`` pixels of one
    channels-last image ``(1, C, B, 1)`` (a view, and the output's transpose a view too): as ``B`` images of one
    pixel each, a kernel program took one sample, 15/16 of its pixel tile masked off, and loaded the whole
    weight per sample."""
    if x.dim() == 4:
        return channel_mix(x, folded.weight, folded.bias)
    if resolve_backend(x) != "eager" or tf32_applies(x):
        return channel_mix(x.t()[None, :, :, None], folded.weight, folded.bias)[0, :, :, 0].t()
    return F.linear(x, cast(folded.weight, x.dtype), cast(folded.bias, x.dtype))


def _channels(t: torch.Tensor) -> torch.Tensor:
    """ActNorm's ``(1, C, 1, 1)`` parameter as a ``(C,)`` view."""
    return t.reshape(-1)


def actnorm_invconv(
    x: torch.Tensor,
    bias: torch.Tensor,
    logs: torch.Tensor,
    weight: torch.Tensor,
    weight_logdet: torch.Tensor,
    folded: FoldedMix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward ``(W diag(exp(logs)) @ x + W diag(exp(logs)) @ bias, logdet)`` in one channel mix.

    Equals ActNorm then the 1x1 convolution (:func:`actnorm_invconv_ref`). ``y`` has ``x``'s dtype and
    layout; ``logdet`` is ``(B,)`` float32 (float64 for float64 ``x``). ``folded``, where given, is
    :func:`fold_actnorm` of these parameters, done by the caller (batched over a level's steps): the op then
    skips its own fold. Where the op does not fold (:func:`actnorm_is_folded`) it ignores it.
    """
    _check_args("x", x, bias, logs, "weight", weight, weight_logdet)
    if not actnorm_is_folded(x):
        return actnorm_invconv_ref(x, bias, logs, weight, weight_logdet)
    if folded is None:
        folded = fold_actnorm(_channels(bias), _channels(logs), weight, weight_logdet.reshape(()))
    return _folded_mix(x, folded), _per_sample(folded.logdet, x)


def actnorm_invconv_inverse(
    y: torch.Tensor,
    bias: torch.Tensor,
    logs: torch.Tensor,
    weight_inverse: torch.Tensor,
    weight_logdet: torch.Tensor,
    folded: FoldedMix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused inverse ``(diag(exp(-logs)) W^-1 @ y - bias, -logdet)`` in one channel mix.

    ``weight_inverse`` is ``W^-1`` and ``weight_logdet`` is ``log|det W|`` (of ``W``, not of its inverse).
    ``folded``, where given, is :func:`fold_actnorm_inverse` of these parameters (see
    :func:`actnorm_invconv`).
    """
    _check_args("y", y, bias, logs, "weight_inverse", weight_inverse, weight_logdet)
    if not actnorm_is_folded(y):
        return actnorm_invconv_inverse_ref(y, bias, logs, weight_inverse, weight_logdet)
    if folded is None:
        folded = fold_actnorm_inverse(_channels(bias), _channels(logs), weight_inverse, weight_logdet.reshape(()))
    return _folded_mix(y, folded), _per_sample(folded.logdet, y)


def actnorm_invconv_ref(
    x: torch.Tensor,
    bias: torch.Tensor,
    logs: torch.Tensor,
    weight: torch.Tensor,
    weight_logdet: torch.Tensor,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager twin: :func:`~fastflow.ops.actnorm.actnorm_ref` then :func:`channel_mix_ref`, two passes, on
    ``(B, C, H, W)`` only (vectors ``(B, C)`` are the caller's to view as ``(B, C, 1, 1)`` pixels).

    ``upcast`` computes in float32 (float64 stays float64) and casts ``y`` back to ``x``'s dtype.
    """
    out_dtype = x.dtype
    if upcast:
        x = cast(x, logdet_dtype(out_dtype))
    y, actnorm_logdet = actnorm_ref(x, bias, logs)
    y = channel_mix_ref(y, weight)
    pixels = x.shape[2] * x.shape[3]
    return cast(y, out_dtype), actnorm_logdet + cast(weight_logdet, actnorm_logdet.dtype).reshape(()) * pixels


def actnorm_invconv_inverse_ref(
    y: torch.Tensor,
    bias: torch.Tensor,
    logs: torch.Tensor,
    weight_inverse: torch.Tensor,
    weight_logdet: torch.Tensor,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager twin of the inverse: :func:`channel_mix_ref` with ``W^-1``, then the ActNorm inverse, on
    ``(B, C, H, W)`` only (vectors as in :func:`actnorm_invconv_ref`)."""
    out_dtype = y.dtype
    if upcast:
        y = cast(y, logdet_dtype(out_dtype))
    x = channel_mix_ref(y, weight_inverse)
    x, actnorm_logdet = actnorm_inverse_ref(x, bias, logs)
    pixels = y.shape[2] * y.shape[3]
    return cast(x, out_dtype), actnorm_logdet - cast(weight_logdet, actnorm_logdet.dtype).reshape(()) * pixels
