"""Memory-saving reversible backprop over a chain of flow layers.

Forward runs the layers without recording a graph and keeps only the chain's input and output. Backward
walks the layers from the last: it rebuilds each layer's input from its output with the exact inverse,
recomputes that one layer with a graph, and backpropagates through it, so activation memory does not grow
with depth. A layer may provide ``backward_from_output(y, grad_y, grad_logdet, context)`` to rebuild its input
and compute its gradients in one fused pass (the couplings do); others use ``inverse`` then recompute. A layer's
``backward_from_handed(handed, grad_logdet, context)``, where it has one and takes no share of batched weights, is
called instead with ``handed = [y, grad_y]``, which it empties: the walk keeps no reference to them, so the layer
frees them as soon as it is done with them (Jet's couplings drop them once their halves are gathered). The
chain's own ``grad_y`` is held by autograd for the whole backward, so only the walk's later ones are freed. The
walk is over :func:`~fastflow.nn.actnorm_invconv.chain_units`: an ActNorm directly followed by an InvConv1x1 is one
unit, run and recomputed as the one fused op. Units that share parameter-only work (``batched_weights``: the
``C x C`` weights of a Glow level's pairs, or of a chain's standalone 1x1 convolutions) get it batched as in
standard mode: once for the forward, and in backward once for the rebuild and once with a graph for the
recomputes, which take the weights as detached leaves; one backward through that graph at the end of the walk
takes the leaves' gradients to the parameters.
Parameter gradients are accumulated into ``.grad`` by nested backward calls, as reentrant checkpointing does:
``loss.backward()`` (and DDP) see them. ``torch.autograd.grad`` and ``loss.backward(inputs=[...])`` leave them
as they were, whatever they name (the parameters are no inputs of the chain's autograd node, so which ones a
backward names cannot be told): ``torch.autograd.grad(loss, x)`` gives x's gradient alone, as in standard mode,
and parameter gradients come from ``loss.backward()``. There is no double backward (``create_graph=True``
raises). A ``context`` is an input of the chain like ``x``: every layer sees it, and its gradient (the sum over
the layers, collected on a leaf during the walk) is returned to autograd, so ``torch.autograd.grad`` w.r.t. the
context works.

Drift guard: after the walk, the rebuilt chain input is compared with the saved one (relative drift
``max|x_rebuilt - x| / max(max|x|, 0.1 max|y|)`` against ``max_drift``, ``y`` the chain output). How a drift
beyond it is reported depends on where the forward ran:

- immediately, by default: the backward reads the drift (a host sync) and raises :class:`ReconstructionError`
  instead of returning gradients computed at wrong points, and the chain's parameters keep the ``.grad`` they
  had before the backward: the walk accumulates into ``.grad`` through autograd (its hooks, DDP's reducer, see
  the accumulated gradient), and a failed check writes the values it found back into the same tensors (a copy
  is kept meanwhile). With ``None`` gradients (``zero_grad()``'s default) that costs nothing; accumulated
  gradients need one chain's worth of parameter gradients more while its backward runs.
- deferred, when the forward ran inside :func:`deferred_guards`, under ``torch.compile`` tracing or during CUDA
  graph capture (:func:`guards_deferred`): the backward makes no host read. It keeps the largest
  ``drift / max_drift`` of the chain since the last read in a device tensor (:class:`DriftRecord`) and
  accumulates its gradients into ``.grad`` whatever the drift: deciding otherwise would need the read. The
  error is raised when the record is read (:func:`read_drift_guard`, or ``FlowModel.check_guards``), and it
  covers every backward since the previous read. ``fastflow.train`` reads on its logging steps and, on the
  device, skips the optimizer updates from a step whose guard tripped on, so such gradients never reach the
  weights (except under fp16 loss scaling, whose scaler decides the skips).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastflow.backend import functorch_transforms_active, legacy_batched
from fastflow.nn.actnorm_invconv import chain_units, run_units, shared_weights
from fastflow.nn.base import run_layer
from fastflow.nn.module_walk import trainable_parameters
from fastflow.nn.nested_backward import nested_backward
from fastflow.nn.recompute_state import running_statistics_kept

__all__ = [
    "BackwardWeights",
    "DEFAULT_MAX_DRIFT",
    "TF32_MAX_DRIFT",
    "DriftRecord",
    "ReconstructionError",
    "chain_backward_from_output",
    "check_max_drift",
    "default_max_drift",
    "deferred_guards",
    "drift_tripped",
    "guards_deferred",
    "read_drift_guard",
    "recompute_backward",
    "reversible_chain",
]

# Relative drift max|x_rebuilt - x| / max(max|x|, 0.1 max|y|) tolerated per chain, by dtype of the chain input.
DEFAULT_MAX_DRIFT = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
TF32_MAX_DRIFT = 5e-2
"""Default for float32 chains on CUDA while ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default):
the coupling networks' convolutions then compute with TF32's 10-bit mantissa, float16's, so rebuilding a
coupling's input from an output that carries float32 rounding re-evaluates its network on operands that may
round to neighbouring TF32 values. Measured on an H100 (``tests/test_gpu.py``): 1.1e-3 through 32 Glow
steps of perturbed weights, over the 1e-3 float32 default. The invertible mixes themselves stay IEEE."""


class ReconstructionError(RuntimeError):
    """The input rebuilt by the inverse drifted from the true input beyond the tolerance."""


_CAUSES = (
    "Causes: near-zero coupling scales, low precision; train this part without reversible=True or raise max_drift."
)


_DEFERRED: ContextVar[bool] = ContextVar("fastflow_deferred_guards", default=False)


@contextmanager
def deferred_guards() -> Iterator[None]:
    """Within the block fastflow's guards record on the device instead of reading it (no host sync): the drift
    check of reversible backward passes whose forward ran in the block, and ``FlowModel``'s finite check
    (``check_finite``) and class-label range check. Read them later with ``FlowModel.check_guards`` (or
    :func:`read_drift_guard` for a bare chain). ``fastflow.train`` runs every training step in it."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


