"""Training loop for flow models: Adam with linear warm-up, gradient clipping, mixed precision, data-parallel
ranks, periodic held-out bits/dim, sample grids and resumable checkpoints.

A training step makes no host sync: its loss stays on the device and fastflow's guards (``check_finite``, the
reversible drift check) only record there (:func:`~fastflow.nn.reversible.deferred_guards`). The loop reads them
in one go every :data:`READ_EVERY` steps (with progress shown, also every 5% of the run, so each line of a
progress log shows a fresh loss), on the steps that evaluate or save, after the last step and when
Ctrl-C asks to stop: one transfer for the losses, two small ones for the guards. Progress shows the mean of the
last 50 losses read (a checkpoint keeps them, so a resumed run shows the uninterrupted run's).

Failures name the step: a non-finite loss raises :class:`TrainingDiverged` naming the first step whose loss was
not finite (and, with ``check_finite``, the first layer with a non-finite output on that step's batch), as does a
non-finite gradient norm at a finite loss; a
reversible backward that drifted beyond ``max_drift`` raises :class:`~fastflow.nn.reversible.ReconstructionError`
naming the steps since the previous read. From such a step on, the device skips every optimizer update until the
read stops the run, so the weights (and a diagnosis run on them) are those of the first failing step; under
``amp="fp16"`` the loss scaler decides the skips instead, which covers non-finite losses (their gradients are not
finite) but not drift. The first Ctrl-C (SIGINT) lets the current step finish (with several ranks: the steps up
to the next read, where the ranks agree to stop), saves a checkpoint at it and raises
:class:`TrainingInterrupted` (a second Ctrl-C stops at once, without saving)."""

from __future__ import annotations

import math
import numbers
import os
import signal
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastflow.checkpoint import check_extra, load_checkpoint, save_checkpoint
from fastflow.data import ImageSource, TensorImages, batch_at_step
from fastflow.distributed import rank_and_world_size, shard
from fastflow.images import check_writable_folder, save_grid
from fastflow.models import FlowModel, dequantize
from fastflow.models.base import check_levels, eval_mode
from fastflow.models.priors import check_labels_as
from fastflow.nn.actnorm import actnorms_initialized
from fastflow.nn.reversible import ReconstructionError
from fastflow.ops._checks import check_bool, int_at_least
from fastflow.progress import Progress
from fastflow.step import (
    STEP_MODES,
    BitsPerDim,
    TrainStep,
    check_step_mode,
    convolutions_channels_last,
    default_channels_last,
    make_adam,
    trainable_parameters,
)

__all__ = [
    "CHECKPOINT_NAME",
    "READ_EVERY",
    "RUN_KEYS",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "evaluate_bits_per_dim",
    "initialize_actnorm",
    "save_image_grid",
    "train",
]

CHECKPOINT_NAME = "checkpoint.pt"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
RUN_KEYS = ("batch", "seed", "lr", "warmup", "clip", "amp")  # settings a resumed run must share with its checkpoint
READ_EVERY = 25  # the loop reads losses and guards from the device at most this many steps apart
PROGRESS_LINES = 20  # a progress log prints a line every 5% of the run: a read for each keeps its loss fresh
RECENT_LOSSES = 50  # progress shows the mean of this many last losses; checkpoints keep them for a resumed run
CHECKPOINT_ENTRIES = ("step", "scaler", "train_config", "heldout_bits_per_dim", "recent_losses")
"""The entries of a checkpoint's ``extra`` that :func:`train` writes (``checkpoint_extra`` may not use them)."""


