"""One training step (forward, backward, gradient clipping, optimizer step), run eagerly, compiled by Inductor,
or captured once in a CUDA graph and replayed.

A Glow step is thousands of small launches: on a GPU the host, not the device, sets its pace. ``"compile"``
fuses the elementwise neighbours of the convolutions and of fastflow's kernels (``torch.compile`` of the
objective, whose backward AOTAutograd compiles too); ``"cuda-graph"``
records every launch of the whole step once and replays it with one call, so the host cost per step is a copy
of the batch and one replay. Both need a step without host syncs (fastflow's guards are device-side flags).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Literal

import torch
from torch import nn

from fastflow.models import FlowModel
from fastflow.nn.actnorm import actnorms_initialized
from fastflow.nn.reversible import deferred_guards

__all__ = [
    "STEP_MODES",
    "BitsPerDim",
    "StepMode",
    "TrainStep",
    "check_step_mode",
    "convolutions_channels_last",
    "default_channels_last",
    "make_adam",
    "trainable_parameters",
]

StepMode = Literal["eager", "compile", "cuda-graph"]
STEP_MODES = ("eager", "compile", "cuda-graph")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CAPTURE_WARMUP_STEPS = 3  # eager steps on a side stream before capture: lazy state (Adam moments, cuDNN plans) exists


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each of ``grads``, half-precision ones accumulated in float32 (an fp16 sum of squares
    overflows at 65504 while every element is finite)."""
    half = [g for g in grads if g.dtype in _HALF_DTYPES]
    if not half:
        return list(torch._foreach_norm(grads))
    others = [g for g in grads if g.dtype not in _HALF_DTYPES]  # float64 is not narrowed
    try:
        half_norms = list(torch._foreach_norm(half, 2, dtype=torch.float32))
    except TypeError:  # a torch whose _foreach_norm takes no dtype
        half_norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in half]
    return half_norms + (list(torch._foreach_norm(others)) if others else [])


def _total_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The 2-norm of all of ``grads`` together, on the device (no host read); float32 at least."""
    if not grads:
        return torch.zeros((), device=device)
    norms = _norms(grads)
    dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def _scale_to_norm(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place by ``min(1, max_norm / (norm + 1e-6))``, as ``clip_grad_norm_`` does (a non-finite
    ``norm`` makes them NaN), with the factor from a float32 ``norm`` whatever their dtype."""
    factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for dtype in {g.dtype for g in grads}:
        torch._foreach_mul_([g for g in grads if g.dtype == dtype], factor.to(dtype))


def clip_gradients(grads: list[torch.Tensor], max_norm: float, device: torch.device) -> torch.Tensor:
    """The 2-norm of all of ``grads`` together (a 0-dim device tensor, float32 at least, no host read); with
    ``max_norm > 0`` the gradients are scaled in place to a norm of at most ``max_norm`` (as ``clip_grad_norm_``).
    What :class:`TrainStep` does after the backward."""
    norm = _total_norm(grads, device)
    if max_norm > 0:
        _scale_to_norm(grads, norm, max_norm)
    return norm


