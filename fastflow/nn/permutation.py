"""Fixed permutations of the features (channels of images): reverse or random order; log-det 0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Union

import torch

from fastflow.nn.base import FlowLayer, check_features, zero_logdet

__all__ = ["Permutation", "PermutationOrder", "loaded_permutation_error"]

PermutationOrder = Union[Literal["reverse", "random"], Sequence[int]]


def _order(features: int, order: PermutationOrder) -> torch.Tensor:
    if isinstance(order, str):
        if order == "reverse":
            return torch.arange(features - 1, -1, -1)
        if order == "random":
            return torch.randperm(features)
        raise ValueError(f"order must be 'reverse', 'random' or a sequence of indices, got {order!r}")
    if isinstance(order, (set, frozenset, dict)):  # no order of their own
        raise TypeError(f"order must be 'reverse', 'random' or a sequence of indices, got a {type(order).__name__}")
    try:
        perm = torch.as_tensor(order)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"order must be 'reverse', 'random' or a sequence of indices, got {order!r}") from err
    if perm.dtype == torch.bool or perm.dtype.is_floating_point or perm.dtype.is_complex:
        raise TypeError(f"order must hold integer indices, got {perm.dtype} values {perm.tolist()}")
    perm = perm.to(torch.int64)
    if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(features)):
        raise ValueError(f"order must be a permutation of range({features}), got {perm.tolist()}")
    return perm


def loaded_permutation_error(state_dict: dict[str, Any], key: str, size: int) -> str | None:
    """Why ``state_dict[key]``, a permutation buffer about to be loaded, is not a permutation of ``range(size)``
    (None where it is, or is absent): an index missing or repeated would leave outputs unwritten or lose inputs."""
    perm = state_dict.get(key)
    if perm is None:
        return None
    valid = (
        isinstance(perm, torch.Tensor)
        and perm.dim() == 1
        and not (perm.dtype == torch.bool or perm.dtype.is_floating_point or perm.dtype.is_complex)
        and torch.equal(perm.sort().values.cpu(), torch.arange(size))
    )
    return None if valid else f"{key} must be a permutation of range({size}), got {perm!r}"


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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Refuses (through ``load_state_dict``'s error list) a ``perm`` that is not a permutation of the features, or
        an ``inverse_perm`` that is not its inverse."""
        error = loaded_permutation_error(state_dict, prefix + "perm", self.features)
        inverse = state_dict.get(prefix + "inverse_perm")
        if error is None and inverse is not None and prefix + "perm" in state_dict:
            if not torch.equal(torch.as_tensor(inverse).cpu(), torch.argsort(state_dict[prefix + "perm"].cpu())):
                error = f"{prefix}inverse_perm must be the inverse of {prefix}perm, got {inverse!r}"
        super()._load_from_state_dict(state_dict, prefix, *args)
        if error is not None:
            args[-1].append(error)  # error_msgs: load_state_dict raises with it

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x[:, perm], 0)``; ``context`` is ignored."""
        check_features("x", x, self.features)
        return x.index_select(1, self.perm), zero_logdet(x)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y[:, perm^-1], 0)``."""
        check_features("y", y, self.features)
        return y.index_select(1, self.inverse_perm), zero_logdet(y)
