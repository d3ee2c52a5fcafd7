"""FlowSequential: a chain of flow layers whose log-dets add up."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fastflow.nn.actnorm_invconv import chain_units, run_units, shared_weights
from fastflow.nn.base import FlowLayer, run_layer
from fastflow.nn.reversible import (
    BackwardWeights,
    DriftRecord,
    chain_backward_from_output,
    check_max_drift,
    reversible_chain,
)
from fastflow.ops._checks import check_bool

__all__ = ["FlowSequential"]


class FlowSequential(FlowLayer):
    """``forward`` runs the layers in order and sums log-dets; ``inverse`` runs them in reverse. A ``context``
    reaches every layer (those that use none ignore it).

    An :class:`~fastflow.nn.ActNorm` directly followed by an :class:`~fastflow.nn.InvConv1x1` of its width runs as
    one op (:class:`~fastflow.nn.actnorm_invconv.ActNormInvConv`: on the Triton backends, and for vectors, ActNorm
    is folded into the 1x1 weight, one pass over memory), whoever built the chain. The parameter-only ``C x C`` work
    of those pairs (the LU weight or its inverse, the log-det, the fold) runs once for all the pairs of the chain
    and of the chains nested in it (a Glow level of :class:`~fastflow.nn.FlowStep`: one launch per operation, not
    one per step), and so does a standalone :class:`~fastflow.nn.InvConv1x1` (or linear map) for those of its width
    (:meth:`~fastflow.nn.InvConv1x1.batched_weights`): units that share such work define a static
    ``batched_weights(units, x, inverse)`` returning one entry per unit, and take theirs as ``forward(x, context,
    weights=...)`` / ``inverse(y, context, weights=...)``, as the chain itself does for its parent.

    ``reversible=True`` trains with memory-saving reversible backprop (:mod:`fastflow.nn.reversible`):
    only the chain's input and output are kept, each unit's input is rebuilt by its inverse during
    backward. Same parameters, outputs and gradients (within ``max_drift``) as standard backprop. Like
    reentrant checkpointing, parameter gradients reach ``.grad`` through ``backward()`` (nested backward calls);
    ``torch.autograd.grad`` w.r.t. the parameters does not return them (w.r.t. the input and the context it
    does, and leaves ``.grad`` untouched, as ``backward(inputs=...)`` does); no double backward
    (``create_graph=True`` raises); gradients accumulate into ``.grad`` through autograd, so its hooks (DDP's) see
    the accumulated gradient. As with ``torch.utils.checkpoint``, the backward runs the conditioners again: in
    training mode they must be deterministic (Dropout trips the drift guard); batch norms' running statistics are
    put back after the recompute (:mod:`fastflow.nn.recompute_state`). Reversible training
    batches the units' weights too: once for the forward, and in backward once for the rebuild and once (with a
    graph) for the recomputes (:func:`~fastflow.nn.reversible.chain_backward_from_output`).
    """

    def __init__(self, *layers: FlowLayer, reversible: bool = False, max_drift: float | None = None) -> None:
        super().__init__()
        self.reversible = reversible
        self.max_drift = max_drift
        for i, layer in enumerate(layers):
            if not (isinstance(layer, nn.Module) and callable(getattr(layer, "inverse", None))):
                raise TypeError(f"layers[{i}] ({type(layer).__name__}) is not invertible: it has no inverse()")
        self.layers = nn.ModuleList(layers)
        self.drift_record = DriftRecord()  # the deferred drift guard's device-side record (no state)

    @property
    def reversible(self) -> bool:
        """Whether the chain trains with reversible backprop (a bool, checked when set)."""
        return self._reversible

    @reversible.setter
    def reversible(self, value: bool) -> None:
        self._reversible = check_bool("reversible", value)

    @property
    def max_drift(self) -> float | None:
        """The reversible backward's drift tolerance (None: by dtype; ``math.inf``: off), checked when set."""
        return self._max_drift

    @max_drift.setter
    def max_drift(self, value: float | None) -> None:
        self._max_drift = check_max_drift(value)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def uses_context(self) -> bool:
        """Whether some layer of the chain conditions on ``context``."""
        for layer in self.layers:  # a loop, not any() over a generator: asked on every model call
            if getattr(layer, "uses_context", False):
                return True
        return False

    def _trains_reversibly(self) -> bool:
        return self.reversible and torch.is_grad_enabled() and len(self.layers) > 0

    @staticmethod
    def batched_weights(
        chains: Sequence[FlowSequential], x: torch.Tensor, inverse: bool = False
    ) -> list[list[Any] | None]:
        """Per chain in ``chains``, the weights of its units (one entry each, see the class docstring), computed
        together for the units of all the chains; None in the forward direction for a chain that trains
        reversibly (its reversible op batches its own)."""
        per_chain = [
            None if not inverse and chain._trains_reversibly() else chain_units(chain.layers) for chain in chains
        ]
        flat = shared_weights([unit for units in per_chain if units is not None for unit in units], x, inverse)
        weights: list[list[Any] | None] = []
        for units in per_chain:
            weights.append(None if units is None else flat[: len(units)])
            flat = flat[len(units or ()) :]
        return weights

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, weights: list[Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, sum of log-dets)``; ``weights`` are the chain's share of its parent's :meth:`batched_weights`
        (computed here when None)."""
        if self._trains_reversibly():
            return reversible_chain(self.layers, x, self.drift_record, self.max_drift, context)
        units = chain_units(self.layers)
        if weights is None:
            weights = shared_weights(units, x, inverse=False)
        x, total = run_units(units, x, context, weights)
        if total is None:
            raise ValueError("FlowSequential has no layers")
        return x, total

    def inverse(
        self, y: torch.Tensor, context: torch.Tensor | None = None, weights: list[Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, sum of inverse log-dets)``; ``weights`` as in :meth:`forward`, inverse direction."""
        units = chain_units(self.layers)
        if weights is None:
            weights = shared_weights(units, y, inverse=True)
        total: torch.Tensor | None = None
        for unit, unit_weights in zip(reversed(units), reversed(weights)):
            if unit_weights is None:
                y, logdet = run_layer(unit.inverse, y, context)
            else:
                y, logdet = unit.inverse(y, context, weights=unit_weights)
            total = logdet if total is None else total + logdet
        if total is None:
            raise ValueError("FlowSequential has no layers")
        return y, total

    def backward_from_output(
        self,
        y: torch.Tensor,
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        context: torch.Tensor | None = None,
        weights: BackwardWeights | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward of the chain from its output (nested chains keep their units' fused paths);
        ``weights``: the chain's share of its parent's (:func:`~fastflow.nn.reversible.chain_backward_from_output`)."""
        return chain_backward_from_output(self.layers, y, grad_y, grad_logdet, context, weights)
