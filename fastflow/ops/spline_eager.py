"""Eager math of the monotonic rational-quadratic spline (:mod:`fastflow.ops.spline` states it): bin sizes and
knots from the raw parameters, the bin of each element, and the element-wise forward and inverse with their log
slopes, in ATen ops (differentiable by autograd; an identity autograd Function makes the gradients of elements with
a NaN input or raw parameter NaN, :func:`nan_gradients_at_nan`)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "BinParams",
    "Position",
    "Spline",
    "bin_params",
    "forward",
    "inverse",
    "locate",
    "nan_elements",
    "nan_gradients_at_nan",
    "per_sample_sum",
    "rqs_terms",
    "sizes_and_knots",
]


class Spline(NamedTuple):
    """The spline's constants (:mod:`fastflow.ops.spline`)."""

    bins: int
    bound: float
    min_width: float
    min_height: float
    min_derivative: float


class BinParams(NamedTuple):
    """Knot quantities of the bin holding each element: left knots, bin sizes, right knots, end derivatives, and
    the bin's index ``k``."""

    xl: torch.Tensor
    w: torch.Tensor
    xr: torch.Tensor
    yl: torch.Tensor
    h: torch.Tensor
    yr: torch.Tensor
    d0: torch.Tensor
    d1: torch.Tensor
    k: torch.Tensor


def sizes_and_knots(raw_sizes: torch.Tensor, spline: Spline, min_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bin sizes ``2 bound (min + (1 - K min) softmax(raw))`` and right knots ``-bound + cumsum(sizes)`` (the last
    one is taken as exactly ``bound`` where it is read, :func:`bin_params`)."""
    sizes = 2.0 * spline.bound * (min_size + (1.0 - spline.bins * min_size) * torch.softmax(raw_sizes, dim=-1))
    return sizes, torch.cumsum(sizes, dim=-1) - spline.bound


def _at(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return t.gather(-1, k.unsqueeze(-1)).squeeze(-1)


def bin_params(v: torch.Tensor, raw: torch.Tensor, spline: Spline, inverse: bool) -> BinParams:
    """The bin ``k`` of ``v`` (``x``, or ``y`` when ``inverse``; within the bound) and its knot quantities, read
    at ``k`` and ``k - 1`` from the per-bin tensors: the first bin's left knots are ``-bound`` and its left
    derivative 1, the last bin's right knots ``bound`` and its right derivative 1 (no padded copies of the
    ``(..., K)`` tensors)."""
    k_bins = spline.bins
    raw_w, raw_h, raw_d = raw.split([k_bins, k_bins, k_bins - 1], dim=-1)
    widths, x_right = sizes_and_knots(raw_w, spline, spline.min_width)
    heights, y_right = sizes_and_knots(raw_h, spline, spline.min_height)
    inner_d = spline.min_derivative + F.softplus(raw_d)  # d_1 .. d_{K-1}, the interior knots' derivatives
    interior = (y_right if inverse else x_right)[..., :-1]
    k = (interior <= v.unsqueeze(-1)).sum(dim=-1)
    first, last = k == 0, k == k_bins - 1
    below = (k - 1).clamp_min(0)
    xl, yl = (torch.where(first, -spline.bound, _at(right, below)) for right in (x_right, y_right))
    xr, yr = (torch.where(last, spline.bound, _at(right, k)) for right in (x_right, y_right))
    if k_bins == 1:  # no interior knot: both ends have derivative 1
        d0 = d1 = torch.ones_like(xr)
    else:
        d0 = torch.where(first, 1.0, _at(inner_d, below))
        d1 = torch.where(last, 1.0, _at(inner_d, k.clamp_max(k_bins - 2)))
    return BinParams(xl, _at(widths, k), xr, yl, _at(heights, k), yr, d0, d1, k)


def _clamp_rounding(v: torch.Tensor, lo: torch.Tensor | float, hi: torch.Tensor | float) -> torch.Tensor:
    """``v`` clamped to ``[lo, hi]`` with the identity's gradient. The clamps only undo rounding (a bin's size is
    not the difference of its knots): positions stay in ``[0, 1]`` and results between their bin's knots, so
    the map is monotone across bins; the derivatives are those of the unclamped value, as in the fused
    backward."""
    return v + (v.clamp(lo, hi) - v).detach()


def _from_nearer_knot(upper: torch.Tensor, frac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, v = 1 - u)`` from the position ``frac`` measured from the left knot, or from the right one where
    ``upper``."""
    frac = _clamp_rounding(frac, 0.0, 1.0)
    return torch.where(upper, 1.0 - frac, frac), torch.where(upper, frac, 1.0 - frac)


