"""The spline forward with closed-form gradients in ATen ops, the eager backend's path under ``torch.compile``.

Autograd through the eager forward (:mod:`fastflow.ops.spline_eager`) reads each bin's quantities with
``gather`` and its knots with ``cumsum``, whose backwards (``scatter_add``, a reversed ``cumsum``) Inductor
leaves as library calls between its kernels. This path saves only ``x`` and ``raw`` and writes the gradients
out (the fused backward's formulas, :mod:`fastflow.kernels.spline`), with every per-bin sum a masked sum over
the ``K`` bins, which Inductor fuses:

- from ``y - yl = H num / D`` and ``log dy/dx = 2 log s + log M - 2 log D`` (``v = 1 - u``, ``t = u v``,
  ``num = s u^2 + d0 t``): ``d/du = H s M / D^2 gy + (M_u / M - 2 D_u / D) gl``, and likewise in ``s``,
  ``d0``, ``d1``, ``H``; then ``gx = G_u / W``, ``G_W = -(G_u u + G_s s) / W``, ``G_H += G_s / W``;
- through the knots ``xl = -bound + sum_{i<k} w_i``: ``g_i = g_xl [i < k] + g_W [i == k]`` per unit size,
  and through the softmax ``g_raw_i = c p_i (g_i - sum_j p_j g_j)`` (``c = 2 bound (1 - K min_size)``);
- ``raw_d[j]`` is the derivative at knot ``j + 1``: ``d1`` of bin ``j`` and ``d0`` of bin ``j + 1``, times
  ``sigmoid(raw_d[j])``.

Outside the bound ``gx = gy`` and the raw gradients are 0. An element whose input or any raw parameter is NaN gets
NaN gradients for its input and all its raw parameters, as on the other paths
(:func:`fastflow.ops.spline_eager.nan_elements`). The eager backend takes this path for float32 and
float64 forwards while ``torch.compile`` traces; eager runs keep autograd through the eager forward, the
reference the tests compare this path with.
"""

from __future__ import annotations

import torch

from fastflow.ops import spline_eager as eager
from fastflow.ops._checks import logdet_dtype

__all__ = ["rq_spline_closed_form"]


def _size_grads(
    p: torch.Tensor, k: torch.Tensor, g_lo: torch.Tensor, g_size: torch.Tensor, scale: float
) -> torch.Tensor:
    """Raw-size gradients through the left knot ``lo`` and the size of bin ``k``: ``p`` the size softmax,
    ``g_lo`` and ``g_size`` the upstream gradients per unit of ``scale p_i``."""
    j = torch.arange(p.shape[-1], device=p.device)
    k = k.unsqueeze(-1)
    g = torch.where(j < k, g_lo.unsqueeze(-1), 0.0) + torch.where(j == k, g_size.unsqueeze(-1), 0.0)
    return scale * p * (g - (p * g).sum(dim=-1, keepdim=True))


def _gradients(
    x: torch.Tensor, raw: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor, spline: eager.Spline
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_raw)`` of ``grad_y . y + grad_logdet . logdet`` (module docstring)."""
    bins, bound = spline.bins, spline.bound
    raw_w, raw_h, raw_d = raw.split([bins, bins, bins - 1], dim=-1)
    inside, p, s, u, v = eager.locate(x, raw, spline)
    t, den, m = eager.rqs_terms(u, v, s, p)
    num = s * u * u + p.d0 * t
    inv_den, inv_m = 1.0 / den, 1.0 / m
    gy = torch.where(inside, grad_y, 0.0)
    gl = torch.where(inside, grad_logdet.reshape(x.shape[0], *(1,) * (x.dim() - 1)), 0.0)
    hy = gy * p.h * inv_den * inv_den
    m_u = 2.0 * (p.d1 * u + s * (v - u) - p.d0 * v)
    g_u = hy * s * m + gl * (m_u * inv_m - 2.0 * (p.d0 + p.d1 - 2.0 * s) * (v - u) * inv_den)
    g_s = hy * t * (p.d1 * u * u - p.d0 * v * v) + gl * 2.0 * t * ((p.d0 + p.d1) * inv_den / s + inv_m)
    g_d0 = hy * t * (s * v * v + p.d1 * t) + gl * (v * v * inv_m - 2.0 * t * inv_den)
    g_d1 = -hy * num * t + gl * (u * u * inv_m - 2.0 * t * inv_den)
    g_h = gy * num * inv_den + g_s / p.w
    g_x = g_u / p.w
    g_w = -(g_u * u + g_s * s) / p.w
    grad_w = _size_grads(torch.softmax(raw_w, dim=-1), p.k, -g_x, g_w, 2.0 * bound * (1.0 - bins * spline.min_width))
    grad_h = _size_grads(torch.softmax(raw_h, dim=-1), p.k, gy, g_h, 2.0 * bound * (1.0 - bins * spline.min_height))
    j, k = torch.arange(bins - 1, device=x.device), p.k.unsqueeze(-1)
    at_right = torch.where(j == k, g_d1.unsqueeze(-1), 0.0)
    grad_d = torch.sigmoid(raw_d) * (at_right + torch.where(j == k - 1, g_d0.unsqueeze(-1), 0.0))
    nan = eager.nan_elements(x, raw)
    grad_x = torch.where(inside, g_x, grad_y).masked_fill(nan, float("nan"))
    return grad_x, torch.cat([grad_w, grad_h, grad_d], dim=-1).masked_fill(nan.unsqueeze(-1), float("nan"))


class _ClosedFormSpline(torch.autograd.Function):
    """Forward ``(y, logdet)`` of the eager math; backward :func:`_gradients` from the saved ``x`` and ``raw``."""

    @staticmethod
    def forward(x: torch.Tensor, raw: torch.Tensor, spline: eager.Spline) -> tuple[torch.Tensor, torch.Tensor]:
        y, log_slope = eager.forward(x, raw, spline)
        return y, eager.per_sample_sum(log_slope, logdet_dtype(x.dtype))

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        x, raw, spline = inputs
        ctx.save_for_backward(x, raw)
        ctx.spline = spline

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_y: torch.Tensor, grad_logdet: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, raw = ctx.saved_tensors
        return (*_gradients(x, raw, grad_y, grad_logdet, ctx.spline), None)


def rq_spline_closed_form(
    x: torch.Tensor, raw: torch.Tensor, spline: eager.Spline
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spline forward ``(y, logdet)`` equal to the eager one, differentiable in ``x`` and ``raw`` through the
    closed-form gradients (module docstring); ``x`` float32 or float64, checked by the caller."""
    return _ClosedFormSpline.apply(x, raw, spline)
