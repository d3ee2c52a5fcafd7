"""ActNorm followed by an InvConv1x1 as one op: the unit every flow container runs for that pair of layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from fastflow.nn.actnorm import ActNorm
from fastflow.nn.base import as_pixels, check_features, group_indices, run_layer, runs_as_written
from fastflow.nn.invconv import (
    InvConv1x1,
    assembles_as_written,
    exact_dtype,
    stack_tensors,
    stacked_weights,
    unstack_tensor,
)
from fastflow.nn.nested_backward import nested_backward
from fastflow.ops._checks import cast, check_float_tensor, check_same_device, logdet_dtype
from fastflow.ops.actnorm_invconv import (
    FoldedMix,
    actnorm_invconv,
    actnorm_invconv_inverse,
    actnorm_is_folded,
    fold_actnorm,
    fold_actnorm_inverse,
)
from fastflow.ops.channel_mix import channel_mix, channel_mix_grads, channel_mix_grads_ref, channel_mix_ref

if TYPE_CHECKING:
    from fastflow.nn.reversible import BackwardWeights

__all__ = ["ActNormInvConv", "MixWeights", "chain_units", "run_units", "shared_weights"]


class MixWeights(NamedTuple):
    """The ``C x C`` side of an ActNorm + 1x1 convolution pair in one direction: ``weight`` is ``W`` (forward)
    or ``W^-1`` (inverse), ``weight_logdet`` is ``log|det W|`` (a scalar) and ``folded`` ActNorm folded into
    them on the backends that fold (:func:`~fastflow.ops.actnorm_invconv.actnorm_is_folded`), else None."""

    weight: torch.Tensor
    weight_logdet: torch.Tensor
    folded: FoldedMix | None


class ActNormInvConv:
    """``ActNorm`` then ``InvConv1x1`` of the same width, run as one op
    (:func:`~fastflow.ops.actnorm_invconv.actnorm_invconv`): on the Triton backends (and for vectors on every
    backend) ActNorm is folded into the mixing weight, ``y = W diag(exp(logs)) (x + bias)`` in one pass over
    memory; on images on the eager backend it is ActNorm then the convolution. Log-det
    ``H * W * (sum(logs) + log|det W|)``, negated by :meth:`inverse`.

    Not a module: a view of two layers a container holds (their parameters, ``state_dict`` and outputs are
    theirs), made by :func:`chain_units` each time the container runs. The flow-layer contract
    (``forward(x, context=None)``, ``inverse``) plus ``weights``: the pair's share of
    :meth:`batched_weights` of its container, computed here when None.
    """

    def __init__(self, actnorm: ActNorm, invconv: InvConv1x1) -> None:
        self.actnorm = actnorm
        self.invconv = invconv

    def parameters(self) -> list[nn.Parameter]:
        """The parameters of both layers."""
        return [*self.actnorm.parameters(), *self.invconv.parameters()]

    def __call__(
        self, x: torch.Tensor, context: torch.Tensor | None = None, weights: MixWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(x, context, weights)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, weights: MixWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` of ActNorm then the 1x1 convolution on ``(B, C, H, W)`` or ``(B, C)``; ``context`` is
        ignored. ActNorm's data-dependent initialisation runs first where it is due."""
        actnorm = self.actnorm
        check_features("x", x, actnorm.num_channels)
        actnorm.initialize_once(x)
        if weights is None:
            (weights,) = self._compute_weights([self], x, inverse=False)
        with exact_dtype(x):
            return actnorm_invconv(x, actnorm.bias, actnorm.logs, weights.weight, weights.weight_logdet, weights.folded)

    def inverse(
        self, y: torch.Tensor, context: torch.Tensor | None = None, weights: MixWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, -logdet)``: the 1x1 convolution's inverse, then ActNorm's; ``weights`` in the inverse direction."""
        actnorm = self.actnorm
        check_features("y", y, actnorm.num_channels)
        if weights is None:
            (weights,) = self._compute_weights([self], y, inverse=True)
        with exact_dtype(y):
            return actnorm_invconv_inverse(
                y, actnorm.bias, actnorm.logs, weights.weight, weights.weight_logdet, weights.folded
            )

    def backward_from_output(
        self,
        y: torch.Tensor,
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        context: torch.Tensor | None = None,
        weights: BackwardWeights | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward from the output, ``(x, grad_x)``, in closed form (no recompute, no graph): the
        mix ``y = M a + c`` per pixel (``M = W`` and ``a`` ActNorm's output on images on the eager backend;
        ``M = W diag(exp(logs))``, ``c = M bias`` and ``a = x`` where ActNorm is folded) is undone with the
        inverse weights, ``grad_a = M^T grad_y``, ``grad_M = sum grad_y a^T``, ``grad_c = sum grad_y``; unfolded,
        ActNorm's ``grad_x = grad_a exp(logs)``, ``grad_bias = sum grad_x``, ``grad_logs = sum grad_a a`` (read off
        ``W`` and ``grad_M``: the column sums of their elementwise product); and the
        log-det ``H W (sum(logs) + log|det W|)`` adds ``H W sum_b grad_logdet`` to the gradients of ``logs`` and
        ``log|det W|`` (of the folded log-det). ``weights``: the pair's share of its chain's
        (:class:`~fastflow.nn.reversible.BackwardWeights`, whose forward leaves take their gradients), computed
        here when None. Parameter gradients reach ``.grad`` through one ``torch.autograd.backward``; with
        ``weights.pending``, the leaves' gradients are written to their ``.grad`` and ActNorm's go to ``pending``,
        for the chain's one backward (no nested backward here)."""
        actnorm = self.actnorm
        check_features("y", y, actnorm.num_channels)
        check_float_tensor("grad_y", grad_y)
        if grad_y.shape != y.shape:
            raise ValueError(f"grad_y must have the shape of y {tuple(y.shape)}, got {tuple(grad_y.shape)}")
        check_same_device("grad_y", grad_y, "y", y)
        if weights is None:
            with torch.no_grad():
                (inverse,) = self._compute_weights([self], y, inverse=True)
            (forward,) = self._compute_weights([self], y, inverse=False)
        else:
            inverse, forward = weights.inverse, weights.forward
        out, grad_out = as_pixels(y), as_pixels(grad_y)
        logdet_grad = cast(grad_logdet, logdet_dtype(y.dtype)).sum() * (out.shape[2] * out.shape[3])
        with torch.no_grad(), exact_dtype(y):
            if forward.folded is not None:
                x = channel_mix(out, inverse.folded.weight, inverse.folded.bias)
                grad_x, grad_weight, grad_bias = channel_mix_grads(grad_out, x, forward.folded.weight)
                pairs = [
                    (forward.folded.weight, grad_weight),
                    (forward.folded.bias, grad_bias),
                    (forward.folded.logdet, logdet_grad),
                ]
                params: list[tuple[torch.Tensor, torch.Tensor]] = []
            else:
                # unfolded only on the eager backend: its twins directly (the layer's own tensors, no checks)
                a = channel_mix_ref(out, inverse.weight)
                grad_a, grad_weight, _ = channel_mix_grads_ref(grad_out, a, forward.weight, bias_grad=False)
                scale = cast(torch.exp(actnorm.logs), a.dtype)
                # sum_{b,p} grad_a a = sum_o W[o, c] grad_W[o, c] (grad_a = W^T grad_y): C x C work, no pass over pixels
                grad_logs = (cast(forward.weight, a.dtype) * grad_weight).sum(0) + logdet_grad
                x = a.mul_(cast(torch.exp(-actnorm.logs), a.dtype)).sub_(cast(actnorm.bias, a.dtype))
                grad_x = grad_a.mul_(scale)
                pairs = [(forward.weight, grad_weight), (forward.weight_logdet, logdet_grad)]
                params = [(actnorm.bias, grad_x.sum((0, 2, 3), keepdim=True)), (actnorm.logs, grad_logs)]
        _take_gradients(pairs, params, None if weights is None else weights.pending)
        return x.view_as(y), grad_x.view_as(y)

    @staticmethod
    def batched_weights(
        pairs: Sequence[ActNormInvConv], x: torch.Tensor, inverse: bool = False
    ) -> list[MixWeights | None]:
        """The :class:`MixWeights` of every pair in ``pairs`` (all those of a Glow level), computed together: the
        parameters are stacked and the LU assembly (or the solves of the inverse), the log-dets and the ActNorm
        fold run once for all of them, one launch per operation instead of one per pair. Gradients reach each
        pair's parameters as if it had computed its own.

        ``x`` is the container's input (its device picks the backend, so whether to fold). Pairs are batched in
        groups of one channel count, ``lu`` setting, dtype and device. In the forward direction every entry is
        None (each pair computes its own) while some ActNorm still has to initialise from this batch: its
        data-dependent init runs on the pair's input, and the fold needs the initialised parameters.
        """
        keys = [(p.actnorm.num_channels, p.invconv.lu, p.actnorm.logs.dtype, p.actnorm.logs.device) for p in pairs]
        groups = group_indices(keys, x, inverse)
        if not inverse and any(pair.actnorm.training and not pair.actnorm.is_initialized for pair in pairs):
            return [None] * len(pairs)
        weights: list[MixWeights | None] = [None] * len(pairs)
        for indices in groups:
            group = [pairs[i] for i in indices]
            for i, pair_weights in zip(indices, ActNormInvConv._compute_weights(group, x, inverse)):
                weights[i] = pair_weights
        return weights

    @staticmethod
    def _compute_weights(pairs: Sequence[ActNormInvConv], x: torch.Tensor, inverse: bool) -> list[MixWeights]:
        """:meth:`batched_weights` for pairs of one configuration whose ActNorms are ready."""
        with exact_dtype(x):
            weight, weight_logdet = stacked_weights([pair.invconv for pair in pairs], inverse)
            if not actnorm_is_folded(x):
                return [MixWeights(w, ld, None) for w, ld in zip(unstack_tensor(weight), unstack_tensor(weight_logdet))]
            # (K, C): the (1, C, 1, 1) parameters stacked whole, then one view (a view per parameter before the
            # stack cost a node each way, forward and backward)
            bias = stack_tensors([pair.actnorm.bias for pair in pairs]).reshape(len(pairs), -1)
            logs = stack_tensors([pair.actnorm.logs for pair in pairs]).reshape(len(pairs), -1)
            fold = fold_actnorm_inverse if inverse else fold_actnorm
            folded = fold(bias, logs, weight, weight_logdet)
            per_pair = zip(unstack_tensor(weight), unstack_tensor(weight_logdet), *map(unstack_tensor, folded))
            return [MixWeights(w, ld, FoldedMix(fw, fb, fld)) for w, ld, fw, fb, fld in per_pair]