class TrainingDiverged(FloatingPointError):
    """The loss of global step ``step`` (1-based) was not finite; ``reason`` says where it was found."""

    def __init__(self, step: int, reason: str) -> None:
        super().__init__(f"training diverged at step {step} ({reason})")
        self.step = step
        self.reason = reason


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after global step ``step``; ``checkpoint`` is the checkpoint saved at that step
    (``None`` without ``config.out``)."""

    def __init__(self, step: int, checkpoint: str | None) -> None:
        super().__init__(f"interrupted at step {step}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """Optimisation settings: ``steps`` of a global ``batch`` of images (split evenly over the ranks), Adam at
    ``lr`` after ``warmup`` linear steps, gradient-norm clipping at ``clip`` (0 disables it), autocast to
    ``amp`` (``"bf16"``, ``"fp16"`` with loss scaling, or ``None``), progress on stderr when ``progress``
    (:class:`~fastflow.progress.Progress`), and neither progress nor held-out lines on stdout when ``quiet``
    (both bools).
    ``step_mode`` runs each step ``"eager"``, compiled (``"compile"``) or replayed from a CUDA graph
    (``"cuda-graph"``), and ``channels_last`` lays the convolutions out channels-last (None: where
    :func:`fastflow.step.default_channels_last` says; :class:`fastflow.step.TrainStep`; it may change on resume).

    ``out`` is a folder path (a str or ``os.PathLike``, stored as a str) or None. With ``out`` set, rank 0 checks
    that it can write there before the first step and writes ``out/checkpoint.pt`` and a grid of ``samples``
    samples at ``temperature`` every ``save_every`` steps (0: only at the end) and at the end; with held-out data
    it reports held-out bits/dim every ``eval_every`` steps (0: only at the end) and at the end.
    """

    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    clip: float = 50.0
    seed: int = 0
    progress: bool = True
    amp: str | None = None
    out: str | os.PathLike[str] | None = None
    save_every: int = 0
    eval_every: int = 0
    samples: int = 64
    temperature: float = 0.7
    quiet: bool = False
    step_mode: str = "eager"
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {self.amp!r}")
        if self.step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be one of {STEP_MODES}, got {self.step_mode!r}")
        for name, low in (("steps", 1), ("batch", 1), ("samples", 1)):
            int_at_least(name, getattr(self, name), low)
        for name in ("save_every", "eval_every", "warmup", "seed"):
            int_at_least(name, getattr(self, name), 0)
        if self.seed >= 2**64:  # a torch.Generator seed's range: the first sample grid would fail, after training
            raise ValueError(f"seed must be < 2**64, got {self.seed}")
        for name in ("lr", "clip", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # True was taken as 1.0
                raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
            setattr(self, name, float(value))  # a numpy number (np.float64 is a float), which no checkpoint holds
        if self.lr == 0:
            raise ValueError("lr must be > 0, got 0")
        for name in ("progress", "quiet"):
            check_bool(name, getattr(self, name))
        if self.channels_last is not None and not isinstance(self.channels_last, bool):  # "no" would be true
            raise TypeError(
                f"channels_last must be a bool or None, got {type(self.channels_last).__name__} {self.channels_last!r}"
            )
        if self.out is not None:
            if not isinstance(self.out, (str, os.PathLike)) or not isinstance(os.fspath(self.out), str):
                raise TypeError(
                    f"out must be a folder path (str or os.PathLike) or None, got {type(self.out).__name__} "
                    f"{self.out!r}"
                )
            self.out = os.fspath(self.out)  # a plain str: checkpoints store the config

    def lr_at(self, step: int) -> float:
        """Learning rate of ``step`` (0-based): linear warm-up over ``warmup`` steps, then constant."""
        return self.lr * min(1.0, (step + 1) / max(self.warmup, 1))


@torch.no_grad()
def evaluate_bits_per_dim(
    model: FlowModel,
    levels: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch: int = 256,
    seed: int = 1,
) -> float:
    """Mean bits/dim of integer ``levels`` (``(N, C, H, W)``, ``N >= 1``) under ``model`` with one fixed-seed
    uniform dequantization, ``batch`` images at a time."""
    check_levels("levels", levels, model.image_shape, model.n_bins)
    if labels is not None and (labels.dim() == 0 or len(labels) != len(levels)):
        raise ValueError(f"labels must have one row per image ({len(levels)}), got shape {tuple(labels.shape)}")
    if model.prior.conditional:  # class labels (else labels is a context for the layers, checked by them)
        check_labels_as(model.prior, labels, "labels")
    int_at_least("batch", batch, 1)
    parameter = model.floating_parameter()
    total = 0.0
    generator = torch.Generator(levels.device).manual_seed(seed)  # the global RNGs untouched
    with eval_mode(model):
        for start in range(0, len(levels), batch):
            x = dequantize(levels[start : start + batch], model.n_bins, generator, check_range=False)  # checked above
            x = x.to(parameter.device, parameter.dtype)
            y = None if labels is None else labels[start : start + batch].to(parameter.device)
            total += float(model.bits_per_dim(x, y).sum())
    return total / len(levels)


def _to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` on ``device`` (in ``dtype``): from the CPU to a GPU through page-locked memory, asynchronously (a copy
    from pageable memory makes the host wait until the GPU has run the work queued before it, the previous step)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)


def _autocast(device: torch.device, amp: str | None) -> AbstractContextManager[None]:
    dtype = AMP_DTYPES[amp] if amp is not None else None
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)


@torch.no_grad()
def initialize_actnorm(
    model: FlowModel, x: torch.Tensor, y: torch.Tensor | None = None, amp: str | None = None
) -> None:
    """Run ActNorm's data-dependent initialisation on ``x`` now (one forward in training mode, without a
    graph) unless every ActNorm is already initialised (a loaded checkpoint); any model, images or vectors
    (``y``: its context). Under ``torch.distributed`` every rank must call it at the same step with its shard: the
    statistics are all-reduced, so they are those of the union of the shards, and the parameters agree on every
    rank where the ranks' weights did (:func:`train` calls it once DDP has handed out rank 0's)."""
    if actnorms_initialized(model):
        return
    model.train()
    with torch.no_grad(), _autocast(x.device, amp):
        model.log_prob(x, y)


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None, *, n_bins: int | None = None
) -> None:
    """:func:`fastflow.images.save_grid` with images smaller than 64 pixels enlarged to about 64; ``n_bins``: the
    model's levels per pixel, each drawn as its level (see :func:`~fastflow.images.save_grid`)."""
    save_grid(images, path, nrow=nrow, scale=max(1, 64 // images.shape[-2]), n_bins=n_bins)


def _due(done: int, every: int, last: bool) -> bool:
    """Whether a periodic action (every ``every`` steps, 0: never, and always after the last step) is due."""
    return last or (every > 0 and done % every == 0)


@contextmanager
def _deferred_interrupt(saves: bool) -> Iterator[Callable[[], bool]]:
    """Within the block the first Ctrl-C (SIGINT) only sets a flag, read by the function it yields, so the loop
    can finish its step and save (``saves``: whether it writes a checkpoint then, as the message says); a second
    Ctrl-C raises ``KeyboardInterrupt`` at once. Outside the main thread (where Python runs no signal handlers)
    nothing is deferred."""
    requested: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum: int, frame: object) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(True)
        then = " to save a checkpoint" if saves else ""
        print(f"\nstopping after this step{then} (Ctrl-C again stops at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@contextmanager
def _closing(progress: Progress | None) -> Iterator[None]:
    """Close ``progress`` however the block ends, so an error message starts on a line of its own."""
    try:
        yield
    finally:
        if progress is not None:
            progress.close()


def _check_same_run(path: str, config: TrainConfig, stored: dict[str, Any] | None) -> None:
    """``ValueError`` naming the settings of :data:`RUN_KEYS` in which ``config`` differs from the run saved."""
    if not stored:
        return
    ours = asdict(config)
    differ = [f"{k}={ours[k]!r} (checkpoint: {stored[k]!r})" for k in RUN_KEYS if k in stored and stored[k] != ours[k]]
    if differ:
        raise ValueError(
            f"cannot resume from {path!r} with other run settings: {', '.join(differ)}; {', '.join(RUN_KEYS)} must "
            "match the checkpoint's"
        )


def _restore(
    path: str, model: FlowModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: TrainConfig
) -> tuple[int, float | None, list[float]]:
    """Load ``path`` (written by :func:`train`) into the model, optimizer and loss scaler after checking that
    ``config`` continues the same run (:data:`RUN_KEYS`); returns ``(steps done, last held-out bits/dim, the last
    losses read)``; a checkpoint from before the losses were kept gives none. A resume refused after the weights
    loaded (other run settings, an optimizer or scaler state that does not fit) gives the model its own weights
    back (a CPU copy is kept meanwhile)."""
    if not os.path.exists(path):
        raise ValueError(f"cannot resume: no checkpoint {path!r}")
    own = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    try:
        return _load_training_state(path, model, optimizer, scaler, config)
    except BaseException:
        model.load_state_dict(own)
        raise


def _load_training_state(
    path: str, model: FlowModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, config: TrainConfig
) -> tuple[int, float | None, list[float]]:
    """:func:`_restore`'s loads and checks, which may fail after the weights are in the model."""
    _, payload = load_checkpoint(path, model, map_location=next(model.parameters()).device)
    extra = payload["extra"]
    if payload["optimizer"] is None or "step" not in extra:
        raise ValueError(f"cannot resume from {path!r}: it holds no training state (optimizer, step)")
    _check_same_run(path, config, extra.get("train_config"))
    state = payload["optimizer"]
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or "state" not in state or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"cannot resume from {path!r}: its optimizer state is not an optimizer's state_dict")
    if (
        not isinstance(extra.get("scaler"), dict)
        or isinstance(extra["step"], bool)
        or not isinstance(extra["step"], int)
    ):
        raise ValueError(f"cannot resume from {path!r}: its training state needs a loss-scaler dict and an int step")
    recent = extra.get("recent_losses", [])
    if not isinstance(recent, list) or not all(type(v) in (int, float) for v in recent):
        raise ValueError(f"cannot resume from {path!r}: its recent_losses must be a list of numbers")
    settings = {k: optimizer.param_groups[0][k] for k in ("fused", "foreach", "capturable")}
    for group in state["param_groups"]:  # the checkpoint's Adam settings (older ones: not fused) would be restored
        group.update(settings)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError) as err:  # e.g. from before the LU factors were packed: fewer parameters
        raise ValueError(
            f"cannot resume from {path!r}: its optimizer state does not fit this model's parameters ({err}); its "
            "weights still load with fastflow.checkpoint.load_checkpoint"
        ) from err
    try:
        scaler.load_state_dict(extra["scaler"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"cannot resume from {path!r}: its loss-scaler state does not load ({err!r})") from err
    return int(extra["step"]), extra.get("heldout_bits_per_dim"), recent[-RECENT_LOSSES:]


_SAME_ON_EVERY_RANK = (
    "steps", "batch", "lr", "warmup", "clip", "seed", "amp", "out", "save_every", "eval_every", "step_mode",
    "channels_last",
)  # fmt: skip
"""The :class:`TrainConfig` fields every rank must share (``out``: whether it is set): ranks that differ call
collectives at different steps (a hang until the process group's timeout) or train apart."""


def _setting_code(value: object) -> float:
    """One float standing for a setting, equal across ranks where the setting is: strings by their CRC-32,
    ``None`` as -1, integers modulo ``2^53`` (float64's exact range)."""
    if value is None:
        return -1.0
    if isinstance(value, str):
        return float(zlib.crc32(value.encode()))
    if isinstance(value, int):  # bools too
        return float(value % 2**53)
    return float(value)  # type: ignore[arg-type]


def _agree_across_ranks(config: TrainConfig, resume: bool, device: torch.device) -> bool:
    """``ValueError`` on every rank naming the settings of :data:`_SAME_ON_EVERY_RANK` (and ``resume``) that differ
    across the ranks; else whether some rank shows progress (``progress`` and not ``quiet``, which may differ:
    ``progress=rank == 0`` is natural, and only rank 0 prints). Two all-reduces and a host read, once a run."""
    names = [*_SAME_ON_EVERY_RANK, "resume"]
    values = [
        float(config.out is not None) if name == "out" else _setting_code(getattr(config, name))
        for name in _SAME_ON_EVERY_RANK
    ]
    values.append(float(resume))
    values.append(float(config.progress and not config.quiet))
    low = torch.tensor(values, dtype=torch.float64, device=device)
    high = low.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    low_values, high_values = low.tolist(), high.tolist()
    differ = [name for name, a, b in zip(names, low_values, high_values) if a != b]
    if differ:
        raise ValueError(
            f"the ranks were given different {', '.join(differ)}: give every rank the same TrainConfig and resume "
            "(out too: rank 0 alone writes there, every rank checks it and resumes from it)"
        )
    return bool(high_values[-1])


def _check_out(out: str | os.PathLike[str], rank: int, world_size: int, device: torch.device) -> None:
    """Rank 0 checks that ``out`` can be made and written before the first step (a scratch file in it; the folders
    made for the check are removed again), so an unwritable output folder fails before the training, not after it:
    ``ValueError`` naming it, on every rank (a rank left waiting for rank 0 would hang). The first save makes the
    folder, so a run that fails before that leaves nothing behind."""
    error: ValueError | None = None
    if rank == 0:
        try:
            check_writable_folder(os.fspath(out), "config.out", create=False)
        except ValueError as err:
            error = err
    if world_size > 1:
        failed = torch.tensor(float(error is not None), device=device)
        torch.distributed.broadcast(failed, src=0)
        if error is None and bool(failed):
            error = ValueError(f"config.out {os.fspath(out)!r} is not a writable folder on rank 0 (its error says why)")
    if error is not None:
        raise error


def _write_outputs(
    out: str | os.PathLike[str],
    model: FlowModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    step: int,
    heldout_bpd: float | None,
    recent_losses: list[float],
    extra: dict[str, Any],
    samples: bool = True,
) -> list[str]:
    """Checkpoint (model, optimizer, loss scaler, step, the last losses read, ``extra``) and, with ``samples``, a
    sample grid drawn with a fixed seed, so grids of successive checkpoints show the same latents; the training RNG
    streams are left untouched. Returns the paths written: the checkpoint, then the grid unless it could not be
    drawn (a ``RuntimeWarning`` of one line says why)."""
    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, CHECKPOINT_NAME)
    save_checkpoint(
        checkpoint,
        model,
        optimizer,
        step=step,
        scaler=scaler.state_dict(),
        train_config=asdict(config),
        heldout_bits_per_dim=heldout_bpd,
        recent_losses=recent_losses,
        **extra,
    )
    if samples:  # after the checkpoint: a grid that cannot be drawn costs the grid, not the run's state
        device = next(model.parameters()).device
        # a class-conditional prior draws the classes in turn
        num_classes = getattr(model.prior, "num_classes", 0) if model.prior.conditional else 0
        classes = torch.arange(config.samples, device=device) % num_classes if num_classes else None
        try:
            generator = torch.Generator().manual_seed(config.seed)  # the same grid every time; global RNGs untouched
            with eval_mode(model):
                grid = model.sample(config.samples, classes, temperature=config.temperature, generator=generator)
            path = os.path.join(out, f"samples-{step:06d}.png")
            save_image_grid(grid, path, n_bins=model.n_bins)
            return [checkpoint, path]
        except (FloatingPointError, ValueError) as err:  # non-finite samples: an unstable inverse, too hot a T
            # a pseudo file name, which has no source line to echo: the warning prints as one line
            warnings.warn_explicit(
                f"no sample grid at step {step}: {err}", RuntimeWarning, f"<{__name__}>", 0, module=__name__
            )
    return [checkpoint]