def guards_deferred(x: torch.Tensor) -> bool:
    """Whether a guard about ``x`` must record on the device instead of reading it now: inside
    :func:`deferred_guards`, while ``torch.compile`` traces (a read would break the graph), or while ``x``'s CUDA
    stream is being captured into a graph (a read would fail the capture)."""
    if torch.compiler.is_compiling():
        return True
    return _DEFERRED.get() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def moved_record(record: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """A guard's record as a module's ``_apply(fn)`` moves it: ``fn(record)``, except that a record on the meta
    device (a model built there) holds nothing and becomes zeros (``to_empty`` would leave its memory
    uninitialised: a failure nobody saw)."""
    moved = fn(record)
    return torch.zeros_like(moved) if record.is_meta else moved


class DriftRecord(nn.Module):
    """What the deferred drift checks of one reversible chain saw since the last read, kept without a host read.

    A submodule of its chain (:class:`~fastflow.nn.FlowSequential` makes one at construction), so it moves with
    the model and ``torch.compile`` sees the same module state from the first step on (no recompile when the
    first backward records); it adds nothing to the state dict. ``excess`` (a 0-dim tensor, float32 unless the
    model is cast) is the largest ``drift / max_drift`` of the chain's backward passes: above 1 the guard tripped,
    NaN means a non-finite rebuilt input. ``max_drift`` is the tolerance of the latest pass (the error gives the
    ratio: a tolerance changed between reads would misstate a drift computed back from it).
    ``excess`` is no buffer (it moves and casts with the module all the same): DistributedDataParallel broadcasts
    buffers from rank 0 at every forward, which would overwrite another rank's record of a drift.
    """

    def __init__(self) -> None:
        super().__init__()
        self.excess = torch.zeros((), dtype=torch.float32)
        self.max_drift = math.inf

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DriftRecord:
        self.excess = moved_record(self.excess, fn)
        return super()._apply(fn, recurse)

    def note(self, drift: torch.Tensor, max_drift: float) -> None:
        """Fold a backward pass's relative ``drift`` (0-dim, on the device) into the record, in place."""
        torch.maximum(self.excess, drift / max_drift, out=self.excess)  # NaN propagates: a NaN drift stays tripped
        self.max_drift = max_drift


_CACHE_ATTRIBUTE = "_drift_record_names"  # where a model caches the module paths of the records under it


def _records(module: nn.Module) -> list[tuple[str, DriftRecord]]:
    """The drift records of the chains in ``module`` set to train reversibly, named by their chain's module path.
    The paths are found once per model (walking a deep model's thousand modules every step would cost
    milliseconds) and kept as names, so a copy of the model finds its own records."""
    names = module.__dict__.get(_CACHE_ATTRIBUTE)
    if names is None:
        names = [name for name, m in module.named_modules() if isinstance(m, DriftRecord)]
        if not torch.compiler.is_compiling():  # torch < 2.7's Dynamo cannot write a module's __dict__
            module.__dict__[_CACHE_ATTRIBUTE] = names
    records = []
    for name in names:
        path, _, attribute = name.rpartition(".")
        chain = module
        for part in path.split(".") if path else ():  # not get_submodule: torch < 2.5's Dynamo cannot trace it
            chain = getattr(chain, part)
        if getattr(chain, "reversible", False):
            records.append((path, getattr(chain, attribute)))
    return records


def _stacked_excess(records: list[tuple[str, DriftRecord]]) -> torch.Tensor:
    device = records[0][1].excess.device
    return torch.stack([record.excess.to(device) for _, record in records])


def drift_tripped(module: nn.Module) -> torch.Tensor | None:
    """Whether a deferred drift check of a reversible chain in ``module`` tripped since the last read: a 0-dim bool
    tensor on the device (``None`` when no chain trains reversibly), computed without a host read."""
    records = _records(module)
    if not records:
        return None
    return ~(_stacked_excess(records) <= 1).all()  # ~(<=) rather than >: NaN trips it


def read_drift_guard(module: nn.Module) -> ReconstructionError | None:
    """Read (one host transfer) and clear the drift records of the reversible chains in ``module``: the
    :class:`ReconstructionError` to raise, naming every chain whose backward rebuilt its input with a relative
    drift beyond ``max_drift`` in some pass since the last read, or ``None``."""
    records = _records(module)
    if not records:
        return None
    excess = _stacked_excess(records).tolist()
    for _, record in records:
        record.excess.zero_()
    tripped = [
        f"{name or 'the chain'} ({ratio:.3g} times its max_drift, {record.max_drift:.3g} in the latest pass)"
        for (name, record), ratio in zip(records, excess)
        if not ratio <= 1
    ]
    if not tripped:
        return None
    return ReconstructionError(
        f"reversible backward rebuilt the input with a relative drift beyond max_drift in {', '.join(tripped)} in a "
        "backward pass since the drift was last read; the gradients of that pass were computed at wrong points. "
        f"{_CAUSES}"
    )


def recompute_backward(
    forward: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inverse: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    params: list[nn.Parameter],
    y: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
    context: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, grad_x)`` of the map ``forward`` from its output: rebuild ``x = inverse(y[, context])``, recompute
    ``forward(x[, context])`` with a graph and backpropagate. Parameter gradients, and the gradient of ``context``
    where it is a leaf that requires grad, are accumulated into ``.grad`` by the nested backward (through
    AccumulateGrad nodes, so DDP hooks fire)."""
    with torch.no_grad():
        x, _ = run_layer(inverse, y, context)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y_again, logdet = run_layer(forward, x, context)
        outputs, grads = [y_again], [grad_y]
        if logdet.requires_grad:
            outputs.append(logdet)
            grads.append(grad_logdet.to(logdet.dtype))
        inputs = [x, *(p for p in params if p.requires_grad)]
        if context is not None and context.requires_grad:
            inputs.append(context)
        nested_backward(outputs, grads, inputs=inputs)
    return x.detach(), x.grad


class BackwardWeights(NamedTuple):
    """A unit's share of its chain's batched weights in reversible backward (entries of :func:`shared_weights`):
    ``inverse`` to rebuild its input, ``forward`` (detached leaves that require grad) to recompute its output. The
    gradients the recompute leaves on ``forward`` are taken on to the parameters by whoever made the leaves.

    ``pending``: where a unit may put ``(parameter, gradient)`` pairs instead of backpropagating them itself; whoever
    made the leaves takes them to ``.grad`` in its one backward with the leaves' (one nested backward per chain,
    not one per unit). None: the unit backpropagates its own."""

    inverse: Any
    forward: Any
    pending: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def _walked(weights: Any) -> bool:
    """Whether :func:`_tensors` and :func:`_as_leaves` walk ``weights`` themselves: a plain list or tuple or a named
    tuple, which torch's pytree would flatten alike (it keeps list and tuple subclasses whole, as leaves)."""
    kind = type(weights)
    return kind is list or kind is tuple or (issubclass(kind, tuple) and hasattr(kind, "_fields"))