def _take_gradients(
    weights: list[tuple[torch.Tensor, torch.Tensor]],
    params: list[tuple[torch.Tensor, torch.Tensor]],
    pending: list[tuple[torch.Tensor, torch.Tensor]] | None,
) -> None:
    """Hand the gradients of a pair's reversible backward on: ``weights`` pairs ``(tensor, gradient)`` for its mixing
    weights, ``params`` for ActNorm's parameters, each gradient cast and shaped like its tensor. Without
    ``pending``, one ``torch.autograd.backward`` for all. With it (the weights are then the detached leaves of the
    chain's walk, used by this pair alone), the weights' gradients are written to their ``.grad`` and the
    parameters' appended to ``pending``, for the walk's own backward (parameters keep autograd's accumulation and
    hooks: DistributedDataParallel's)."""
    weights, params = (
        [(t, cast(g, t.dtype).reshape(t.shape)) for t, g in pairs if t.requires_grad] for pairs in (weights, params)
    )
    if pending is None:
        used = weights + params
        if used:
            nested_backward([t for t, _ in used], [g for _, g in used])
        return
    for t, g in weights:
        t.grad = g if t.grad is None else t.grad + g
    pending.extend(params)


def _is_pair(first: ActNorm, second: InvConv1x1) -> bool:
    same_width = first.num_channels == second.num_channels
    return same_width and runs_as_written(first, ActNorm) and assembles_as_written(second)


