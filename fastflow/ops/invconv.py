"""Invertible 1x1 convolution: a per-pixel channel mix ``y[:, :, h, w] = W @ x[:, :, h, w]``.

LU parameterisation (Glow): ``W = P @ L @ (U + diag(sign_s * exp(log_s)))`` with ``P`` a fixed
permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular. Then
``log|det W| = sum(log_s)`` (O(C)) and ``W^-1 = (U + diag)^-1 @ L^-1 @ P^T`` from two triangular solves:
no ``slogdet`` or ``inverse`` of ``W``. Log-det of the layer per sample: ``H * W * log|det W|``.
``perm`` is an index vector with ``P[i, perm[i]] = 1``, so ``P @ A = A[perm]`` and ``A @ P^T = A[:, perm]``.
Only the strict lower part of ``lower`` and the strict upper part of ``upper`` are read, so both may be one
packed matrix whose diagonal holds ``log_s`` (as :class:`~fastflow.nn.InvConv1x1` stores them).

Batched: every function takes factors with leading batch dimensions (``lower`` ``(..., C, C)``, ``perm``
and ``log_s`` ``(..., C)``) and answers for each matrix of the batch at once, so a level of ``K`` flow steps
assembles, inverts and log-dets its ``K`` weights in one launch per operation instead of one per step.

Precision: the ``C x C`` products and solves run in float64 (float32 on MPS, which has none) and the
results are cast back to the factors' dtype. TF32 (``torch.backends.cuda.matmul.allow_tf32``, or
``torch.set_float32_matmul_precision("high")``) never touches float64, so ``W`` and ``W^-1`` are each the
correctly rounded values of the exact products and stay inverse to float32 rounding whatever the flags
say; half-precision factors solve too (CPU ``solve_triangular`` has no bfloat16 kernel). The cost is
``O(C^3)`` on a ``C x C`` matrix, nothing next to one pass over the activations.
"""

from __future__ import annotations

import torch

from fastflow.ops._checks import cast, check_float_tensor, check_same_device, logdet_dtype

__all__ = ["dense_inverse_weight", "dense_logdet", "lu_weight_and_logdet", "lu_inverse_weight"]


def _algebra_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _lu_factors(
    lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L - I, U + diag(sign_s * exp(log_s)))`` in the algebra dtype (float64 where the device has it): the
    strictly lower part of ``L`` (its unit diagonal left implicit: :func:`_unit_lower_times` adds ``U``, the
    triangular solve takes ``unitriangular=True``) and the upper factor."""
    dtype = _algebra_dtype(lower.device)
    lower_exact = cast(lower, dtype)
    upper_exact = lower_exact if upper is lower else upper.to(dtype)  # one cast for a packed matrix
    diag = torch.diag_embed(cast(sign_s, dtype) * torch.exp(cast(log_s, dtype)))
    return torch.tril(lower_exact, diagonal=-1), torch.triu(upper_exact, diagonal=1) + diag


def _unit_lower_times(strict_lower: torch.Tensor, upper_diag: torch.Tensor) -> torch.Tensor:
    """``L @ U = U + (L - I) @ U`` in one fused multiply-add per matrix (``baddbmm``), for any leading dims."""
    shape = upper_diag.shape
    flat = [t.reshape(-1, shape[-2], shape[-1]) for t in (upper_diag, strict_lower)]
    return torch.baddbmm(flat[0], flat[1], flat[0]).view(shape)


def _permuted_rows(a: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``P @ a`` (row ``i`` of each matrix is its row ``perm[i]``) for ``a`` ``(..., C, C)`` and ``perm`` ``(..., C)``
    with the same leading dims: one ``index_select`` over the stacked rows (several times cheaper than ``gather``,
    backward included)."""
    rows = a.shape[-2]
    starts = torch.arange(0, perm[..., 0].numel() * rows, rows, device=perm.device).view(*perm.shape[:-1], 1)
    return a.reshape(-1, a.shape[-1]).index_select(0, (perm + starts).reshape(-1)).view(a.shape)


