"""ActNorm: per-channel affine ``y = (x + bias) * exp(logs)``.

Inverse ``x = y * exp(-logs) - bias``. Log-det per sample ``H * W * sum(logs)`` (negated for the inverse).
``x`` is ``(B, C, H, W)``; ``bias`` and ``logs`` are ``(1, C, 1, 1)``.
"""

from __future__ import annotations

import torch

from fastflow.ops._checks import cast, logdet_dtype

__all__ = ["actnorm_ref", "actnorm_inverse_ref", "actnorm_logdet"]


def actnorm_logdet(logs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample log-det ``H * W * sum(logs)`` for input ``x``, shape ``(B,)``."""
    pixels = x.shape[2] * x.shape[3]
    total = cast(logs, logdet_dtype(x.dtype)).sum() * pixels
    return total.expand(x.shape[0])


def actnorm_ref(x: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager forward ``((x + bias) * exp(logs), logdet)``."""
    y = (x + cast(bias, x.dtype)) * cast(torch.exp(logs), x.dtype)
    return y, actnorm_logdet(logs, x)


def actnorm_inverse_ref(y: torch.Tensor, bias: torch.Tensor, logs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager inverse ``(y * exp(-logs) - bias, -logdet)``."""
    x = y * cast(torch.exp(-logs), y.dtype) - cast(bias, y.dtype)
    return x, -actnorm_logdet(logs, y)