def chain_units(layers: Iterable[nn.Module]) -> list[nn.Module | ActNormInvConv]:
    """What a container runs for ``layers``, in order: the layers, except that an :class:`ActNorm` directly
    followed by an :class:`InvConv1x1` of its width (or :class:`~fastflow.nn.InvertibleLinear`) becomes one
    :class:`ActNormInvConv`, unless either has hooks or a subclass's own ``forward`` or ``inverse``, or the
    convolution its own weight methods (:func:`~fastflow.nn.invconv.assembles_as_written`): those run as the layers
    they are."""
    units: list[nn.Module | ActNormInvConv] = []
    for layer in layers:
        previous = units[-1] if units else None
        if isinstance(layer, InvConv1x1) and isinstance(previous, ActNorm) and _is_pair(previous, layer):
            units[-1] = ActNormInvConv(previous, layer)  # type: ignore[arg-type]
        else:
            units.append(layer)
    return units


def shared_weights(units: Sequence[Any], x: torch.Tensor, inverse: bool) -> list[Any]:
    """One entry per unit of a container: its share of ``batched_weights`` of all the units of its type that have
    one (computed together: one call per type), None for the others (and wherever ``batched_weights`` says None).
    ``x`` is the container's input (``inverse``: its output)."""
    weights: list[Any] = [None] * len(units)
    groups: dict[Callable, list[int]] = {}
    for i, unit in enumerate(units):
        batched = getattr(type(unit), "batched_weights", None)
        if batched is not None:  # no setdefault: torch < 2.5's Dynamo cannot trace it
            if batched not in groups:
                groups[batched] = []
            groups[batched].append(i)
    for batched, indices in groups.items():
        for i, unit_weights in zip(indices, batched([units[i] for i in indices], x, inverse)):
            weights[i] = unit_weights
    return weights


def run_units(
    units: Sequence[Any], x: torch.Tensor, context: torch.Tensor | None, weights: Sequence[Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, sum of log-dets)`` of ``units`` run forward in order from ``x``, each with its entry of ``weights``
    (:func:`shared_weights`; a unit with None computes its own); the log-det is None for no units."""
    total: torch.Tensor | None = None
    for unit, unit_weights in zip(units, weights):  # one entry per unit (shared_weights)
        x, logdet = run_layer(unit, x, context) if unit_weights is None else unit(x, context, weights=unit_weights)
        total = logdet if total is None else total + logdet
    return x, total
