"""One Glow training step (forward + backward): time and peak memory by backprop mode.

Modes: ``standard`` backprop; ``checkpoint``: per-step gradient checkpointing (``torch.utils.checkpoint`` of
every FlowStep, what openai/glow used); ``reversible``: fastflow's reversible backprop; ``tiled``: reversible
with the coupling networks run in spatial tiles (``set_tiling(memory_budget_mb=tile_budget_mb)``).

Peak memory is what the step adds on top of the model, its gradient buffers and its inputs:
``max_memory_allocated`` on CUDA; on the CPU the peak RSS (``VmHWM``, reset just before the step) above the
RSS before it, in a fresh subprocess per configuration so one configuration's allocations never hide
another's, with large allocations served by mmap so that RSS tracks live tensors. Both are measured on the
second step (steady state).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from benchmarks.common import (
    SKIPPED,
    Budget,
    frozen_adam,
    largest_fitting_batch,
    median_ms,
    out_of_memory,
    step_fits,
)
from fastflow.models import Glow
from fastflow.nn import FlowSequential
from fastflow.nn.reversible import deferred_guards

__all__ = [
    "LARGEST_BATCH_CAP",
    "MODES",
    "checkpoint_every_layer",
    "measure",
    "measure_isolated",
    "depth_sweep",
    "resolution_sweep",
    "largest_batch_rows",
]

MODES = ("standard", "checkpoint", "reversible", "tiled")


def checkpoint_every_layer(block: FlowSequential) -> None:
    """Make ``block`` run each of its layers under ``torch.utils.checkpoint`` (recompute in backward)."""

    def forward(x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        total = None
        for layer in block.layers:
            x, logdet = checkpoint(layer, x, context, use_reentrant=False)
            total = logdet if total is None else total + logdet
        return x, total

    block.forward = forward  # type: ignore[method-assign]


def _set_mode(model: Glow, mode: str, tile_budget_mb: float) -> None:
    """Switch ``model`` (its weights unchanged) to backprop ``mode``, one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for block in model.blocks:
        vars(block).pop("forward", None)  # undo an earlier checkpoint mode
    model.reversible = mode in ("reversible", "tiled")
    if mode == "tiled":
        model.set_tiling(memory_budget_mb=tile_budget_mb)
    else:
        model.set_tiling()
    if mode == "checkpoint":
        for block in model.blocks:
            checkpoint_every_layer(block)


def _model_and_batch(cfg: dict[str, Any], device: torch.device) -> tuple[Glow, torch.Tensor]:
    model = Glow(
        in_channels=3, image_size=cfg["resolution"], levels=cfg["levels"], steps=cfg["steps"], hidden=cfg["hidden"]
    ).to(device)
    _set_mode(model, cfg["mode"], cfg.get("tile_budget_mb", 256))
    x = torch.rand(cfg["batch"], 3, cfg["resolution"], cfg["resolution"], device=device) - 0.5
    with torch.no_grad():
        model.train()
        model.log_prob(x)  # data-dependent ActNorm init, outside the measured step
    for p in model.parameters():  # gradients are model state, not activations: allocate them up front
        p.grad = torch.zeros_like(p)
    return model, x


