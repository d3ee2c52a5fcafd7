"""One Jet training step (forward + backward) at 32 and 64 couplings: peak activation memory and time of
per-coupling checkpointing (``torch.utils.checkpoint`` of every layer) against reversible backprop; and, on CUDA,
the largest batch whose training step fits at 256x256 for standard, checkpoint and reversible backprop.

Peak memory is measured as in :mod:`benchmarks.train_step`: on the CPU the peak RSS (``VmHWM``, reset just before
the second step) above the RSS before it, in a fresh subprocess per configuration with glibc serving allocations
of 16 KiB and more by mmap (so RSS tracks live tensors); ``max_memory_allocated`` on CUDA. ``python -m benchmarks
--cases jet_memory`` runs it; ``reversible_vs_checkpoint`` is the reversible peak over the checkpointing one at
the same number of couplings (the target is <= 1/4).

``python -m benchmarks --device cuda --cases jet_largest_batch``: a Jet of :data:`LARGE` (256x256 RGB in 16x16
patches, 256 tokens of 768 features, 32 couplings, a ViT of width 256 and one block each, float32) trained on
batches of 1, 2, 4, ... up to :data:`LARGEST_BATCH_CAP` until a step runs out of CUDA memory, per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from functools import partial
from typing import Any

import torch

from benchmarks.common import SKIPPED, Budget, frozen_adam, largest_fitting_batch, median_ms, step_fits
from benchmarks.train_step import _reset_peak_rss_kb, _status_kb, checkpoint_every_layer
from fastflow.models import Jet
from fastflow.nn.reversible import deferred_guards

__all__ = ["COUPLINGS", "MODES", "LARGE", "LARGEST_BATCH_CAP", "measure", "jet_memory_rows", "jet_largest_batch_rows"]

COUPLINGS = (32, 64)
MODES = ("checkpoint", "reversible")
# 32x32 RGB in 8x8 patches: 16 tokens of 192 features, a ViT of width 64 and one block per coupling
BASE = {"resolution": 32, "patch_size": 8, "width": 64, "depth": 1, "heads": 4, "batch": 32}
LARGE = {"resolution": 256, "patch_size": 16, "width": 256, "depth": 1, "heads": 4, "couplings": 32}
LARGEST_BATCH_CAP = 4096
"""The largest batch :func:`jet_largest_batch_rows` tries (a power of two): a row that reaches it says ``capped``."""


def _set_mode(model: Jet, mode: str) -> None:
    """Switch ``model`` (its weights unchanged) to ``"standard"`` backprop or one of :data:`MODES`."""
    if mode not in ("standard", *MODES):
        raise ValueError(f"mode must be 'standard' or one of {MODES}, got {mode!r}")
    block = model.blocks[0]
    vars(block).pop("forward", None)  # undo an earlier checkpoint mode
    model.reversible = mode == "reversible"
    if mode == "checkpoint":
        checkpoint_every_layer(block)


def _model_and_batch(cfg: dict[str, Any], device: torch.device) -> tuple[Jet, torch.Tensor]:
    torch.manual_seed(0)
    model = Jet(
        3, cfg["resolution"], patch_size=cfg["patch_size"], couplings=cfg["couplings"], width=cfg["width"],
        depth=cfg["depth"], heads=cfg["heads"],
    ).to(device)  # fmt: skip
    _set_mode(model, cfg["mode"])
    for p in model.parameters():  # gradients are model state, not activations: allocate them up front
        p.grad = torch.zeros_like(p)
    x = torch.rand(cfg["batch"], 3, cfg["resolution"], cfg["resolution"], device=device) - 0.5
    return model, x


def _step(model: Jet, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=False)
    # as fastflow.train runs a step: the reversible drift check records on the device, and the walk accumulates
    # into .grad (an immediate check would hold a second set of parameter gradients until it passed)
    with deferred_guards():
        model.bits_per_dim(x).mean().backward()


def measure(cfg: dict[str, Any], device: torch.device, reps: int = 3, what: str = "both") -> dict[str, Any]:
    """Peak extra memory (MB, of a step after a warm-up step) and median time (ms) of one training step for
    ``cfg`` (:data:`BASE` plus ``couplings`` and ``mode``) in this process; ``what``: memory, time or both."""
    model, x = _model_and_batch(cfg, device)
    row = dict(cfg)
    if what in ("memory", "both"):
        _step(model, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _step(model, x)
            row["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            base_kb = _reset_peak_rss_kb()
            _step(model, x)
            row["peak_mb"] = (_status_kb("VmHWM") - base_kb) / 1024
    if what in ("time", "both"):
        row["ms"] = median_ms(lambda: _step(model, x), device, reps=reps, warmup=1)
    return row


def _isolated(cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """:func:`measure` on CUDA; on the CPU in fresh subprocesses (memory with mmap'd allocations, then time)."""
    if device.type == "cuda":
        return measure(cfg, device)
    row: dict[str, Any] = {}
    for what, env in (("memory", {"MALLOC_MMAP_THRESHOLD_": "16384"}), ("time", {})):
        cmd = [sys.executable, "-m", "benchmarks.bench_jet", "--config", json.dumps(cfg), "--what", what]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout
        row.update(json.loads(out.strip().splitlines()[-1]))
    return row


def jet_memory_rows(device: torch.device, quick: bool, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Checkpointing vs reversible at each of :data:`COUPLINGS` (only 32 with ``quick``); configurations not
    started before ``budget`` expires say ``skipped: time``."""
    rows = []
    for couplings in COUPLINGS[:1] if quick else COUPLINGS:
        pair = []
        for mode in MODES:
            cfg = {**BASE, "couplings": couplings, "mode": mode}
            pair.append({**cfg, **SKIPPED} if budget is not None and budget.expired() else _isolated(cfg, device))
        if all("peak_mb" in r for r in pair):
            pair[1]["reversible_vs_checkpoint"] = pair[1]["peak_mb"] / pair[0]["peak_mb"]
        rows += pair
    return rows


def _fits(model: Jet, optimizer: torch.optim.Optimizer, batch: int, device: torch.device) -> bool:
    """Whether one training step of ``model`` on a batch of ``batch`` images, ``optimizer``'s update included,
    fits in CUDA memory."""
    side = LARGE["resolution"]
    x = torch.rand(batch, 3, side, side, device=device) - 0.5
    return step_fits(lambda: (_step(model, x), optimizer.step()), model)


def jet_largest_batch_rows(device: torch.device, budget: Budget | None = None) -> list[dict[str, Any]]:
    """``jet_largest_batch``: for standard, checkpoint and reversible backprop, the largest power-of-two batch (up
    to :data:`LARGEST_BATCH_CAP`) whose training step of one :data:`LARGE` Jet, the fused Adam's update and
    moments included (:func:`~benchmarks.common.frozen_adam`), fits in CUDA memory (0 when batch
    1 does not); a search stopped by ``budget`` keeps what it found with ``search: "stopped: time"``, a mode not
    started says ``skipped: time``."""
    budget = budget or Budget()
    rows: list[dict[str, Any]] = []
    model = optimizer = None
    for mode in ("standard", *MODES):
        if budget.expired():
            rows.append({**LARGE, "mode": mode, **SKIPPED})
            continue
        if model is None:
            model, _ = _model_and_batch({**LARGE, "mode": mode, "batch": 1}, device)
            optimizer = frozen_adam(model)  # training holds the moments too
        _set_mode(model, mode)
        fits = partial(_fits, model, optimizer, device=device)
        rows.append({**LARGE, "mode": mode, **largest_fitting_batch(fits, LARGEST_BATCH_CAP, budget)})
    return rows


def _main() -> None:
    parser = argparse.ArgumentParser(description="one Jet training-step measurement, printed as JSON")
    parser.add_argument("--config", required=True)
    parser.add_argument("--what", choices=["memory", "time", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(measure(json.loads(args.config), torch.device("cpu"), what=args.what)))


if __name__ == "__main__":
    _main()