class Position(NamedTuple):
    """Where each element lies: ``inside`` the bound, the quantities ``p`` of its bin, ``s = H / W`` and its
    position ``u = 1 - v`` in the bin."""

    inside: torch.Tensor
    p: BinParams
    s: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def locate(x: torch.Tensor, raw: torch.Tensor, spline: Spline) -> Position:
    """Bin and position of each ``x``, measured from the nearer knot (so knots and the bound map to knots and the
    bound exactly, and the inverse measures ``y`` from the same knot); outside the bound those of the clamped
    ``x``, so the spline branch stays finite (and so do its gradients) where the identity tails are taken."""
    inside = (x >= -spline.bound) & (x <= spline.bound)
    xc = x.clamp(-spline.bound, spline.bound)
    p = bin_params(xc, raw, spline, inverse=False)
    upper = p.xr - xc < xc - p.xl
    u, v = _from_nearer_knot(upper, torch.where(upper, p.xr - xc, xc - p.xl) / p.w)
    return Position(inside, p, p.h / p.w, u, v)


def rqs_terms(
    u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, p: BinParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``t = u v``, the denominator ``D = s + (d0 + d1 - 2 s) t`` of ``(y - yl) / H`` and
    ``M = d1 u^2 + 2 s t + d0 v^2`` at position ``u = 1 - v`` of the bin (:mod:`fastflow.ops.spline`)."""
    t = u * v
    return t, s + (p.d0 + p.d1 - 2.0 * s) * t, p.d1 * u * u + 2.0 * s * t + p.d0 * v * v


def _log_slope(s: torch.Tensor, den: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``log dy/dx = 2 log(s / D) + log M``."""
    return 2.0 * torch.log(s / den) + torch.log(m)


def nan_elements(v: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """Where ``v`` (``(B, ...)``) or any of its element's raw parameters (``(*v.shape, 3K - 1)``) is NaN: the
    elements with a NaN log-det (even where the element reads no NaN: outside the bound, another bin's
    derivative), whose gradients are NaN on every path (:func:`nan_gradients_at_nan`)."""
    return v.isnan() | raw.isnan().any(-1)


class _NanGradientsAtNan(torch.autograd.Function):
    """Identity on ``(v, raw)`` whose backward sets the gradients of the elements ``nan`` marks to NaN (ATen ops
    both ways: functorch transforms vmap it by its generated rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v: torch.Tensor, raw: torch.Tensor, nan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return v.view_as(v), raw.view_as(raw)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_v: torch.Tensor, grad_raw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        (nan,) = ctx.saved_tensors
        return grad_v.masked_fill(nan, float("nan")), grad_raw.masked_fill(nan.unsqueeze(-1), float("nan")), None


def nan_gradients_at_nan(v: torch.Tensor, raw: torch.Tensor, nan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, raw)``, through which autograd gives NaN gradients to the input and to all raw parameters of every
    element ``nan`` marks (:func:`nan_elements`), as the fused and closed-form backwards do. Autograd alone would
    not: the identity tails pass a finite gradient to a NaN input, and an element's gradients for the parameters
    it does not read (outside the bound, another bin's derivative) are 0."""
    if torch.is_grad_enabled() and (v.requires_grad or raw.requires_grad):
        return _NanGradientsAtNan.apply(v, raw, nan)
    return v, raw


def forward(x: torch.Tensor, raw: torch.Tensor, spline: Spline) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise ``(y, log dy/dx)`` (:func:`locate`: ``y`` too is measured from the nearer knot); NaN gradients
    for :func:`nan_elements`."""
    nan = nan_elements(x, raw)
    x, raw = nan_gradients_at_nan(x, raw, nan)
    inside, p, s, u, v = locate(x, raw, spline)
    t, den, m = rqs_terms(u, v, s, p)
    from_lo, from_hi = p.h * (s * u * u + p.d0 * t) / den, p.h * (s * v * v + p.d1 * t) / den
    y = _clamp_rounding(torch.where(from_hi < from_lo, p.yr - from_hi, p.yl + from_lo), p.yl, p.yr)
    log_slope = torch.where(inside, _log_slope(s, den, m), 0.0)  # identity tails
    return torch.where(inside, y, x), log_slope.masked_fill(nan, float("nan"))


def _root(e: torch.Tensor, h: torch.Tensor, s: torch.Tensor, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """Root in ``[0, 1]`` of the inverse's quadratic for the offset ``e = y - yl`` in its stable form
    (``2c / (-b - sqrt)`` for ``b >= 0``, ``(sqrt - b) / 2a`` for ``b < 0``), with a safe denominator; from the
    right knot, ``e = yr - y`` with ``d0``, ``d1`` swapped gives ``1 - u``. The quadratic is divided by the bin
    height ``h``, so its coefficients are slopes and ``e / h``, free of the bound's scale (with ``h`` in them,
    ``b * b`` overflowed float32 for a bound near 1e19 and underflowed near 1e-19). Where ``a`` and ``b`` both
    cancel to rounding (a flat bin between steep knots: the chosen denominator 0, the root off ``[0, 1]``), the
    linearised root ``-c / (a + b) = e / h``, exact there to rounding (``a + b = s`` does not cancel)."""
    e = e / h
    kappa = d0 + d1 - 2.0 * s
    a = (s - d0) + e * kappa
    b = d0 - e * kappa
    c = -s * e
    root = (b * b - 4.0 * a * c).clamp_min(0.0).sqrt()
    pos = b >= 0
    numerator = torch.where(pos, 2.0 * c, root - b)
    denominator = torch.where(pos, -b - root, 2.0 * a)
    u = numerator / torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    sane = ((denominator != 0) & (u >= -0.5) & (u <= 1.5)) | u.isnan()  # a NaN parameter stays NaN
    return torch.where(sane, u, e)


def inverse(y: torch.Tensor, raw: torch.Tensor, spline: Spline) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise ``(x, -log dy/dx)``; from the right knot in a bin's upper half, where the mirrored spline is
    solved for ``1 - u`` (from ``yr - y``, ``d0`` and ``d1`` swapped): the offset stays small and the
    quadratic's coefficients do not cancel. NaN gradients for :func:`nan_elements`."""
    nan = nan_elements(y, raw)
    y, raw = nan_gradients_at_nan(y, raw, nan)
    inside = (y >= -spline.bound) & (y <= spline.bound)
    yc = y.clamp(-spline.bound, spline.bound)
    p = bin_params(yc, raw, spline, inverse=True)
    s = p.h / p.w
    upper = p.yr - yc < yc - p.yl
    offset = torch.where(upper, p.yr - yc, yc - p.yl)
    u, v = _from_nearer_knot(
        upper, _root(offset, p.h, s, torch.where(upper, p.d1, p.d0), torch.where(upper, p.d0, p.d1))
    )
    x = _clamp_rounding(torch.where(u > 0.5, p.xr - v * p.w, p.xl + u * p.w), p.xl, p.xr)
    _, den, m = rqs_terms(u, v, s, p)
    log_slope = torch.where(inside, -_log_slope(s, den, m), 0.0)  # identity tails
    return torch.where(inside, x, y), log_slope.masked_fill(nan, float("nan"))


def per_sample_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).flatten(1).sum(dim=1)
