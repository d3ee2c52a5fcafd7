"""Affine and additive coupling transforms on the half ``x_b`` that the coupling network does not see.

Math (per element, ``t`` = shift, ``r`` = raw scale from the network):
- Glow (``scale="sigmoid"``): ``s = sigmoid(r + 2)``, ``y = (x + t) * s``, inverse ``x = y / s - t``.
- RealNVP (``scale="exp"``): ``log s = tanh(r)``, ``y = x * s + t``, inverse ``x = (y - t) / s``.
- NICE (additive): ``y = x + t``, inverse ``x = y - t``, log-det 0.
Log-det per sample: ``sum(log s)`` over every non-batch element (negated for the inverse), float32 for
half inputs. Inputs have any shape ``(B, ...)``; ``shift`` and ``raw`` match ``x_b``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

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


def _check_affine_args(x_name: str, x: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: str) -> None:
    check_float_tensor(x_name, x, min_dim=2)
    check_same_shape("shift", check_float_tensor("shift", shift), x_name, x)
    check_same_shape("raw", check_float_tensor("raw", raw), x_name, x)
    if scale not in SCALE_KINDS:
        raise ValueError(f"scale must be one of {SCALE_KINDS}, got {scale!r}")


def affine_coupling(
    x_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: ScaleKind = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling forward ``(y_b, logdet)``."""
    _check_affine_args("x_b", x_b, shift, raw, scale)
    return affine_coupling_ref(x_b, shift, raw, scale)


def affine_coupling_inverse(
    y_b: torch.Tensor, shift: torch.Tensor, raw: torch.Tensor, scale: ScaleKind = "sigmoid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling inverse ``(x_b, -logdet)``."""
    _check_affine_args("y_b", y_b, shift, raw, scale)
    return affine_coupling_inverse_ref(y_b, shift, raw, scale)


def additive_coupling(x_b: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (NICE) coupling forward ``(y_b, 0)``."""
    check_float_tensor("x_b", x_b, min_dim=2)
    check_same_shape("shift", check_float_tensor("shift", shift), "x_b", x_b)
    return additive_coupling_ref(x_b, shift)


def additive_coupling_inverse(y_b: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (NICE) coupling inverse ``(y_b - shift, 0)``."""
    check_float_tensor("y_b", y_b, min_dim=2)
    check_same_shape("shift", check_float_tensor("shift", shift), "y_b", y_b)
    return additive_coupling_inverse_ref(y_b, shift)
