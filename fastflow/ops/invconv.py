"""Invertible 1x1 convolution: a per-pixel channel mix ``y[:, :, h, w] = W @ x[:, :, h, w]``.

LU parameterisation (Glow): ``W = P @ L @ (U + diag(sign_s * exp(log_s)))`` with ``P`` a fixed
permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular. Then
``log|det W| = sum(log_s)`` (O(C)) and ``W^-1 = (U + diag)^-1 @ L^-1 @ P^T`` from two triangular solves:
no ``slogdet`` or ``inverse`` of ``W``. Log-det of the layer per sample: ``H * W * log|det W|``.
``perm`` is an index vector with ``P[i, perm[i]] = 1``, so ``P @ A = A[perm]`` and ``A @ P^T = A[:, perm]``.
"""

from __future__ import annotations

import torch

__all__ = ["lu_weight_and_logdet", "lu_inverse_weight"]


def _lu_factors(
    lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    unit_lower = torch.tril(lower, diagonal=-1) + eye
    upper_diag = torch.triu(upper, diagonal=1) + torch.diag(sign_s * torch.exp(log_s))
    return unit_lower, upper_diag


def lu_weight_and_logdet(
    perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, log|det W|)`` from the LU factors; ``W`` is ``(C, C)``, the log-det a scalar."""
    unit_lower, upper_diag = _lu_factors(lower, upper, sign_s, log_s)
    return (unit_lower @ upper_diag)[perm], log_s.sum()


def lu_inverse_weight(
    perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor
) -> torch.Tensor:
    """``W^-1`` from two triangular solves against the identity, then the inverse permutation."""
    unit_lower, upper_diag = _lu_factors(lower, upper, sign_s, log_s)
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    lower_inv = torch.linalg.solve_triangular(unit_lower, eye, upper=False, unitriangular=True)
    return torch.linalg.solve_triangular(upper_diag, lower_inv, upper=True)[:, perm]