def _tensors(weights: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``weights`` in the order of torch's pytree leaves: plain lists and tuples and named tuples
    walked here (the pytree costs host time on every backward), other containers flattened by the pytree."""
    if isinstance(weights, torch.Tensor):
        yield weights
    elif _walked(weights):
        for entry in weights:
            yield from _tensors(entry)
    elif weights is not None:
        yield from (leaf for leaf in tree_flatten(weights)[0] if isinstance(leaf, torch.Tensor))


def _weight_tensors(weights: Any) -> list[torch.Tensor]:
    return [t for t in _tensors(weights) if t.requires_grad]


def _leaf(t: Any) -> Any:
    return t.detach().requires_grad_(True) if isinstance(t, torch.Tensor) and t.requires_grad else t


def _as_leaves(weights: Any) -> Any:
    """``weights`` with every tensor that requires grad replaced by a detached leaf that requires grad, in the
    structure and order :func:`_tensors` walks."""
    if weights is None or isinstance(weights, torch.Tensor):
        return _leaf(weights)
    if _walked(weights):
        entries = [_as_leaves(entry) for entry in weights]
        if type(weights) is list:
            return entries
        return tuple(entries) if type(weights) is tuple else type(weights)(*entries)  # a named tuple
    leaves, spec = tree_flatten(weights)
    return tree_unflatten([_leaf(leaf) for leaf in leaves], spec)


def _layer_backward(
    layer: Any,
    handed: list[torch.Tensor],
    grad_logdet: torch.Tensor,
    context: torch.Tensor | None,
    weights: BackwardWeights | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, grad_x)`` for one unit of a chain (a layer, or an ActNorm + InvConv1x1 pair) from ``handed = [y,
    grad_y]`` (emptied): its ``backward_from_handed`` or fused ``backward_from_output`` where it has one, else
    :func:`recompute_backward`; with ``weights``, its share of the chain's (the gradients of ``weights.forward``
    accumulate on those leaves)."""
    taking = getattr(layer, "backward_from_handed", None)
    if taking is not None and weights is None:
        return taking(handed, grad_logdet, context)
    y, grad_y = handed
    handed.clear()
    fused = getattr(layer, "backward_from_output", None)
    if fused is not None:
        if weights is None:
            return fused(y, grad_y, grad_logdet, context)
        return fused(y, grad_y, grad_logdet, context, weights=weights)
    with running_statistics_kept(layer):  # the recompute's inverse and forward update no running statistics
        if weights is None:
            params = trainable_parameters(layer)
            return recompute_backward(layer, layer.inverse, params, y, grad_y, grad_logdet, context)
        forward, inverse = partial(layer, weights=weights.forward), partial(layer.inverse, weights=weights.inverse)
        params = [*trainable_parameters(layer), *_weight_tensors(weights.forward)]
        return recompute_backward(forward, inverse, params, y, grad_y, grad_logdet, context)


def chain_backward_from_output(
    layers: nn.ModuleList,
    y: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
    context: torch.Tensor | None = None,
    weights: BackwardWeights | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, grad_x)`` of a chain of layers from its output, one unit (:func:`chain_units`) at a time from the
    last; parameter gradients, and the gradient of ``context`` (a leaf that requires grad), accumulate into
    ``.grad``.

    ``weights`` None: the chain batches its units' weights (:func:`shared_weights`) itself, the inverse ones
    without a graph and the forward ones with one, hands the units detached leaves of the latter, and after the
    walk backpropagates the leaves' gradients through that graph to the parameters (one backward for the chain).
    Else ``weights`` is the chain's share of its parent's, whose gradients the parent takes on."""
    return _walk(layers, [y, grad_y], grad_logdet, context, weights)


def _walk(
    layers: nn.ModuleList,
    handed: list[torch.Tensor],
    grad_logdet: torch.Tensor,
    context: torch.Tensor | None,
    weights: BackwardWeights | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chain_backward_from_output` of ``handed = [y, grad_y]``, which it empties: no frame of the walk
    keeps ``y`` past the unit it is the output of."""
    units = chain_units(layers)
    if weights is not None:
        return _units_backward(units, handed, grad_logdet, context, weights)
    with torch.no_grad():
        inverse = shared_weights(units, handed[0], inverse=True)
    with torch.enable_grad():
        forward = shared_weights(units, handed[0], inverse=False)
    leaves = _as_leaves(forward)
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    x, grad_x = _units_backward(units, handed, grad_logdet, context, BackwardWeights(inverse, leaves, pending))
    weight_leaves = zip(_weight_tensors(forward), _weight_tensors(leaves))  # leaves: forward's structure
    used = [(w, leaf.grad) for w, leaf in weight_leaves if leaf.grad is not None] + pending
    if used:
        nested_backward([w for w, _ in used], [grad for _, grad in used])
    return x, grad_x


def _units_backward(
    units: list[Any],
    handed: list[torch.Tensor],
    grad_logdet: torch.Tensor,
    context: torch.Tensor | None,
    weights: BackwardWeights,
) -> tuple[torch.Tensor, torch.Tensor]:
    for i in reversed(range(len(units))):
        inverse, forward = weights.inverse[i], weights.forward[i]
        unit_weights = (
            None if inverse is None or forward is None else BackwardWeights(inverse, forward, weights.pending)
        )
        handed[:] = _layer_backward(units[i], handed, grad_logdet, context, unit_weights)
    x, grad_x = handed
    handed.clear()
    return x, grad_x


def _graph_retained() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``); True where torch cannot say."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