def _loss_text(recent: list[float]) -> str:
    """The progress text for the losses ``recent`` (empty: none yet)."""
    return f"loss {sum(recent) / len(recent):.3f} bits/dim" if recent else ""


def _train_step(
    step: TrainStep, x: torch.Tensor, y: torch.Tensor | None, lr: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimisation step on the batch ``(x, y)`` at learning rate ``lr`` without a host read
    (:class:`fastflow.step.TrainStep`); returns the loss, a 0-dim float32 device tensor, and the gradient norm
    (None under fp16 loss scaling, where non-finite gradients are the scaler's business)."""
    loss = step(x, y, lr)
    return loss, None if step.skip is None else step.grad_norm


def _read_window(
    model: FlowModel,
    losses: list[torch.Tensor],
    grad_norms: list[torch.Tensor],
    first: int,
    stop: bool,
    world_size: int,
    batch_at: Callable[[int], tuple[torch.Tensor, torch.Tensor | None]],
    amp: str | None,
) -> tuple[list[float], bool]:
    """Read what the steps ``first`` .. ``first + len(losses) - 1`` (0-based) left on the device: their losses and
    gradient norms (``grad_norms``: one per step, or none) in one transfer (averaged over the ranks, in one
    all-reduce with the ranks' Ctrl-C requests ``stop``), then the model's guards. Returns ``(losses, whether any
    rank asked to stop)``.

    :class:`TrainingDiverged` names the first step whose loss, or gradient norm at a finite loss, is not finite
    (the step from which the weights were frozen); for a loss, its reason names the layer when ``check_finite``
    finds it on that step's batch (``batch_at(step)``, the same batch again) under the weights the skipped updates
    kept. ``ReconstructionError`` names the steps of the window when a reversible backward drifted beyond
    ``max_drift`` (the drift guard keeps no step: a later non-finite loss in the window is reported as such, the
    drift chained to it).
    """
    count = len(losses)
    stacked = torch.stack(losses + [norm.to(losses[0]) for norm in grad_norms])
    tripped_elsewhere = False
    if world_size > 1:
        # every rank raises together: a drift recorded on one rank alone is counted in the same all-reduce
        tripped = model.guards_tripped().to(stacked.device, stacked.dtype).reshape(1)
        stats = torch.cat([stacked, torch.tensor([float(stop)], device=stacked.device), tripped])
        torch.distributed.all_reduce(stats)
        *sums, stops, trips = stats.tolist()
        read, stop, tripped_elsewhere = [total / world_size for total in sums], stops > 0, trips > 0
    else:
        read = stacked.tolist()
    values, norms = read[:count], read[count:]
    bad = next((i for i, value in enumerate(values) if not math.isfinite(value)), None)
    bad_norm = next((i for i, norm in enumerate(norms) if not math.isfinite(norm)), None)
    if bad_norm is not None and (bad is None or bad_norm < bad):  # the first failing step froze the weights
        raise TrainingDiverged(
            first + bad_norm + 1,
            f"non-finite gradient norm {norms[bad_norm]} at a finite training loss {values[bad_norm]:.4g}",
        )
    if bad is not None:
        cause: Exception | None = None
        try:
            with _autocast(stacked.device, amp):
                model.check_guards(*batch_at(first + bad))
        except (FloatingPointError, ReconstructionError, ValueError) as err:  # ValueError: the batch is not finite
            cause = err
        reason = f"non-finite training loss {values[bad]}" if cause is None else str(cause)
        raise TrainingDiverged(first + bad + 1, reason) from cause
    try:
        model.check_guards()
    except ReconstructionError as err:
        raise ReconstructionError(f"steps {first + 1}-{first + len(values)}: {err}") from err
    if tripped_elsewhere:
        raise ReconstructionError(
            f"steps {first + 1}-{first + len(values)}: a reversible backward on another rank rebuilt its input with a "
            "drift beyond max_drift (that rank's error names the chain)"
        )
    return values, stop


def train(
    model: FlowModel,
    data: torch.Tensor | ImageSource,
    config: TrainConfig,
    labels: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
    resume: bool = False,
    heldout_labels: torch.Tensor | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    written: list[str] | None = None,
) -> list[float]:
    """Train ``model`` (already on its device) and return the training bits/dim of each step run.

    ``data``: integer pixel levels ``(N, C, H, W)`` in ``[0, n_bins)`` (with optional ``labels``) or an
    :class:`~fastflow.data.ImageSource`. Batch ``s`` is a function of ``(config.seed, s)`` only
    (:func:`~fastflow.data.batch_at_step`), so ``resume=True`` (continue from ``config.out``'s checkpoint:
    weights, optimizer, loss scaler, step) reproduces the loss curve of an uninterrupted run. ``heldout``:
    integer levels for the periodic held-out bits/dim, with ``heldout_labels`` for a class-conditional model.
    Levels (a tensor ``data`` and ``heldout``) are checked before the first step: integer, the model's image
    shape, in ``[0, n_bins)``. The first batch initialises ActNorm. A class-conditional model's sample grids
    draw the classes in turn.
    ``checkpoint_extra``: more entries (plain Python values) for every checkpoint's ``extra``, none of
    :data:`CHECKPOINT_ENTRIES` nor ``path``, ``model``, ``optimizer`` (``ValueError``, before the first step).
    ``written``: a list that is emptied, then set at each save (rank 0 alone writes) to the paths that save wrote
    (the checkpoint, then the sample grid unless it could not be drawn): after the call, the last save's files.
    ``config.out`` is checked to be a writable folder before the first step (``ValueError``).

    Raises :class:`TrainingDiverged` naming the global step when the loss is not finite and
    :class:`~fastflow.nn.reversible.ReconstructionError` when a reversible backward drifted, both at the next read
    of the device, and :class:`TrainingInterrupted` after saving a checkpoint when Ctrl-C stops the run (see the
    module docstring). ``labels`` outside the prior's classes raise ``ValueError`` before the first step.

    Under ``torch.distributed`` (see :mod:`fastflow.distributed`) each rank trains on its shard of every
    batch inside DDP, the reported loss is the mean over ranks, and only rank 0 evaluates, prints and writes.
    Every rank must be given the same ``config`` and ``resume`` (``progress`` and ``quiet`` may differ), and
    ``config.batch`` must split evenly over the ranks: else a ``ValueError`` on every rank before the first step.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if isinstance(data, torch.Tensor):
        check_levels("data", data, model.image_shape, model.n_bins)
    elif not (callable(getattr(data, "draw", None)) and hasattr(data, "image_shape")):
        raise TypeError(
            f"data must be a tensor of integer levels (N, C, H, W) or an ImageSource (draw, image_shape), got "
            f"{type(data).__name__}"
        )
    if labels is not None and not isinstance(data, torch.Tensor):
        raise ValueError("labels go with a levels tensor; an ImageSource draws its own labels")
    taken = sorted(set(checkpoint_extra or {}) & {*CHECKPOINT_ENTRIES, "path", "model", "optimizer"})
    if taken:  # before the first step: a collision would fail the first save, after the training
        raise ValueError(
            f"checkpoint_extra may not use {taken}: train() writes those entries itself (path, model and optimizer "
            "are save_checkpoint's arguments)"
        )
    check_extra(checkpoint_extra or {})  # the values too: a numpy scalar failed the first save
    source = TensorImages(data, labels) if isinstance(data, torch.Tensor) else data
    if tuple(source.image_shape) != tuple(model.image_shape):
        raise ValueError(f"data has images of shape {tuple(source.image_shape)}, the model {model.image_shape}")
    if isinstance(source, TensorImages):  # once, here: the batches are not checked (a host read per step)
        if source is data:  # a TensorImages given as is (a raw tensor was checked above)
            check_levels("data.levels", source.levels, model.image_shape, model.n_bins)
        check_labels_as(model.prior, source.labels, "data.labels" if source is data else "labels")
    if heldout is not None:
        check_levels("heldout", heldout, model.image_shape, model.n_bins)
        if heldout_labels is not None and tuple(heldout_labels.shape) != (len(heldout),):
            raise ValueError(f"heldout_labels must have shape ({len(heldout)},), got {tuple(heldout_labels.shape)}")
        check_labels_as(model.prior, heldout_labels, "heldout_labels")
    elif heldout_labels is not None:
        raise ValueError("heldout_labels go with heldout")
    rank, world_size = rank_and_world_size()
    device = next(model.parameters()).device
    shows_progress = config.progress and not config.quiet
    if world_size > 1:
        shows_progress = _agree_across_ranks(config, resume, device)
        if config.batch % world_size:  # before the first step, on every rank
            raise ValueError(f"config.batch = {config.batch} does not split evenly over the {world_size} ranks")
    # what TrainStep would refuse, refused before the checkpoint, the output folder or ActNorm touch anything
    check_step_mode(config.step_mode, device, config.amp == "fp16", world_size > 1)
    trainable_parameters(model)
    optimizer = make_adam(model.parameters(), config.lr, config.step_mode)  # type: ignore[arg-type]
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    start, heldout_bpd = 0, None
    recent: list[float] = []  # the last losses read, for progress (and checkpoints)
    if written is not None:
        written.clear()
    if resume:
        if config.out is None:
            raise ValueError("resume=True needs config.out, the folder holding the checkpoint")
        path = os.path.join(config.out, CHECKPOINT_NAME)
        start, heldout_bpd, recent = _restore(path, model, optimizer, scaler, config)
    if config.out is not None:  # after _restore, which creates no folder for a checkpoint that is not there
        _check_out(config.out, rank, world_size, device)

    dtype = model.floating_parameter().dtype

    checked = isinstance(source, TensorImages)  # its levels and labels were checked whole, above: not per batch

    def local_batch(step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        # a per-batch range check of levels on a GPU would read the device every step
        x, y = batch_at_step(source, step, config.batch, model.n_bins, config.seed, check_range=not checked)
        if y is not None and not checked:  # labels drawn on the host: no device read
            check_labels_as(model.prior, y, "the labels data.draw() returned")
        x = _to_device(shard(x, rank, world_size), device, dtype)  # the model's dtype: float64 and half models too
        return x, None if y is None else _to_device(shard(y, rank, world_size), device)

    model.train()
    channels_last = config.channels_last
    if channels_last is None:
        channels_last = default_channels_last(device, model)
    if channels_last:  # before DDP wraps the model: its gradient buckets take the parameters' strides
        convolutions_channels_last(model)
    objective: nn.Module = BitsPerDim(model)
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    if start < config.steps:  # after DDP has given every rank rank 0's weights: the statistics are of one model
        initialize_actnorm(model, *local_batch(start), amp=config.amp)
    step_runner = TrainStep(
        objective, model, optimizer, clip=config.clip, amp=config.amp, scaler=scaler,
        mode=config.step_mode, channels_last=channels_last,  # type: ignore[arg-type]
    )  # fmt: skip
    main = rank == 0
    extra = checkpoint_extra or {}
    progress = Progress(config.steps, start) if config.progress and main and not config.quiet else None
    # the same on every rank (some rank shows progress), unlike `progress`: a read every READ_EVERY steps, and on
    # the steps of a progress log's lines (every 5% of the run), which are not multiples of it past 500 steps
    line_every = max(1, math.ceil(config.steps / PROGRESS_LINES)) if shows_progress else 0
    history: list[float] = []
    pending: list[torch.Tensor] = []  # the losses of the steps since the last read, on the device
    pending_norms: list[torch.Tensor] = []  # and their gradient norms (none under fp16 loss scaling)
    loss_text = _loss_text(recent)
    with _deferred_interrupt(config.out is not None) as interrupt_requested, _closing(progress):
        for step in range(start, config.steps):
            try:
                x, y = local_batch(step)
                loss, grad_norm = _train_step(step_runner, x, y, config.lr_at(step))
                pending.append(loss)
                if grad_norm is not None:
                    pending_norms.append(grad_norm)
            except FloatingPointError as err:  # raised at once, not recorded by a deferred guard: this step's
                raise TrainingDiverged(step + 1, str(err)) from err
            done = step + 1
            last = done == config.steps
            saving, evaluating = _due(done, config.save_every, last), _due(done, config.eval_every, last)
            requested, stop = interrupt_requested(), False
            # ranks read at the same steps (a read all-reduces): a Ctrl-C forces a read only without other ranks
            reading = done % READ_EVERY == 0 or (line_every and done % line_every == 0)
            if last or reading or saving or evaluating or (requested and world_size == 1):
                first = done - len(pending)
                losses, stop = _read_window(
                    model, pending, pending_norms, first, requested, world_size, local_batch, config.amp
                )
                history.extend(losses)
                pending.clear()
                pending_norms.clear()
                recent = (recent + losses)[-RECENT_LOSSES:]
                loss_text = _loss_text(recent)
            if main and heldout is not None and evaluating:
                heldout_bpd = evaluate_bits_per_dim(model, heldout, heldout_labels)
                line = f"step {done}: held-out {heldout_bpd:.3f} bits/dim"
                if progress is not None:
                    progress.write(line)
                elif not config.quiet:
                    print(line, flush=True)
            if main and config.out is not None and (saving or stop):
                files = _write_outputs(
                    config.out, model, optimizer, scaler, config, done, heldout_bpd, recent, extra, samples=saving
                )
                if written is not None:
                    written[:] = files
            if progress is not None:
                held = "" if heldout_bpd is None else f"held-out {heldout_bpd:.3f}"
                progress.update(done, ", ".join(part for part in (loss_text, held) if part))
            if stop and not last:
                if world_size > 1:
                    torch.distributed.barrier()
                saved = None if config.out is None else os.path.join(config.out, CHECKPOINT_NAME)
                raise TrainingInterrupted(done, saved)
    if world_size > 1:
        torch.distributed.barrier()  # ranks leave together, after rank 0's last writes
    return history
