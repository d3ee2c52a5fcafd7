"""NSF: a neural spline flow over vectors ``(B, features)``, optionally conditioned on a context ``(B, context)``."""

from __future__ import annotations

import math

from fastflow.models.base import FlowModel
from fastflow.models.priors import GaussianPrior
from fastflow.nn.autoregressive import DEFAULT_HIDDEN, MaskedAutoregressiveSpline, default_made_hidden
from fastflow.nn.base import FlowLayer
from fastflow.nn.invconv import InvertibleLinear
from fastflow.nn.permutation import Permutation
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.spline_coupling import SplineCoupling
from fastflow.ops._checks import check_bool, int_at_least
from fastflow.ops.spline import check_layer_bins

__all__ = ["NSF"]


class NSF(FlowModel):
    """``transforms`` rational-quadratic spline transforms (Durkan et al., 2019) on ``features``-dimensional
    vectors, then a standard normal prior.

    Coupling (default): each transform is an LU-parameterised invertible linear map (``O(D)`` log-det; it mixes
    the features so that every one gets transformed; it starts as the identity, so the couplings start on the
    data's own coordinates) then a :class:`~fastflow.nn.SplineCoupling` (parities alternating) whose conditioner
    is an MLP (two hidden layers of width ``hidden``, zero-initialised output) on the kept half and the
    ``context``. ``autoregressive=True``: each transform is a
    :class:`~fastflow.nn.MaskedAutoregressiveSpline` (MADE conditioner, two hidden layers of width ``hidden``), the
    feature order reversed between transforms; its density is one network pass per transform but sampling
    ``features`` passes. A MADE keeps every dependency only with ``hidden >= features - 1`` (``>= features`` with a
    context; a narrower ``hidden`` warns: later features lose dependences): ``hidden=None`` (the default) is 64, or
    that minimum where it is wider for an autoregressive flow. ``config["hidden"]`` holds the width taken.

    ``features >= 2`` for couplings, ``>= 1`` with ``autoregressive=True`` (one feature: a spline conditioned on the
    context alone, e.g. a 1-D conditional density). Splines have ``bins`` bins (2 to 500 without a warning, at most
    1000) on ``[-bound, bound]`` and are the identity outside: standardise the data. Every transform starts at the
    identity map. API as :class:`~fastflow.models.TabularFlow`: ``log_prob(x, context=None)``, ``sample`` /
    ``rsample(n, context=None)``, ``encode`` / ``decode``; ``reversible=True`` trains with memory-saving reversible
    backprop.
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 5,
        bins: int = 8,
        hidden: int | None = None,
        bound: float = 3.0,
        autoregressive: bool = False,
        *,
        reversible: bool = False,
    ) -> None:
        check_bool("autoregressive", autoregressive)
        int_at_least("features", features, 1 if autoregressive else 2)  # a coupling splits the features in two
        int_at_least("context", context, 0)
        int_at_least("transforms", transforms, 1)
        check_layer_bins(bins)
        if hidden is None:
            hidden = default_made_hidden(features, context) if autoregressive else DEFAULT_HIDDEN
        int_at_least("hidden", hidden, 1)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise TypeError(f"bound must be a float, got {type(bound).__name__} {bound!r}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be finite and > 0, got {bound}")
        config = dict(
            features=features, context=context, transforms=transforms, bins=bins, hidden=hidden, bound=float(bound),
            autoregressive=autoregressive, reversible=reversible,
        )  # fmt: skip
        layers: list[FlowLayer] = []
        for i in range(transforms):
            if autoregressive:
                if i > 0:
                    layers.append(Permutation(features, "reverse"))
                layers.append(MaskedAutoregressiveSpline(features, hidden, bins, bound, context_features=context))
            else:
                layers.append(InvertibleLinear(features, init="identity"))
                layers.append(
                    SplineCoupling(features, hidden, bins, bound, i % 2, context_features=context, vectors=True)
                )
        prior = GaussianPrior((features,), learned=False)
        super().__init__([FlowSequential(*layers)], [], prior, (features,), None, config)