class _HandedOutput:
    """A reversible chain's output, handed from its forward to its backward outside ``save_for_backward``, so that
    the walk can drop it once past the last unit (a model's final latent is then freed while the walk runs): a
    detached alias (no reference back to the graph) and the version it had, checked as autograd checks saved
    tensors. Kept for a later backward where the graph is retained (``retain_graph=True``)."""

    def __init__(self, y: torch.Tensor) -> None:
        self._y: torch.Tensor | None = y.detach()
        self._version = y._version

    def take(self) -> torch.Tensor:
        y = self._y
        if y is None:
            raise RuntimeError(
                "backward through a reversible chain a second time: the first backward freed its output; pass "
                "retain_graph=True to the first one"
            )
        if y._version != self._version:
            raise RuntimeError(
                "the output of a reversible chain was modified by an in-place operation before its backward: the "
                "walk would rebuild the inputs from the modified values"
            )
        if not _graph_retained():
            self._y = None
        return y


class _ReversibleChain(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        context: torch.Tensor | None,
        layers: nn.ModuleList,
        max_drift: float | None,
        record: DriftRecord,
        anchor: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.layers = layers
        ctx.anchor = anchor  # its grad_fn runs in a backward that takes the parameters' gradients (read there: below)
        ctx.tol = default_max_drift(x) if max_drift is None else max_drift
        # decided here, where the caller's context is: the backward may run on another thread (autograd's)
        deferred = ctx.tol != math.inf and guards_deferred(x)
        ctx.record = record if deferred else None
        ctx.immediate = ctx.tol != math.inf and not deferred
        ctx.device_type = x.device.type
        ctx.autocast, ctx.autocast_dtype = _autocast_state(x.device.type)
        units = chain_units(layers)
        with torch.no_grad():
            y, total = run_units(units, x, context, shared_weights(units, x, inverse=False))
        ctx.save_for_backward(x, context)
        ctx.output = _HandedOutput(y)
        return y, total

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, grad_logdet: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        if torch.is_grad_enabled():  # only under create_graph=True
            raise RuntimeError(
                "a reversible chain has no double backward (create_graph=True): its walk records no graph, so the "
                "gradients it returns could not be differentiated again; set reversible=False for this"
            )
        if legacy_batched(grad_y) or legacy_batched(grad_logdet):
            raise RuntimeError(
                "a reversible chain has no batched backward (autograd.grad(..., is_grads_batched=True), "
                "jacobian(..., vectorize=True)): its walk calls autograd per layer; set reversible=False for this"
            )
        x_in, context = ctx.saved_tensors
        y = ctx.output.take()
        if context is not None:  # a leaf that collects the context's gradient over the walk
            context = context.detach().requires_grad_(ctx.needs_input_grad[1])
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0], dtype=torch.float32)
        # the walk's gradients accumulate into .grad through autograd, so its hooks (DDP's reducer, post-accumulate
        # hooks) see the sum with what .grad held (gradient accumulation, no_sync); an immediate check that fails
        # puts back the .grad it found (a copy, where there was one); a backward that does not take the parameters'
        # gradients (torch.autograd.grad, backward(inputs=...)) gets none: .grad is set aside for the walk
        taken = _takes_parameter_gradients(ctx.anchor.grad_fn)
        params = trainable_parameters(ctx.layers) if ctx.immediate or not taken else []
        grads_before = [p.grad for p in params]
        if taken:  # the values to put back, in the same tensors (a .grad may be a view of a flat buffer)
            saved = [None if g is None else g.clone() for g in grads_before]
        else:
            for p in params:
                p.grad = None
        try:
            # the weight cache off: with it, autocast's low-precision copy of every weight of the chain would
            # stay alive until the whole chain's backward ends, memory that grows with depth
            autocast = torch.autocast(
                ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast, cache_enabled=False
            )
            output_size = _largest_magnitude(y) if ctx.record is not None or ctx.immediate else None
            handed = [y, grad_y]
            del y  # the walk drops the chain's output after its last unit
            with autocast:
                y, grad_y = _walk(ctx.layers, handed, grad_logdet, context, None)
            if output_size is not None:
                drift = _relative_drift(y, x_in, output_size)
                if ctx.record is not None:
                    ctx.record.note(drift, ctx.tol)
                else:
                    _raise_if_beyond(float(drift), ctx.tol)
        except BaseException:
            for i, (p, before) in enumerate(zip(params, grads_before)):  # no gradient from wrong points stays
                if taken and before is not None:
                    before.copy_(saved[i])
                p.grad = before
            raise
        if not taken:
            for p, before in zip(params, grads_before):
                p.grad = before
        grad_context = None if context is None else context.grad
        return grad_y, grad_context, None, None, None, None


