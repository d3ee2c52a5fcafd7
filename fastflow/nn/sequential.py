"""FlowSequential: a chain of flow layers whose log-dets add up."""

from __future__ import annotations

import torch
from torch import nn

from fastflow.nn.base import FlowLayer
from fastflow.nn.reversible import chain_backward_from_output, check_max_drift, reversible_chain

__all__ = ["FlowSequential"]


class FlowSequential(FlowLayer):
    """``forward`` runs the layers in order and sums log-dets; ``inverse`` runs them in reverse.

    ``reversible=True`` trains with memory-saving reversible backprop (:mod:`fastflow.nn.reversible`):
    only the chain's input and output are kept, each layer's input is rebuilt by its inverse during
    backward. Same parameters, outputs and gradients (within ``max_drift``) as standard backprop. Like
    reentrant checkpointing, parameter gradients reach ``.grad`` through ``backward()`` and
    ``torch.autograd.grad`` w.r.t. the parameters.
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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, sum of log-dets)``."""
        if self.reversible and torch.is_grad_enabled() and len(self.layers) > 0:
            return reversible_chain(self.layers, x, self.max_drift)
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

    def backward_from_output(
        self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward of the chain from its output (nested chains keep their layers' fused paths)."""
        return chain_backward_from_output(self.layers, y, grad_y, grad_logdet)
