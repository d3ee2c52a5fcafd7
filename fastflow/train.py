"""Training loop for flow models: Adam with linear warm-up, gradient clipping, mixed precision, data-parallel
ranks, periodic held-out bits/dim, sample grids and resumable checkpoints."""

from __future__ import annotations

import math
import os
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastflow.checkpoint import load_checkpoint, save_checkpoint
from fastflow.data import ImageSource, TensorImages, batch_at_step
from fastflow.distributed import rank_and_world_size, shard
from fastflow.images import save_grid
from fastflow.models import FlowModel, dequantize
from fastflow.nn import ActNorm
from fastflow.progress import ProgressBar

__all__ = [
    "CHECKPOINT_NAME",
    "TrainConfig",
    "evaluate_bits_per_dim",
    "initialize_actnorm",
    "save_image_grid",
    "train",
]

CHECKPOINT_NAME = "checkpoint.pt"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Optimisation settings: ``steps`` of a global ``batch`` of images (split evenly over the ranks), Adam at
    ``lr`` after ``warmup`` linear steps, gradient-norm clipping at ``clip`` (0 disables it), autocast to
    ``amp`` (``"bf16"``, ``"fp16"`` with loss scaling, or ``None``), progress bar on stderr when ``progress``.

    With ``out`` set, rank 0 writes ``out/checkpoint.pt`` and a grid of ``samples`` samples at
    ``temperature`` every ``save_every`` steps (0: only at the end) and at the end; with held-out data it
    reports held-out bits/dim every ``eval_every`` steps (0: only at the end) and at the end.
    """

    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    clip: float = 50.0
    seed: int = 0
    progress: bool = True
    amp: str | None = None
    out: str | None = None
    save_every: int = 0
    eval_every: int = 0
    samples: int = 64
    temperature: float = 0.7

    def __post_init__(self) -> None:
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {self.amp!r}")
        for name in ("steps", "save_every", "eval_every", "warmup", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch < 1 or self.lr <= 0 or self.samples < 1:
            raise ValueError(f"batch, lr and samples must be positive, got {self.batch}, {self.lr}, {self.samples}")

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
    """Mean bits/dim of integer ``levels`` under ``model`` with one fixed-seed uniform dequantization."""
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(levels), batch):
        x = dequantize(levels[start : start + batch], model.n_bins).to(device)
        y = None if labels is None else labels[start : start + batch].to(device)
        total += float(model.bits_per_dim(x, y).sum())
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return total / len(levels)


def _autocast(device: torch.device, amp: str | None) -> AbstractContextManager[None]:
    dtype = AMP_DTYPES[amp] if amp is not None else None
    return torch.autocast(device.type, dtype=dtype, enabled=amp is not None)


@torch.no_grad()
def initialize_actnorm(
    model: FlowModel, x: torch.Tensor, y: torch.Tensor | None = None, amp: str | None = None
) -> None:
    """Run ActNorm's data-dependent initialisation on ``x`` now (one forward in training mode, without a
    graph) unless every ActNorm is already initialised (a loaded checkpoint). Under ``torch.distributed`` every
    rank must call it at the same step with its shard: the statistics are all-reduced, so they are those of the
    union of the shards, and the parameters agree on every rank before DDP wraps the model."""
    if all(m.is_initialized for m in model.modules() if isinstance(m, ActNorm)):
        return
    model.train()
    with torch.no_grad(), _autocast(x.device, amp):
        model.bits_per_dim(x, y)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None) -> None:
    """:func:`fastflow.images.save_grid` with images smaller than 64 pixels enlarged to about 64."""
    save_grid(images, path, nrow=nrow, scale=max(1, 64 // images.shape[-2]))


class _BitsPerDim(nn.Module):
    """The training objective as a module's forward, so that DDP's gradient hooks see the whole model."""

    def __init__(self, model: FlowModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.model.bits_per_dim(x, y)


def _due(done: int, every: int, last: bool) -> bool:
    """Whether a periodic action (every ``every`` steps, 0: never, and always after the last step) is due."""
    return last or (every > 0 and done % every == 0)


def _restore(
    path: str, model: FlowModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> tuple[int, float | None]:
    """Load ``path`` (written by :func:`train`) into the model, optimizer and loss scaler; returns
    ``(steps done, last held-out bits/dim)``."""
    if not os.path.exists(path):
        raise ValueError(f"cannot resume: no checkpoint {path!r}")
    _, payload = load_checkpoint(path, model, map_location=next(model.parameters()).device)
    extra = payload["extra"]
    if payload["optimizer"] is None or "step" not in extra:
        raise ValueError(f"cannot resume from {path!r}: it holds no training state (optimizer, step)")
    optimizer.load_state_dict(payload["optimizer"])
    scaler.load_state_dict(extra["scaler"])
    return int(extra["step"]), extra.get("heldout_bits_per_dim")


def _write_outputs(
    out: str,
    model: FlowModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    step: int,
    heldout_bpd: float | None,
) -> None:
    """Checkpoint (model, optimizer, loss scaler, step) and a sample grid drawn with a fixed seed, so grids of
    successive checkpoints show the same latents; the training RNG streams are left untouched."""
    device = next(model.parameters()).device
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        samples = model.sample(config.samples, temperature=config.temperature)
    model.train()
    os.makedirs(out, exist_ok=True)
    save_image_grid(samples, os.path.join(out, f"samples-{step:06d}.png"))
    save_checkpoint(
        os.path.join(out, CHECKPOINT_NAME),
        model,
        optimizer,
        step=step,
        scaler=scaler.state_dict(),
        train_config=asdict(config),
        heldout_bits_per_dim=heldout_bpd,
    )


def train(
    model: FlowModel,
    data: torch.Tensor | ImageSource,
    config: TrainConfig,
    labels: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
    resume: bool = False,
) -> list[float]:
    """Train ``model`` (already on its device) and return the training bits/dim of each step run.

    ``data``: integer pixel levels ``(N, C, H, W)`` in ``[0, n_bins)`` (with optional ``labels``) or an
    :class:`~fastflow.data.ImageSource`. Batch ``s`` is a function of ``(config.seed, s)`` only
    (:func:`~fastflow.data.batch_at_step`), so ``resume=True`` (continue from ``config.out``'s checkpoint:
    weights, optimizer, loss scaler, step) reproduces the loss curve of an uninterrupted run. ``heldout``:
    integer levels for the periodic held-out bits/dim. The first batch initialises ActNorm.

    Under ``torch.distributed`` (see :mod:`fastflow.distributed`) each rank trains on its shard of every
    batch inside DDP, the reported loss is the mean over ranks, and only rank 0 evaluates, prints and writes.
    """
    if labels is not None and not isinstance(data, torch.Tensor):
        raise ValueError("labels go with a levels tensor; an ImageSource draws its own labels")
    source = TensorImages(data, labels) if isinstance(data, torch.Tensor) else data
    if tuple(source.image_shape) != tuple(model.image_shape):
        raise ValueError(f"data has images of shape {tuple(source.image_shape)}, the model {model.image_shape}")
    rank, world_size = rank_and_world_size()
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    start, heldout_bpd = 0, None
    if resume:
        if config.out is None:
            raise ValueError("resume=True needs config.out, the folder holding the checkpoint")
        start, heldout_bpd = _restore(os.path.join(config.out, CHECKPOINT_NAME), model, optimizer, scaler)

    def local_batch(step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = batch_at_step(source, step, config.batch, model.n_bins, config.seed)
        x = shard(x, rank, world_size).to(device)
        return x, None if y is None else shard(y, rank, world_size).to(device)

    model.train()
    if start < config.steps:
        initialize_actnorm(model, *local_batch(start), amp=config.amp)
    objective: nn.Module = _BitsPerDim(model)
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        objective = DistributedDataParallel(objective, device_ids=device_ids)
    main = rank == 0
    bar = ProgressBar(config.steps - start, "train") if config.progress and main else None
    history: list[float] = []
    for step in range(start, config.steps):
        x, y = local_batch(step)
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        with _autocast(device, config.amp):
            loss = objective(x, y).mean()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        scaler.step(optimizer)
        scaler.update()
        reported = loss.detach().float()
        if world_size > 1:
            torch.distributed.all_reduce(reported)
            reported /= world_size
        history.append(float(reported))
        if not math.isfinite(history[-1]):
            raise FloatingPointError(f"non-finite training loss {history[-1]} at step {step}")
        done = step + 1
        last = done == config.steps
        if main and heldout is not None and _due(done, config.eval_every, last):
            heldout_bpd = evaluate_bits_per_dim(model, heldout)
            if bar is not None:
                bar.stream.write("\n")
            print(f"step {done}: held-out {heldout_bpd:.3f} bits/dim", flush=True)
        if main and config.out is not None and _due(done, config.save_every, last):
            _write_outputs(config.out, model, optimizer, scaler, config, done, heldout_bpd)
        if bar is not None:
            recent = history[-50:]
            held = "" if heldout_bpd is None else f", held-out {heldout_bpd:.3f}"
            bar.update(done - start, f"loss {sum(recent) / len(recent):.3f} bits/dim{held}", force=last)
    if bar is not None:
        bar.close()
    if world_size > 1:
        torch.distributed.barrier()  # ranks leave together, after rank 0's last writes
    return history
