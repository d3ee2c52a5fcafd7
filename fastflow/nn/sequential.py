"""FlowSequential: a chain of flow layers whose log-dets add up."""

from __future__ import annotations

import torch
from torch import nn

from fastflow.nn.base import FlowLayer

__all__ = ["FlowSequential"]


class FlowSequential(FlowLayer):
    """``forward`` runs the layers in order and sums log-dets; ``inverse`` runs them in reverse."""

    def __init__(self, *layers: FlowLayer) -> None:
        super().__init__()
        for i, layer in enumerate(layers):
            if not (isinstance(layer, nn.Module) and callable(getattr(layer, "inverse", None))):
                raise TypeError(f"layers[{i}] ({type(layer).__name__}) is not invertible: it has no inverse()")
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, sum of log-dets)``."""
        total: torch.Tensor | None = None
        for layer in self.layers:
            x, logdet = layer(x)
            total = logdet if total is None else total + logdet
        if total is None:
            raise ValueError("FlowSequential has no layers")
        return x, total

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, sum of inverse log-dets)``."""
        total: torch.Tensor | None = None
        for layer in reversed(self.layers):
            y, logdet = layer.inverse(y)
            total = logdet if total is None else total + logdet
        if total is None:
            raise ValueError("FlowSequential has no layers")
        return y, total