def _check_factors(
    perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor
) -> None:
    """TypeError / ValueError naming the factor unless ``lower`` and ``upper`` are floating ``(..., C, C)`` of one
    shape and dtype, ``sign_s`` and ``log_s`` floating ``(..., C)`` and ``perm`` an integer ``(..., C)``, all on one
    device. Their values are not read (that would be a host read): ``perm`` must hold a permutation and ``sign_s``
    signs, +-1 (the log-det ``sum(log_s)`` assumes both)."""
    check_float_tensor("lower", lower, min_dim=2)
    if lower.shape[-1] != lower.shape[-2]:
        raise ValueError(f"lower must be square (..., C, C), got shape {tuple(lower.shape)}")
    if upper is not lower:
        check_float_tensor("upper", upper, min_dim=2)
        if upper.shape != lower.shape:
            raise ValueError(f"upper must have lower's shape {tuple(lower.shape)}, got {tuple(upper.shape)}")
        if upper.dtype != lower.dtype:
            raise TypeError(f"upper must have lower's dtype {lower.dtype}, got {upper.dtype}")
    rows = tuple(lower.shape[:-1])
    for name, t in (("sign_s", sign_s), ("log_s", log_s)):
        if tuple(check_float_tensor(name, t).shape) != rows:
            raise ValueError(f"{name} must have shape {rows} (lower's but its last dim), got {tuple(t.shape)}")
    if not isinstance(perm, torch.Tensor) or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise TypeError(f"perm must be an integer tensor, got {getattr(perm, 'dtype', type(perm).__name__)}")
    if tuple(perm.shape) != rows:
        raise ValueError(f"perm must have shape {rows} (lower's but its last dim), got {tuple(perm.shape)}")
    for name, t in (("upper", upper), ("sign_s", sign_s), ("log_s", log_s), ("perm", perm)):
        check_same_device(name, t, "lower", lower)


def lu_weight_and_logdet(
    perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, log|det W|)`` from the LU factors; ``W`` is ``(..., C, C)`` in ``lower``'s dtype, the log-det
    ``(...)`` in ``log_s``'s dtype. Shapes and dtypes are checked, values not (:func:`_check_factors`: ``perm``
    must be a permutation and ``sign_s`` hold +-1)."""
    _check_factors(perm, lower, upper, sign_s, log_s)
    strict_lower, upper_diag = _lu_factors(lower, upper, sign_s, log_s)
    weight = _permuted_rows(_unit_lower_times(strict_lower, upper_diag), perm)
    return cast(weight, lower.dtype), log_s.sum(-1)


def lu_inverse_weight(
    perm: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, sign_s: torch.Tensor, log_s: torch.Tensor
) -> torch.Tensor:
    """``W^-1`` (``(..., C, C)`` in ``lower``'s dtype) from two triangular solves against the identity, then
    the inverse permutation. Factors checked as in :func:`lu_weight_and_logdet`."""
    _check_factors(perm, lower, upper, sign_s, log_s)
    strict_lower, upper_diag = _lu_factors(lower, upper, sign_s, log_s)
    eye = torch.eye(lower.shape[-1], dtype=upper_diag.dtype, device=lower.device)
    lower_inv = torch.linalg.solve_triangular(strict_lower, eye, upper=False, unitriangular=True)
    inverse = torch.linalg.solve_triangular(upper_diag, lower_inv, upper=True)
    return torch.gather(inverse, -1, perm.unsqueeze(-2).expand_as(inverse)).to(lower.dtype)  # columns: @ P^T


def dense_logdet(weight: torch.Tensor) -> torch.Tensor:
    """``log|det W|`` ``(...)`` of plain (not LU) ``(..., C, C)`` weights, by ``slogdet`` in the algebra dtype (it has
    no half-precision kernel), in float32 for half weights (float64 for float64)."""
    return cast(torch.linalg.slogdet(weight.to(_algebra_dtype(weight.device)))[1], logdet_dtype(weight.dtype))


def dense_inverse_weight(weight: torch.Tensor) -> torch.Tensor:
    """``W^-1`` of plain (not LU) ``(..., C, C)`` weights, by ``torch.linalg.inv`` in the algebra dtype."""
    return cast(torch.linalg.inv(weight.to(_algebra_dtype(weight.device))), weight.dtype)