def _takes_parameter_gradients(node: Any) -> bool:
    """Whether the running backward takes the chain's parameter gradients into ``.grad``: whether it will run
    ``node``, the chain's anchor's view (:func:`reversible_chain`), which ``loss.backward()`` does and
    ``torch.autograd.grad`` (which writes no ``.grad``) and ``loss.backward(inputs=[...])`` do not (the engine
    cannot be asked which parameters ``inputs`` names: they are no inputs of the chain's node). True where torch
    cannot say."""
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    return node is None or will_execute is None or bool(will_execute(node))


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for ``device_type`` and its dtype, to replay the forward's mode in backward."""
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, (torch.get_autocast_dtype(device_type) if enabled else None)


def default_max_drift(x: torch.Tensor) -> float:
    """The drift tolerated for a chain whose input is ``x``: :data:`DEFAULT_MAX_DRIFT` by dtype, or
    :data:`TF32_MAX_DRIFT` for float32 on CUDA with cuDNN's TF32 on."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return TF32_MAX_DRIFT
    return DEFAULT_MAX_DRIFT.get(x.dtype, 1e-3)


def check_max_drift(max_drift: float | None) -> float | None:
    """Validate a ``max_drift`` argument: ``None`` (the default by dtype), a number > 0, or ``math.inf`` to
    turn the guard off. ``0`` is refused rather than read as "off": no rebuilt input is exact."""
    if max_drift is None:
        return None
    if isinstance(max_drift, bool) or not isinstance(max_drift, (int, float)):
        raise TypeError(f"max_drift must be a number or None, got {max_drift!r}")
    if math.isnan(max_drift) or max_drift <= 0:
        raise ValueError(f"max_drift must be > 0 (math.inf turns the drift guard off), got {max_drift}")
    return float(max_drift)


def _largest_magnitude(t: torch.Tensor) -> torch.Tensor:
    """``max|t|`` as a 0-dim float32 tensor on the device (0 for an empty ``t``), without an ``|t|`` copy."""
    if t.numel() == 0:
        return t.new_zeros((), dtype=torch.float32)
    return torch.linalg.vector_norm(t.detach(), ord=math.inf).float()


OUTPUT_SCALE_FLOOR = 0.1
"""The drift's scale is at least this fraction of the chain output's size, ``max|y|``: the rebuild's rounding
follows the activations along the chain, so an input near zero is not measured against its own size alone (an
all-zero input whose activations are O(1) tripped the guard), while a chain that enlarges its input (Glow's
first level: 7x) keeps the input's own scale (against ``max|y|`` the guard was that much looser)."""


