"""Fixed permutations of the features (channels of images): reverse or random order; log-det 0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Union

import torch

from fastflow.nn.base import FlowLayer, check_features, zero_logdet

__all__ = ["Permutation", "PermutationOrder"]

PermutationOrder = Union[Literal["reverse", "random"], Sequence[int]]


def _order(features: int, order: PermutationOrder) -> torch.Tensor:
    if order == "reverse":
        return torch.arange(features - 1, -1, -1)
    if order == "random":
        return torch.randperm(features)
    if isinstance(order, str):
        raise ValueError(f"order must be 'reverse', 'random' or a sequence of indices, got {order!r}")
    perm = torch.as_tensor(list(order), dtype=torch.int64)
    if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(features)):
        raise ValueError(f"order must be a permutation of range({features}), got {list(order)}")
    return perm


class Permutation(FlowLayer):
    """``y[:, i] = x[:, perm[i]]`` along dim 1 of ``(B, D)`` or ``(B, C, H, W)``: a volume-preserving reordering
    (log-det 0) between couplings, so that every feature gets transformed. ``order`` is ``"reverse"``,
    ``"random"`` (drawn once from torch's generator) or the indices ``perm``; ``perm`` is a buffer, so the order
    is saved with the model."""

    def __init__(self, features: int, order: PermutationOrder = "reverse") -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1, got {features!r}")
        self.features = features
        perm = _order(features, order)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x[:, perm], 0)``; ``context`` is ignored."""
        check_features("x", x, self.features)
        return x.index_select(1, self.perm), zero_logdet(x)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y[:, perm^-1], 0)``."""
        check_features("y", y, self.features)
        return y.index_select(1, self.inverse_perm), zero_logdet(y)
