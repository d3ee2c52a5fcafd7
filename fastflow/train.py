"""Training loop for flow models: Adam with linear warm-up, gradient clipping, held-out bits/dim."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastflow.models import FlowModel, dequantize
from fastflow.progress import ProgressBar

__all__ = ["TrainConfig", "evaluate_bits_per_dim", "train"]


@dataclass
class TrainConfig:
    """Optimisation settings: ``steps`` of ``batch`` images, Adam at ``lr`` after ``warmup`` linear steps,
    gradient-norm clipping at ``clip`` (0 disables it), progress bar on stderr when ``progress``."""

    steps: int = 1500
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    clip: float = 50.0
    seed: int = 0
    progress: bool = True


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
        x = dequantize(levels[start : start + batch].to(device), model.n_bins)
        y = None if labels is None else labels[start : start + batch].to(device)
        total += float(model.bits_per_dim(x, y).sum())
    torch.random.set_rng_state(generator_state)
    model.train(was_training)
    return total / len(levels)


def train(
    model: FlowModel,
    levels: torch.Tensor,
    config: TrainConfig,
    labels: torch.Tensor | None = None,
) -> list[float]:
    """Train ``model`` on integer pixel ``levels`` (``(N, C, H, W)`` in ``[0, n_bins)``); returns the
    per-step training bits/dim. The first batch initialises ActNorm (data-dependent)."""
    if levels.is_floating_point() or levels.dim() != 4:
        raise ValueError(f"levels must be an integer tensor (N, C, H, W), got {levels.dtype} {tuple(levels.shape)}")
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(config.warmup, 1)))
    bar = ProgressBar(config.steps, "train") if config.progress else None
    history: list[float] = []
    model.train()
    for step in range(config.steps):
        idx = torch.randint(0, len(levels), (config.batch,))
        x = dequantize(levels[idx].to(device), model.n_bins)
        y = None if labels is None else labels[idx].to(device)
        loss = model.bits_per_dim(x, y).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        schedule.step()
        history.append(float(loss.detach()))
        if bar is not None:
            recent = history[-50:]
            bar.update(step + 1, f"loss {sum(recent) / len(recent):.3f} bits/dim")
    if bar is not None:
        bar.close()
    if not all(math.isfinite(v) for v in history):
        raise FloatingPointError("training produced a non-finite loss")
    return history