def _relative_drift(rebuilt: torch.Tensor, original: torch.Tensor, output_size: torch.Tensor) -> torch.Tensor:
    """``max|rebuilt - original| / max(max|original|, OUTPUT_SCALE_FLOOR * output_size)`` (0 for an empty batch)
    as a 0-dim float32 tensor on the device (no host read), where ``output_size`` is ``max|y|`` of the chain's
    output (:data:`OUTPUT_SCALE_FLOOR`). The difference is taken in the inputs' dtype and then cast: cast first,
    float64 inputs could not show a drift below float32's rounding (6e-8), above float64's default
    ``max_drift``."""
    original = original.detach()
    scale = torch.maximum(_largest_magnitude(original), OUTPUT_SCALE_FLOOR * output_size).clamp_min(1e-12)
    return _largest_magnitude(rebuilt - original.to(rebuilt.dtype)) / scale


def _raise_if_beyond(drift: float, tol: float) -> None:
    if not drift <= tol:
        raise ReconstructionError(
            f"reversible backward rebuilt the chain input with relative drift {drift:.3g} > max_drift {tol:.3g}; "
            f"the gradients would be computed at wrong points. {_CAUSES}"
        )


def reversible_chain(
    layers: nn.ModuleList,
    x: torch.Tensor,
    record: DriftRecord,
    max_drift: float | None = None,
    context: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layers`` on ``x`` (each at ``context``, if given) with memory-saving reversible backprop; returns
    ``(y, summed logdet)``, differentiable w.r.t. ``x``, ``context`` and the parameters. The backward
    checks the drift of the rebuilt input against ``max_drift`` (``None``: :func:`default_max_drift`) at once, or
    records it in the chain's ``record`` on the device when :func:`guards_deferred` holds here (see the module
    docstring)."""
    max_drift = check_max_drift(max_drift)
    if functorch_transforms_active():
        raise RuntimeError(
            "reversible backprop does not run under torch.func transforms (grad, vjp, jacrev, vmap): its backward "
            "walks the chain outside autograd; set reversible=False (model.reversible = False) for them"
        )
    # The outputs require grad (so that the backward runs) when a parameter does, through an empty leaf rather than
    # the parameters themselves: with the parameters as inputs, the outer backward would also run each one's
    # AccumulateGrad (with no gradient) after the walk's nested backward had, and DistributedDataParallel marks a
    # parameter ready on each: "Expected to mark a variable ready only once" with two or more chains.
    anchor = x.new_empty(0).requires_grad_(any(p.requires_grad for p in layers.parameters()))
    # through a view: the backward asks whether the running backward will execute the view's node, which tells a
    # backward that takes parameter gradients from one that does not (no such query exists for a leaf)
    return _ReversibleChain.apply(x, context, layers, max_drift, record, anchor.view_as(anchor))