class BitsPerDim(nn.Module):
    """The training objective, per-sample bits/dim of ``model``, as a module's forward (what :class:`TrainStep`
    calls, so that DDP's gradient hooks see the whole model)."""

    def __init__(self, model: FlowModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``model.bits_per_dim(x, y)``, shape ``(B,)``."""
        return self.model.bits_per_dim(x, y)


def make_adam(parameters: Iterable[nn.Parameter], lr: float, mode: StepMode = "eager") -> torch.optim.Adam:
    """The fused Adam, whose step count stays on the device (the default implementation reads it on the host every
    step) and which skips its update where ``found_inf`` is set (see :class:`TrainStep`); ``"cuda-graph"`` also
    needs ``capturable=True``."""
    if mode not in STEP_MODES:
        raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
    return torch.optim.Adam(parameters, lr=lr, fused=True, capturable=mode == "cuda-graph")


def _kernels(model: nn.Module) -> list[nn.Parameter]:
    """The convolution kernels of ``model`` wider than 1x1 (4-D parameters with more than one tap): the weights a
    memory format lays out differently (a ``(C_out, C_in, 1, 1)`` weight, or ActNorm's ``(1, C, 1, 1)``, has
    the same memory in every format, only strides that DistributedDataParallel would compare)."""
    return [p for p in model.parameters() if p.dim() == 4 and p.shape[2] * p.shape[3] > 1]


def _is_channels_last(kernel: torch.Tensor) -> bool:
    return kernel.is_contiguous(memory_format=torch.channels_last)


def convolutions_channels_last(model: nn.Module) -> None:
    """Store ``model``'s convolution kernels wider than 1x1 channels-last, in place (the parameters stay the same
    objects, so an optimizer built on them keeps them)."""
    for kernel in _kernels(model):
        kernel.data = kernel.data.contiguous(memory_format=torch.channels_last)


def _lay_out_state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each state tensor of ``optimizer`` shaped like its parameter (Adam's moments) the parameter's strides,
    values kept. A state loaded from a run in another layout (``channels_last`` may change on resume) would
    otherwise pair each weight with another element's moments: the fused CPU Adam ignores strides."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    laid_out = torch.empty_strided(p.shape, p.stride(), dtype=value.dtype, device=value.device)
                    state[key] = laid_out.copy_(value)


def default_channels_last(device: torch.device, model: nn.Module) -> bool:
    """Whether :class:`TrainStep` lays the convolutions out channels-last when not told: on the CPU, where
    ``model`` has convolution kernels wider than 1x1, in every mode. Measured in one process against the
    parameters' own layout (2026-11-26/27): the eager Glow step 5-7% faster at the reference size (L=3, K=8,
    hidden 64, 32x32, batch 8; three A/Bs) and 11-16% at the digits demo's (L=2, K=8, hidden 64, 8x8,
    batch 64), reversible 13% faster at both sizes (at the reference size with the kernels alone converted; with
    every 4-D parameter converted, one earlier A/B read 2% slower); compiled, 1-7% faster in
    three A/Bs, where Inductor otherwise lays the convolutions out channels-last itself and copies their weight
    gradients back every step (50 copies in the reference step). On CUDA the layout is left as it is
    (``channels_last=True`` asks for it, as tensor cores want under bf16)."""
    return device.type == "cpu" and bool(_kernels(model))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``model``'s parameters that require grad, or a ``ValueError`` if it has none (a training step would update
    nothing)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no parameters that require grad: a training step would update nothing")
    return parameters


def check_step_mode(mode: str, device: torch.device, loss_scaling: bool, distributed: bool) -> None:
    """``ValueError`` unless :class:`TrainStep` can run step ``mode`` for a model on ``device``, with fp16
    ``loss_scaling`` or not, wrapped in DistributedDataParallel (``distributed``) or not: ``"cuda-graph"`` needs a
    CUDA device and captures neither a loss scaler's dynamic skips nor DDP's all-reduce. ``fastflow.train`` checks
    its settings with it before it touches the model or the disk."""
    if mode not in STEP_MODES:
        raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
    if mode != "cuda-graph":
        return
    if device.type != "cuda":
        raise ValueError(f"mode='cuda-graph' needs a model on a CUDA device, got {device}")
    if loss_scaling:
        raise ValueError("mode='cuda-graph' runs in float32 or under bf16 autocast, not fp16 loss scaling")
    if distributed:
        raise ValueError("mode='cuda-graph' does not capture DistributedDataParallel's gradient all-reduce")


def _autocast(device: torch.device, amp: str | None, cache_enabled: bool = True) -> AbstractContextManager[None]:
    # A captured graph must not keep autocast's weight-cast cache: the casts are recorded, not cached.
    dtype = AMP_DTYPES[amp] if amp is not None else None
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None, cache_enabled=cache_enabled)


class TrainStep:
    """``step(x, y, lr) -> loss``: ``loss = objective(x, y).mean()`` with fastflow's guards deferred
    (:func:`~fastflow.nn.reversible.deferred_guards`), its backward, clipping of the gradient norm of ``model``'s
    parameters at ``clip`` (0: none) and ``optimizer.step()``, without a host read; returns the loss as a detached
    0-dim float32 device tensor (reading it is the caller's choice, and a host sync).

    ``objective`` computes the per-sample loss of ``model`` (or is a ``DistributedDataParallel`` around such a
    module). :attr:`skip` (0-dim, the fused Adam's ``found_inf``) is set on the device once a loss or the gradient
    norm is not finite or ``model``'s guards tripped, this step or an earlier one: every later update is then
    skipped, so the weights stay those of the first failing step until the caller reads the guards
    (``FlowModel.check_guards``) and stops, or clears them and then :meth:`clear_skip` to train on. With a
    DistributedDataParallel objective the flag is all-reduced (max) every step, so every rank skips alike (one
    rank's NaN reaches every rank's reduced gradients). The optimizer must be fused (:func:`make_adam`). Under
    fp16 loss scaling (``scaler`` enabled) the scaler hands the optimizer its own ``found_inf`` instead, which covers
    non-finite losses and gradients but not drift, and :attr:`skip` is None. ``clip`` must be a finite number >= 0.
    :attr:`grad_norm` is the latest step's gradient norm before clipping (a 0-dim device tensor, float32 at least,
    read at the caller's choice; None before the first step, and under fp16 loss scaling without clipping).

    ``mode``: ``"eager"``; ``"compile"`` (Inductor, CPU or CUDA, static shapes: the loss and its backward
    compile on the first step; the fused Adam update stays one kernel per dtype group); ``"cuda-graph"`` (CUDA
    only: the first :data:`CAPTURE_WARMUP_STEPS` steps run eagerly on a side stream, the next is captured and then
    replayed, as is every later step; shapes are static, so every
    batch must have the first one's shape and dtype; ``optimizer`` from :func:`make_adam` with that mode; no fp16, no
    DDP). ``channels_last`` stores the convolution weights and the input in channels-last order, the layout tensor
    cores want under ``amp="bf16"``; None (the default) does so where :func:`default_channels_last` says (on the
    CPU, for models with convolutions), except around a ``DistributedDataParallel`` objective, whose gradient
    buckets have the strides the parameters had when it was built (:func:`fastflow.train.train` lays the model
    out before wrapping it). An optimizer state loaded in another layout (a checkpoint of a run with another
    ``channels_last``) is laid out like the parameters, values kept. The learning rate lives in a device tensor
    shared by the parameter groups, so a warm-up schedule changes neither compiled code nor the captured graph.
    """

    def __init__(
        self,
        objective: nn.Module,
        model: FlowModel,
        optimizer: torch.optim.Optimizer,
        clip: float = 0.0,
        amp: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        mode: StepMode = "eager",
        channels_last: bool | None = None,
    ) -> None:
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not (math.isfinite(clip) and clip >= 0):
            raise ValueError(f"clip must be a finite number >= 0 (0: no clipping), got {clip!r}")
        self.parameters = trainable_parameters(model)
        self.device = self.parameters[0].device
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        distributed = isinstance(objective, nn.parallel.DistributedDataParallel)
        check_step_mode(mode, self.device, self.scaler is not None, distributed)
        if mode == "cuda-graph" and not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("mode='cuda-graph' needs a capturable optimizer: make_adam(..., mode='cuda-graph')")
        if not all(group.get("fused", False) for group in optimizer.param_groups):
            raise ValueError(  # under fp16 scaling too: a foreach or single-tensor Adam reads the lr tensor back
                "TrainStep needs a fused optimizer, which skips a failed step's update on the device (found_inf): "
                "make_adam(model.parameters(), lr, mode)"
            )
        if amp == "fp16" and self.scaler is None:
            raise ValueError(
                "amp='fp16' needs an enabled loss scaler (scaler=torch.amp.GradScaler(...)): fp16 "
                "gradients underflow without one; or amp='bf16'"
            )
        if amp != "fp16" and self.scaler is not None:  # it would take over the skips: the guards' skip flag is gone
            raise ValueError(
                f"an enabled loss scaler is for amp='fp16' only, got amp={amp!r}: pass scaler=None (bf16 and float32 "
                "gradients do not underflow, and without a scaler a tripped guard skips the updates)"
            )
        rates = {float(group["lr"]) for group in optimizer.param_groups}
        if len(rates) > 1:
            raise ValueError(
                f"the optimizer's parameter groups have different learning rates {sorted(rates)}: TrainStep sets one "
                "learning rate, shared by every group, at each step"
            )
        if channels_last is None:  # a DDP objective keeps its layout (lay the model out before wrapping it)
            channels_last = not distributed and default_channels_last(self.device, model)
        elif channels_last and len(getattr(model, "image_shape", (0, 0, 0))) != 3:
            raise ValueError(
                f"channels_last=True is for image batches (B, C, H, W); the model takes (B, "
                f"{', '.join(map(str, model.image_shape))})"  # type: ignore[union-attr]
            )
        elif channels_last and distributed and any(not _is_channels_last(p) for p in _kernels(model)):
            raise ValueError(
                "channels_last=True with a DistributedDataParallel objective needs the model laid out before DDP "
                "wrapped it (convolutions_channels_last(model), then DDP): DDP's gradient buckets keep the strides "
                "they were built with"
            )
        self.distributed = distributed
        self.objective, self.model, self.optimizer = objective, model, optimizer
        self.clip, self.amp, self.mode, self.channels_last = clip, amp, mode, channels_last
        self.lr = torch.tensor(float(optimizer.param_groups[0]["lr"]), dtype=torch.float32, device=self.device)
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        self.skip: torch.Tensor | None = None
        self.grad_norm: torch.Tensor | None = None
        if self.scaler is None:
            self.skip = torch.zeros((), dtype=torch.float32, device=self.device)  # fused Adam's found_inf dtype
            optimizer.found_inf = self.skip  # type: ignore[attr-defined]  # fused Adam skips its update where set
        if channels_last:
            convolutions_channels_last(objective)
        _lay_out_state_like_parameters(optimizer)  # the layout is fixed now: a resumed Adam state follows it
        self._loss_fn = self._loss
        self._actnorms_ready = False
        if mode == "compile":
            # static shapes: one graph per model; the fused Adam update is one kernel per dtype group already
            # (torch keeps it out of compiled graphs), so only the loss and its backward are compiled
            self._loss_fn = torch.compile(self._loss, dynamic=False)
        self._eager_steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_x: torch.Tensor | None = None  # the captured step's buffers
        self._static_y: torch.Tensor | None = None
        self._static_loss: torch.Tensor | None = None
        self._static_grad_norm: torch.Tensor | None = None

    def clear_skip(self) -> None:
        """Let the updates run again after a failure: :attr:`skip` is zeroed in place (no host read; a captured
        CUDA graph goes on reading the same flag). Read the model's guards first (``check_guards`` clears them),
        else the next step sets the flag again from the same record. Nothing to clear where :attr:`skip` is None
        (fp16 loss scaling: the scaler decides each step afresh)."""
        if self.skip is not None:
            self.skip.zero_()

    def _loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        with _autocast(self.device, self.amp, cache_enabled=self.mode != "cuda-graph"):
            return self.objective(x, y).mean()

    def _record_failure(self, loss: torch.Tensor) -> None:
        """Set :attr:`skip` where this step's loss or gradient norm is not finite or a guard tripped (the drift
        records are complete after backward)."""
        if self.skip is not None:
            assert self.grad_norm is not None  # set by _clip, which runs first
            finite = torch.isfinite(loss) & torch.isfinite(self.grad_norm)
            failed = (~finite | self.model.guards_tripped()).to(self.skip.dtype)
            if self.distributed:  # every rank skips alike: one rank's NaN reached all ranks' reduced gradients
                torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
            torch.maximum(self.skip, failed, out=self.skip)

    def _clip(self) -> None:
        """:attr:`grad_norm` gets the gradients' norm (float32 for half-precision gradients), and the gradients are
        scaled to a norm of at most :attr:`clip` (0: no clipping)."""
        self.grad_norm = clip_gradients([p.grad for p in self.parameters if p.grad is not None], self.clip, self.device)

    def _backward_and_update(self, loss: torch.Tensor) -> None:
        if self.scaler is None:
            loss.backward()
            self._clip()  # a non-finite norm makes the clipped gradients NaN: the update is skipped below
            self._record_failure(loss)
            self.optimizer.step()
            return
        self.scaler.scale(loss).backward()  # fp16: unscale before clipping; the scaler skips non-finite steps
        self.scaler.unscale_(self.optimizer)
        if self.clip > 0:  # the scaler decides the skips: no norm needed otherwise
            self._clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "compile" and not self._actnorms_ready:
            # ActNorm's data-dependent init reads the batch on the host: inside the compiled step it broke the
            # graph dozens of times and hit Dynamo's recompile limit (later steps slower than eager). Run it here,
            # eagerly, on this batch, as fastflow.train does before building the step; checked until none is due.
            if not actnorms_initialized(self.model):
                with torch.no_grad():
                    self._loss(x, y)
            self._actnorms_ready = True
        self.optimizer.zero_grad(set_to_none=True)
        with deferred_guards():  # entered outside the compiled function: a context variable would break its graph
            loss = self._loss_fn(x, y)
            self._backward_and_update(loss)
        return loss.detach().float()

    def _capture(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.cuda.CUDAGraph:
        """Record one whole step into a CUDA graph that reads its batch from static buffers."""
        self._static_x, self._static_y = x.clone(), None if y is None else y.clone()
        self.optimizer.zero_grad(set_to_none=True)  # the gradients are then allocated in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), deferred_guards():
            loss = self._loss(self._static_x, self._static_y)
            self._backward_and_update(loss)
            self._static_loss = loss.detach().float()
            self._static_grad_norm = self.grad_norm
        return graph

    def _replay(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self._graph is None:
            self._graph = self._capture(x, y)
        static_x, static_y, static_loss = self._static_x, self._static_y, self._static_loss
        assert static_x is not None and static_loss is not None  # set by _capture
        if x.shape != static_x.shape or x.dtype != static_x.dtype:
            raise ValueError(
                f"a CUDA-graph step needs every batch shaped like the first, {tuple(static_x.shape)} {static_x.dtype}; "
                f"got {tuple(x.shape)} {x.dtype} (use a batch size that divides the data, or mode='eager')"
            )
        if (y is None) != (static_y is None):
            raise ValueError("a CUDA-graph step needs labels on every step or on none")
        if y is not None and static_y is not None and (y.shape != static_y.shape or y.dtype != static_y.dtype):
            raise ValueError(
                f"a CUDA-graph step needs labels shaped like the first, {tuple(static_y.shape)} {static_y.dtype}; "
                f"got {tuple(y.shape)} {y.dtype}"
            )
        static_x.copy_(x)
        if static_y is not None and y is not None:
            static_y.copy_(y)
        self._graph.replay()
        assert self._static_grad_norm is not None  # set by _capture
        self.grad_norm = self._static_grad_norm.clone()  # this step's, as in the other modes
        return static_loss.clone()

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, lr: float) -> torch.Tensor:
        """Run one step on the batch ``x`` (labels ``y`` or None) at learning rate ``lr`` (a finite number >= 0,
        checked on the host: a NaN rate would write NaN into every weight, past the skip guard); the loss,
        detached."""
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
            raise TypeError(f"lr must be a real number, got {type(lr).__name__} {lr!r}")
        if not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be finite and >= 0, got {lr}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.lr.fill_(lr)
        if self.mode != "cuda-graph":
            return self._eager_step(x, y)
        if self._graph is None and self._eager_steps < CAPTURE_WARMUP_STEPS:
            self._eager_steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._eager_step(x, y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        return self._replay(x, y)
