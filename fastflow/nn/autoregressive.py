"""Masked autoregressive rational-quadratic spline on vectors (Durkan et al., 2019, with a MADE conditioner,
Germain et al., 2015), optionally conditioned on a context."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.nn.base import FlowLayer, check_features, check_network_dtype
from fastflow.nn.context import shape_context
from fastflow.nn.spline_coupling import start_at_identity
from fastflow.ops._checks import int_at_least
from fastflow.ops.spline import check_layer_bins, rq_spline, rq_spline_inverse
from fastflow.warning_location import warn_at_caller

__all__ = ["MADE", "MaskedAutoregressiveSpline", "MaskedLinear", "default_made_hidden", "min_made_hidden"]

DEFAULT_HIDDEN = 64
"""The default hidden width of :class:`~fastflow.models.NSF`'s conditioners, and of a MADE where it is wide enough
(:func:`default_made_hidden`)."""


class MaskedLinear(nn.Linear):
    """``y = x (W * mask)^T + b`` with a fixed 0/1 ``mask`` ``(out_features, in_features)`` (a buffer)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Refuses (through ``load_state_dict``'s error list) a ``mask`` other than the one this layer was built
        with: the mask follows from the architecture, and another one breaks the autoregressive structure, giving a
        finite but wrong log-density (a mask of ones in a crafted file: log_prob off by 0.37 nats)."""
        mask = state_dict.get(prefix + "mask")
        same_shape = isinstance(mask, torch.Tensor) and mask.shape == self.mask.shape  # else load_state_dict says
        wrong = same_shape and not torch.equal(mask.to(self.mask), self.mask)
        super()._load_from_state_dict(state_dict, prefix, *args)  # copies the mask in: compared before
        if wrong:
            args[-1].append(f"{prefix}mask is not the autoregressive mask of this layer (it follows from the config)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The masked affine map of ``x`` ``(B, in_features)``."""
        return F.linear(x, self.weight * self.mask, self.bias)


def min_made_hidden(features: int, context_features: int) -> int:
    """The narrowest hidden layer of a :class:`MADE` in which every output block sees every input before it: one
    unit of each degree ``lo .. features - 1``, so ``features - 1`` without a context (at least 1) and
    ``features`` with one."""
    return features if context_features > 0 else max(features - 1, 1)


def default_made_hidden(features: int, context_features: int) -> int:
    """The default MADE width: :data:`DEFAULT_HIDDEN`, or :func:`min_made_hidden` where that is wider."""
    return max(DEFAULT_HIDDEN, min_made_hidden(features, context_features))


class MADE(nn.Sequential):
    """Autoregressive MLP: output block ``i`` (``params`` outputs, element-major) of ``net([x, context])`` depends
    on ``x[:, :i]`` and the context only, and on every one of them.

    Degrees (Germain et al., 2015): input ``x_j`` has degree ``j + 1``, each context feature degree 0; hidden
    unit ``k`` has degree ``m_k = lo + k mod (features - lo)`` with ``lo = 0`` when there is a context (units of
    degree 0 carry it to the first feature's outputs) and ``1`` without; a hidden unit sees the units below of
    degree ``<= m_k``; outputs of feature ``i`` see hidden units of degree ``< i + 1``. ``depth`` masked
    ``Linear -> ReLU`` layers of width ``hidden``, then a zero-initialised masked output layer.

    ``hidden`` should be at least :func:`min_made_hidden` (``features - 1``, or ``features`` with a context), else
    a ``UserWarning``: narrower layers lack the units of the higher degrees, and later features lose their
    dependence on the inputs beyond ``hidden`` (still a valid flow, as models saved before the warning are).
    """

    def __init__(self, features: int, context_features: int, hidden: int, params: int, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        minimum = min_made_hidden(features, context_features)
        if hidden < minimum:  # a warning, not an error: a narrow MADE is a valid flow, and such models were saved
            with_context = " and a context" if context_features > 0 else ""
            warn_at_caller(
                f"hidden should be >= {minimum} for {features} features{with_context} (a MADE needs a hidden unit of "
                f"every degree), got {hidden}: later features lose their dependence on the inputs beyond {hidden}",
                UserWarning,
            )
        lo = 0 if context_features > 0 else 1
        in_degrees = torch.cat([torch.arange(1, features + 1), torch.zeros(context_features, dtype=torch.int64)])
        hidden_degrees = lo + torch.arange(hidden) % max(features - lo, 1)
        out_degrees = torch.arange(1, features + 1).repeat_interleave(params)
        layers: list[nn.Module] = []
        below = in_degrees
        for _ in range(depth):
            layers += [MaskedLinear(hidden_degrees[:, None] >= below[None, :]), nn.ReLU()]
            below = hidden_degrees
        last = MaskedLinear(out_degrees[:, None] > below[None, :])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class MaskedAutoregressiveSpline(FlowLayer):
    """``y_i = RQS(x_i; raw_i(x_{<i}[, context]))`` for ``i = 1..D`` on vectors ``(B, D)``; log-det
    ``sum_i log dy_i/dx_i`` (the Jacobian is triangular).

    ``raw = MADE([x, context])`` ``(B, D (3 bins - 1))`` viewed ``(B, D, 3 bins - 1)`` (:class:`MADE`, ``depth``
    hidden layers of width ``hidden``, at least :func:`min_made_hidden`: ``D - 1``, or ``D`` with a context; by
    default :func:`default_made_hidden`, 64 or that minimum if wider); the spline is
    :func:`~fastflow.ops.spline.rq_spline` with ``bins`` bins (2 to
    :data:`~fastflow.ops.spline.MAX_LAYER_BINS` = 500 without a warning) on ``[-bound, bound]``, the identity
    outside. It starts at
    the identity map (zero output layer, :func:`~fastflow.nn.spline_coupling.start_at_identity`).

    Cost: ``forward`` (density evaluation, training) is one network pass and one spline pass. ``inverse``
    (sampling) is ``D`` sequential network passes: pass ``k`` fixes feature ``k`` from the features before it,
    so sampling costs ``D`` times a forward; its result and gradients are exact (after ``D`` passes the
    result no longer depends on the start).
    """

    def __init__(
        self,
        features: int,
        hidden: int | None = None,
        bins: int = 8,
        bound: float = 3.0,
        *,
        context_features: int = 0,
        depth: int = 2,
    ) -> None:
        super().__init__()
        int_at_least("features", features, 1)
        int_at_least("depth", depth, 1)
        check_layer_bins(bins)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise TypeError(f"bound must be a float, got {type(bound).__name__}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be finite and > 0, got {bound}")
        if isinstance(context_features, bool) or not isinstance(context_features, int) or context_features < 0:
            raise ValueError(f"context_features must be an int >= 0, got {context_features!r}")
        if hidden is None:
            hidden = default_made_hidden(features, context_features)
        int_at_least("hidden", hidden, 1)
        self.features = features
        self.hidden = hidden
        self.bins = bins
        self.bound = float(bound)
        self.context_features = context_features
        self.net = MADE(features, context_features, hidden, 3 * bins - 1, depth)
        start_at_identity(self.net, features, bins, parameter_major=False)

    @property
    def uses_context(self) -> bool:
        """Whether the conditioner sees a context (``context_features > 0``)."""
        return self.context_features > 0

    def _check(self, name: str, x: object, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = check_features(name, x, self.features)
        if x.dim() != 2:
            raise ValueError(f"{name} must be vectors (B, D) for this layer, got shape {tuple(x.shape)}")
        check_network_dtype(name, x, self.net)
        return x, shape_context(context, x, self.context_features) if self.uses_context else None

    def _raw(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        out = self.net(x if context is None else torch.cat([x, context], dim=1)).to(x.dtype)
        return out.unflatten(1, (self.features, 3 * self.bins - 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` for ``x`` ``(B, D)``: one network pass."""
        x, context = self._check("x", x, context)
        return rq_spline(x, self._raw(x, context), self.bins, self.bound)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, -logdet)`` for ``y`` ``(B, D)``: ``D`` network passes (class docstring)."""
        y, context = self._check("y", y, context)
        x = torch.zeros_like(y)
        for _ in range(self.features):
            x, neg_logdet = rq_spline_inverse(y, self._raw(x, context), self.bins, self.bound)
        return x, neg_logdet