def _step(model: Glow, x: torch.Tensor) -> None:
    """The step as training runs it (``fastflow.train``, ``TrainStep``): guards deferred, so a reversible backward
    keeps no copy of the gradients it accumulates into (an immediate drift check keeps one, to put them back)."""
    model.zero_grad(set_to_none=False)
    with deferred_guards():
        model.bits_per_dim(x).mean().backward()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss_kb() -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS and return that RSS in KiB (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _peak_mb(model: Glow, x: torch.Tensor, device: torch.device) -> float:
    _step(model, x)  # warm-up: allocator caches, thread pools and gradients exist before the measured step
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _step(model, x)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    base_kb = _reset_peak_rss_kb()
    _step(model, x)
    return (_status_kb("VmHWM") - base_kb) / 1024


def measure(cfg: dict[str, Any], device: torch.device, reps: int = 3, what: str = "both") -> dict[str, Any]:
    """Peak extra memory (MB, of a step after a warm-up step) and median time (ms) of one training step for
    ``cfg`` in this process; ``what`` is ``"memory"``, ``"time"`` or ``"both"``."""
    model, x = _model_and_batch(cfg, device)
    row = dict(cfg)
    if what in ("memory", "both"):
        row["peak_mb"] = _peak_mb(model, x, device)
    if what in ("time", "both"):
        row["ms"] = median_ms(lambda: _step(model, x), device, reps=reps, warmup=1)
    return row


def _child(cfg: dict[str, Any], reps: int, what: str, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--config", json.dumps(cfg), "--reps", str(reps)]
    out = subprocess.run(
        [*cmd, "--what", what], check=True, capture_output=True, text=True, env={**os.environ, **env}
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_isolated(cfg: dict[str, Any], device: torch.device, reps: int = 3) -> dict[str, Any]:
    """:func:`measure` on CUDA; on the CPU two fresh subprocesses: one for memory, with glibc serving every
    allocation of 16 KiB or more by mmap so that freed memory leaves the RSS (which then tracks live tensors),
    and one for time, with the default allocator."""
    if device.type == "cuda":
        return measure(cfg, device, reps)
    memory = _child(cfg, reps, "memory", {"MALLOC_MMAP_THRESHOLD_": "16384"})
    return {**memory, **_child(cfg, reps, "time", {})}


def _relative_to_standard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``memory_vs_standard`` / ``time_vs_standard`` where both they and the standard row have the
    measurement (a row out of memory, ``error: oom``, has none)."""
    standard = next((r for r in rows if r["mode"] == "standard" and "ms" in r), None)
    for row in rows:
        if standard is None or "ms" not in row:
            continue
        if "peak_mb" in standard and "peak_mb" in row:
            row["memory_vs_standard"] = row["peak_mb"] / standard["peak_mb"]
        row["time_vs_standard"] = row["ms"] / standard["ms"]
    return rows


def _measured_or_skipped(cfg: dict[str, Any], device: torch.device, budget: Budget | None) -> dict[str, Any]:
    if budget is not None and budget.expired():
        return {**cfg, **SKIPPED}
    return measure_isolated(cfg, device)


def depth_sweep(device: torch.device, quick: bool, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Standard vs reversible over K in {8, 16, 32, 64} at a fixed resolution; configurations not started
    before ``budget`` expires say ``skipped: time``."""
    if device.type == "cuda":
        base = {"resolution": 64, "levels": 3, "hidden": 512, "batch": 16}
    else:
        base = {"resolution": 32, "levels": 3, "hidden": 64, "batch": 8}
    rows = []
    for steps in (8, 16, 32, 64) if not quick else (8, 32, 64):
        pair = [
            _measured_or_skipped({**base, "steps": steps, "mode": mode}, device, budget)
            for mode in ("standard", "reversible")
        ]
        rows += _relative_to_standard(pair)
    return rows


RESOLUTIONS_CUDA = ((256, 6), (512, 7), (1024, 8))
"""``(resolution, levels)`` of :func:`resolution_sweep` on CUDA."""


def resolution_sweep(
    device: torch.device, quick: bool, resolutions: tuple[int, ...] | None = None, budget: Budget | None = None
) -> list[dict[str, Any]]:
    """Every mode at growing resolution: on CUDA Glow K=32 hidden 512 at 256 (L=6), 512 (L=7) and 1024 (L=8)
    pixels, batch 1, skipping a mode where the step does not fit; on the CPU small stand-ins. ``resolutions``
    keeps only those sizes (to split the sweep over several commands); configurations not started before
    ``budget`` expires say ``skipped: time``."""
    if device.type == "cuda":
        sizes = list(RESOLUTIONS_CUDA)
        base = {"steps": 32, "hidden": 512, "batch": 1, "tile_budget_mb": 1024}
    else:
        sizes = [(32, 3), (64, 4)] if quick else [(32, 3), (64, 4), (128, 5)]
        base = {"steps": 4, "hidden": 64, "batch": 2, "tile_budget_mb": 1}
    if resolutions:
        sizes = [(r, levels) for r, levels in sizes if r in resolutions]
    rows = []
    for resolution, levels in sizes:
        group = []
        for mode in MODES:
            try:
                group.append(
                    _measured_or_skipped(
                        {**base, "resolution": resolution, "levels": levels, "mode": mode}, device, budget
                    )
                )
            except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
                if not out_of_memory(err):
                    raise
                torch.cuda.empty_cache()
                group.append({**base, "resolution": resolution, "levels": levels, "mode": mode, "error": "oom"})
        rows += _relative_to_standard(group)
    return rows


LARGEST_BATCH_CAP = 64
"""The largest batch :func:`largest_batch_rows` tries (a power of two): a row that reaches it says ``capped``."""


def _fits(model: Glow, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
    """Whether one training step of ``model`` on ``x``, ``optimizer``'s update included, fits in CUDA memory."""
    return step_fits(lambda: (_step(model, x), optimizer.step()), model)


def _nothing_fits(batch: int) -> bool:
    return False


def _fits_batch(model: Glow, x: torch.Tensor, optimizer: torch.optim.Optimizer, batch: int) -> bool:
    """:func:`_fits` on a fresh batch of ``batch`` samples shaped like ``x``."""
    return _fits(model, x.new_empty(batch, *x.shape[1:]).uniform_(-0.5, 0.5), optimizer)


def largest_batch_rows(
    device: torch.device, resolutions: tuple[int, ...] | None = None, budget: Budget | None = None
) -> list[dict[str, Any]]:
    """``largest_batch``: the largest power-of-two batch (up to :data:`LARGEST_BATCH_CAP`) whose training step
    (the fused Adam's update and moments included: :func:`~benchmarks.common.frozen_adam`) fits in CUDA memory,
    for every mode at each of :data:`RESOLUTIONS_CUDA` (Glow K=32, hidden 512, float32, tiles of 1024 MB), 0
    when batch 1 does not fit. One model per resolution (initialised at batch 1) switched
    from mode to mode; steps at batch 1, 2, 4, ... until one does not fit. A search stopped by ``budget``
    reports what it found so far with ``search: "stopped: time"``; a mode not started says ``skipped: time``."""
    budget = budget or Budget()
    rows: list[dict[str, Any]] = []
    for resolution, levels in RESOLUTIONS_CUDA:
        if resolutions and resolution not in resolutions:
            continue
        base = {"resolution": resolution, "levels": levels, "steps": 32, "hidden": 512}
        model = x = optimizer = None
        if not budget.expired():
            try:
                model, x = _model_and_batch({**base, "mode": "standard", "batch": 1}, device)
                optimizer = frozen_adam(model)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
        for mode in MODES:
            if budget.expired():
                rows.append({**base, "mode": mode, **SKIPPED})
                continue
            fits: Callable[[int], bool] = _nothing_fits  # no model: not even batch 1
            if model is not None and x is not None and optimizer is not None:
                _set_mode(model, mode, tile_budget_mb=1024)
                fits = partial(_fits_batch, model, x, optimizer)
            rows.append({**base, "mode": mode, **largest_fitting_batch(fits, LARGEST_BATCH_CAP, budget)})
        model = x = optimizer = None
        torch.cuda.empty_cache()
    return rows


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--what", choices=("memory", "time", "both"), default="both")
    args = parser.parse_args()
    print(json.dumps(measure(json.loads(args.config), torch.device("cpu"), args.reps, args.what)))


if __name__ == "__main__":
    _main()
