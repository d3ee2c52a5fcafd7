"""FlowSequential: a chain of flow layers whose log-dets add up."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fastflow.nn.base import FlowLayer, run_layer
from fastflow.nn.reversible import chain_backward_from_output, check_max_drift, reversible_chain

__all__ = ["FlowSequential"]


class FlowSequential(FlowLayer):
    """``forward`` runs the layers in order and sums log-dets; ``inverse`` runs them in reverse. A ``context``
    reaches every layer (those that use none ignore it).

    ``reversible=True`` trains with memory-saving reversible backprop (:mod:`fastflow.nn.reversible`):
    only the chain's input and output are kept, each layer's input is rebuilt by its inverse during
    backward. Same parameters, outputs and gradients (within ``max_drift``) as standard backprop. Like
    reentrant checkpointing, parameter gradients reach ``.grad`` through ``backward()`` and
    ``torch.autograd.grad`` w.r.t. the parameters.

    Layers that share parameter-only work (the ``C x C`` weights of :class:`~fastflow.nn.FlowStep`) define a
    static ``batched_weights(layers, x, inverse)`` returning one entry per layer, and take theirs as
    ``forward(x, context, weights=...)`` / ``inverse(y, context, weights=...)``: ``forward`` and ``inverse``
    compute it once for all such layers of the chain (a Glow level: one launch per operation, not one per step). In
    reversible training the layers compute their own.
    """

    def __init__(self, *layers: FlowLayer, reversible: bool = False, max_drift: float | None = None) -> None:
        super().__init__()
        self.reversible = reversible
        self.max_drift = check_max_drift(max_drift)
        for i, layer in enumerate(layers):
            if not (isinstance(layer, nn.Module) and callable(getattr(layer, "inverse", None))):
                raise TypeError(f"layers[{i}] ({type(layer).__name__}) is not invertible: it has no inverse()")
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def _batched_weights(self, x: torch.Tensor, inverse: bool) -> list[Any]:
        """One entry per layer: its share of ``batched_weights`` of all the layers of its type that have one,
        None for the others (and wherever ``batched_weights`` says None)."""
        weights: list[Any] = [None] * len(self.layers)
        groups: dict[Callable, list[int]] = {}
        for i, layer in enumerate(self.layers):
            batched = getattr(type(layer), "batched_weights", None)
            if batched is not None:
                groups.setdefault(batched, []).append(i)
        for batched, indices in groups.items():
            for i, layer_weights in zip(indices, batched([self.layers[i] for i in indices], x, inverse)):
                weights[i] = layer_weights
        return weights

    @property
    def uses_context(self) -> bool:
        """Whether some layer of the chain conditions on ``context``."""
        return any(getattr(layer, "uses_context", False) for layer in self.layers)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, sum of log-dets)``."""
        if self.reversible and torch.is_grad_enabled() and len(self.layers) > 0:
            return reversible_chain(self.layers, x, self.max_drift, context)
        total: torch.Tensor | None = None
        for layer, weights in zip(self.layers, self._batched_weights(x, inverse=False)):
            x, logdet = run_layer(layer, x, context) if weights is None else layer(x, context, weights=weights)
            total = logdet if total is None else total + logdet
        if total is None:
            raise ValueError("FlowSequential has no layers")
        return x, total

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, sum of inverse log-dets)``."""
        total: torch.Tensor | None = None
        for layer, weights in zip(reversed(self.layers), reversed(self._batched_weights(y, inverse=True))):
            if weights is None:
                y, logdet = run_layer(layer.inverse, y, context)
            else:
                y, logdet = layer.inverse(y, context, weights=weights)
            total = logdet if total is None else total + logdet
        if total is None:
            raise ValueError("FlowSequential has no layers")
        return y, total

    def backward_from_output(
        self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward of the chain from its output (nested chains keep their layers' fused paths)."""
        return chain_backward_from_output(self.layers, y, grad_y, grad_logdet, context)
