"""FlowStep: one step of Glow, ActNorm -> InvConv1x1 -> coupling, on images or vectors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.base import as_pixels, check_features
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling
from fastflow.nn.coupling_network import Subnet
from fastflow.nn.invconv import InvConv1x1, exact_dtype, stack_tensors, stacked_weights, unstack_tensor
from fastflow.nn.reversible import recompute_backward
from fastflow.nn.sequential import FlowSequential
from fastflow.ops.actnorm_invconv import (
    FoldedMix,
    actnorm_invconv,
    actnorm_invconv_inverse,
    actnorm_is_folded,
    fold_actnorm,
    fold_actnorm_inverse,
)
from fastflow.ops.coupling import ScaleKind

__all__ = ["FlowStep", "CouplingKind", "StepWeights"]

CouplingKind = Literal["affine", "additive"]


class StepWeights(NamedTuple):
    """The ``C x C`` side of a step's ActNorm + 1x1 convolution in one direction: ``weight`` is ``W`` (forward)
    or ``W^-1`` (inverse), ``weight_logdet`` is ``log|det W|`` (a scalar) and ``folded`` ActNorm folded into
    them on the backends that fold (:func:`~fastflow.ops.actnorm_invconv.actnorm_is_folded`), else None."""

    weight: torch.Tensor
    weight_logdet: torch.Tensor
    folded: FoldedMix | None


class FlowStep(FlowSequential):
    """``ActNorm -> InvConv1x1 (LU or plain) -> affine or additive coupling`` on ``num_channels`` channels of
    ``(B, C, H, W)``, or on ``(B, D)`` vectors with ``vectors=True`` (the 1x1 convolution is then an invertible
    linear map). ``subnet``, ``context_features`` and ``vectors`` go to the coupling (:class:`AffineCoupling`),
    which alone sees the ``context``.

    ActNorm and the 1x1 convolution run as one op (:mod:`fastflow.ops.actnorm_invconv`): on the Triton
    backends ActNorm is folded into the mixing weight and the pair is one pass over memory; on the eager
    backend it is ActNorm then the convolution. The parameters, ``state_dict`` and outputs are those of the
    three layers run in sequence. The parameter-only ``C x C`` work (the LU weight or its inverse, the log-det,
    the fold) runs once for all the steps of a :class:`~fastflow.nn.FlowSequential` (a Glow level), batched
    (:meth:`batched_weights`); a step on its own, or in reversible training, does its own.
    """

    def __init__(
        self,
        num_channels: int,
        hidden: int = 512,
        lu: bool = True,
        coupling: CouplingKind = "affine",
        scale: ScaleKind = "sigmoid",
        *,
        subnet: Subnet | None = None,
        context_features: int = 0,
        vectors: bool = False,
    ) -> None:
        options = dict(subnet=subnet, context_features=context_features, vectors=vectors)
        if coupling == "affine":
            coupling_layer: AffineCoupling | AdditiveCoupling = AffineCoupling(num_channels, hidden, scale, **options)
        elif coupling == "additive":
            coupling_layer = AdditiveCoupling(num_channels, hidden, **options)
        else:
            raise ValueError(f"coupling must be 'affine' or 'additive', got {coupling!r}")
        super().__init__(ActNorm(num_channels), InvConv1x1(num_channels, lu=lu), coupling_layer)

    @property
    def actnorm(self) -> ActNorm:
        """The step's ActNorm layer."""
        return self.layers[0]  # type: ignore[return-value]

    @property
    def invconv(self) -> InvConv1x1:
        """The step's invertible 1x1 convolution."""
        return self.layers[1]  # type: ignore[return-value]

    @property
    def coupling(self) -> AffineCoupling | AdditiveCoupling:
        """The step's coupling layer."""
        return self.layers[2]  # type: ignore[return-value]

    @staticmethod
    def batched_weights(steps: Sequence[FlowStep], x: torch.Tensor, inverse: bool = False) -> list[StepWeights | None]:
        """The :class:`StepWeights` of every step in ``steps`` (a level), computed together: the steps'
        parameters are stacked and the LU assembly (or the solves of the inverse), the log-dets and the
        ActNorm fold run once for all of them, one launch per operation instead of one per step. Gradients
        reach each step's parameters as if it had computed its own.

        ``x`` is the level's input (it picks the backend, so whether to fold). Steps are batched in groups
        of one channel count, ``lu`` setting, dtype and device. An entry is None where the step computes its
        own weights, all in the forward direction: while some ActNorm of the level still has to initialise
        from this batch (its data-dependent init runs inside the step, on the step's input, and the fold needs
        the initialised parameters), and for a step that trains reversibly itself (its layers run one by
        one).
        """
        if not inverse and any(step.actnorm.training and not step.actnorm.is_initialized for step in steps):
            return [None] * len(steps)
        groups: dict[tuple, list[int]] = {}
        for i, step in enumerate(steps):
            if inverse or not (step.reversible and torch.is_grad_enabled()):
                logs = step.actnorm.logs
                key = (step.actnorm.num_channels, step.invconv.lu, logs.dtype, logs.device)
                groups.setdefault(key, []).append(i)
        weights: list[StepWeights | None] = [None] * len(steps)
        for indices in groups.values():
            group = [steps[i] for i in indices]
            for i, step_weights in zip(indices, FlowStep._compute_weights(group, x, inverse)):
                weights[i] = step_weights
        return weights

    @staticmethod
    def _compute_weights(steps: Sequence[FlowStep], x: torch.Tensor, inverse: bool) -> list[StepWeights]:
        """:meth:`batched_weights` for steps of one configuration whose ActNorms are ready."""
        with exact_dtype(x):
            weight, weight_logdet = stacked_weights([step.invconv for step in steps], inverse)
            if not actnorm_is_folded(x):
                return [
                    StepWeights(w, ld, None) for w, ld in zip(unstack_tensor(weight), unstack_tensor(weight_logdet))
                ]
            bias = stack_tensors([step.actnorm.bias.reshape(-1) for step in steps])
            logs = stack_tensors([step.actnorm.logs.reshape(-1) for step in steps])
            fold = fold_actnorm_inverse if inverse else fold_actnorm
            folded = fold(bias, logs, weight, weight_logdet)
            per_step = zip(unstack_tensor(weight), unstack_tensor(weight_logdet), *map(unstack_tensor, folded))
            return [StepWeights(w, ld, FoldedMix(fw, fb, fld)) for w, ld, fw, fb, fld in per_step]

    def _mix(self, x: torch.Tensor, weights: StepWeights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ActNorm then the 1x1 convolution, as one op; ``weights`` from the level, or computed here."""
        actnorm = self.actnorm
        actnorm.initialize_once(x)
        if weights is None:
            (weights,) = self._compute_weights([self], x, inverse=False)
        pixels = as_pixels(x)
        with exact_dtype(x):
            h, logdet = actnorm_invconv(
                pixels, actnorm.bias, actnorm.logs, weights.weight, weights.weight_logdet, weights.folded
            )
        return h.view_as(x), logdet

    def _unmix(self, y: torch.Tensor, weights: StepWeights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`_mix`."""
        actnorm = self.actnorm
        if weights is None:
            (weights,) = self._compute_weights([self], y, inverse=True)
        pixels = as_pixels(y)
        with exact_dtype(y):
            x, logdet = actnorm_invconv_inverse(
                pixels, actnorm.bias, actnorm.logs, weights.weight, weights.weight_logdet, weights.folded
            )
        return x.view_as(y), logdet

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, weights: StepWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` of the three layers in sequence; ``weights`` are the step's share of its level's
        :meth:`batched_weights` (computed here when None)."""
        check_features("x", x, self.actnorm.num_channels)
        if self.reversible and torch.is_grad_enabled():
            return super().forward(x, context)
        h, mix_logdet = self._mix(x, weights)
        y, coupling_logdet = self.coupling(h, context)
        return y, mix_logdet + coupling_logdet

    def inverse(
        self, y: torch.Tensor, context: torch.Tensor | None = None, weights: StepWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, logdet)`` of the inverse, coupling first; ``weights`` as in :meth:`forward`, inverse direction."""
        check_features("y", y, self.actnorm.num_channels)
        h, coupling_logdet = self.coupling.inverse(y, context)
        x, mix_logdet = self._unmix(h, weights)
        return x, mix_logdet + coupling_logdet

    def backward_from_output(
        self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward: the coupling's fused pass, then the mixing pair rebuilt and recomputed."""
        h, grad_h = self.coupling.backward_from_output(y, grad_y, grad_logdet, context)
        params = [*self.actnorm.parameters(), *self.invconv.parameters()]
        return recompute_backward(self._mix, self._unmix, params, h, grad_h, grad_logdet)
