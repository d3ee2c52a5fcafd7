"""A whole Glow training step by execution mode (issue 13): eager, ``torch.compile`` and CUDA graph.

Every variant runs :class:`fastflow.step.TrainStep` (the step ``fastflow train`` runs, ``--compile`` and
``--cuda-graph`` included): bits/dim of the batch, its backward, gradient-norm clipping at 50 (``fastflow
train``'s default) and Adam's step from :func:`fastflow.step.make_adam` at :data:`TIMING_LR`. ``ms`` is the wall
time per step over blocks of steps run back to back (one device sync per block, so a launch-bound step is
charged its host time), the median of several blocks, after warm-up steps (the first compiled steps
compile; a CUDA-graph step warms up on a side stream, captures, then replays).
``warmup_s`` is the wall time of those warm-up steps (compilation included); ``peak_mb`` (CUDA) the peak memory.
Every variant starts from the same weights and batch and takes the same steps, so what it computes must agree
with eager's (:data:`_CHECKED`): its losses at the first step (``loss_step1``: the forward) and at
:data:`CHECK_STEP` (``loss_check``: after ``CHECK_STEP - 1`` updates, and in ``cuda-graph`` mode a replay of
the captured graph), the gradient norm of that step before clipping (``grad_norm_check``: the backward) and the
norm of the weights' change over the steps up to it (``update_norm``: the optimizer steps, replays included).
``matches_eager`` says whether they do, and a row that does not match is reported without a time.
Compiled rows give ``graphs`` and ``graph_breaks``, Dynamo's counts while they compiled (the update is compiled
too; Dynamo cannot trace the fused Adam kernel's wrapper and runs it eagerly, which it counts as breaks).

Cases:

- ``train_step_cpu`` (CPU, issue 13's CPU targets measured in one run): the reference step (Glow L=3, K=8,
  hidden 64, 32x32, batch 8, float32) ``eager``, ``compiled``, ``reversible`` and ``compiled-reversible``,
  timed round-robin (one block of each in turn) so that a shared machine's noise falls on all alike.
  Targets: ``compiled`` at least 1.5x ``eager`` (``speedup_vs_eager``); ``reversible`` at most 1.35x
  ``eager`` (``time_vs_standard``; ``compiled-reversible`` against ``compiled``).
- ``train_modes`` (CUDA, ``make gpu-check``): the step under bf16 autocast at 32x32 (L=3, K=32, hidden 512,
  batch 64) and 256x256 (L=6, K=32, hidden 512, batch 4), ``eager``, ``cuda-graph`` and ``compile``. The
  measurements run in one child process, in the order eager and cuda-graph at 32x32 and at 256x256, then
  compile at 32x32 and at 256x256 (compilation is the slow part); the child is killed when the case's time box
  runs out and the rows it did not finish say ``skipped: time``. Targets: at 32x32 ``cuda-graph`` at least 3x
  ``eager`` and 1.3x ``compile``; at 256x256 at least 1.5x ``eager``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import SKIPPED, BoxedProcess, Budget, dynamo_counts
from fastflow.models import Glow
from fastflow.step import CAPTURE_WARMUP_STEPS, BitsPerDim, TrainStep, make_adam
from fastflow.train import TrainConfig, initialize_actnorm

__all__ = ["CPU_REFERENCE", "GPU_CONFIGS", "cpu_reference_rows", "gpu_mode_rows"]

CPU_REFERENCE = {"resolution": 32, "levels": 3, "steps": 8, "hidden": 64, "batch": 8, "amp": None}
"""The reference step of issue 13 (Glow L=3, K=8, hidden 64, 32x32, batch 8, float32)."""

GPU_CONFIGS = (
    {"resolution": 32, "levels": 3, "steps": 32, "hidden": 512, "batch": 64, "amp": "bf16"},
    {"resolution": 256, "levels": 6, "steps": 32, "hidden": 512, "batch": 4, "amp": "bf16"},
)
"""``train_modes``: CIFAR size and 256x256, bf16 autocast."""

GPU_ORDER = (("eager", 0), ("cuda-graph", 0), ("eager", 1), ("cuda-graph", 1), ("compile", 0), ("compile", 1))
"""``(mode, index in GPU_CONFIGS)`` in the order measured: eager and CUDA graph at both sizes first (about 40 s
together on an H200), then the compilations, the slow part (the 32x32 one had never finished within its box
before the 256x256 rows, ordered after it until 2026-11-27, could start)."""

TIMING_LR = TrainConfig().lr_at(0)
"""The learning rate of every timed step: ``fastflow train``'s first (warm-up) step's. The step's work does not
depend on it, but the timing repeats one batch without warm-up, and at 1e-3 the bf16 Glow of ``train_modes``
reached an infinite loss within its first ~15 steps on an H200 (2026-11-26)."""

_ROW_TAG = "STEP_MODES_ROW "
_CHECKED = {
    "loss_step1": {None: 1e-4, "bf16": 3e-2},
    "loss_check": {None: 1e-4, "bf16": 3e-2},
    "grad_norm_check": {None: 1e-3, "bf16": 5e-2},
    "update_norm": {None: 1e-3, "bf16": 5e-2},
}
"""What every mode must reproduce of eager's, with the relative tolerance by ``amp``: the losses of the first
step and of :data:`CHECK_STEP`, the gradient norm of the check step before clipping (the backward: a gradient
off by a constant factor shows here, not in Adam's normalised updates) and the norm of all the updates up to it
(the optimizer steps: a replayed step that updates nothing is short by 1 / CHECK_STEP of it). At
:data:`TIMING_LR` the loss moves by less than bf16's tolerance, so the losses alone check little in bf16."""


CHECK_STEP = CAPTURE_WARMUP_STEPS + 3
"""The step whose loss every mode is checked on besides the first (``loss_check``): after ``CHECK_STEP - 1``
updates, so it checks the backward and the optimizer step too, and a replay of the captured graph in
``cuda-graph`` mode (its first ``CAPTURE_WARMUP_STEPS`` steps run eagerly and the next one captures)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Variant:
    """One model and its :class:`TrainStep` in one mode, warmed up; ``block(n)`` times ``n`` steps."""

    def __init__(self, cfg: dict[str, Any], mode: str, reversible: bool, device: torch.device) -> None:
        torch.manual_seed(0)
        self.device = device
        model = Glow(
            3, cfg["resolution"], levels=cfg["levels"], steps=cfg["steps"], hidden=cfg["hidden"], reversible=reversible
        ).to(device)  # fmt: skip
        generator = torch.Generator().manual_seed(1)
        self.x = (torch.rand(cfg["batch"], 3, cfg["resolution"], cfg["resolution"], generator=generator) - 0.5).to(
            device
        )
        initialize_actnorm(model, self.x, amp=cfg["amp"])
        self.step = TrainStep(
            BitsPerDim(model),
            model,
            make_adam(model.parameters(), TIMING_LR, mode),
            clip=50.0,
            amp=cfg["amp"],
            mode=mode,
        )
        initial = [p.detach().clone() for p in self.step.parameters]
        graphs, breaks = dynamo_counts()
        start = time.perf_counter()
        self.loss_step1 = float(self.step(self.x, None, TIMING_LR))
        for _ in range(CHECK_STEP - 2):  # the same steps in every mode: CUDA graphs' warm-up and capture
            self.step(self.x, None, TIMING_LR)
        self.loss_check = float(self.step(self.x, None, TIMING_LR))  # after updates; a replay in cuda-graph mode
        _sync(device)
        self.warmup_s = time.perf_counter() - start
        after = dynamo_counts()
        self.graphs, self.graph_breaks = after[0] - graphs, after[1] - breaks
        assert self.step.grad_norm is not None  # clip > 0
        self.grad_norm_check = float(self.step.grad_norm)  # of the check step, before clipping: its backward
        # how far CHECK_STEP updates took the weights: a replay that updates nothing falls short by a step or more
        moved = sum(
            float((p.detach().double() - p0.double()).square().sum()) for p, p0 in zip(self.step.parameters, initial)
        )
        self.update_norm = moved**0.5

    def block(self, n: int) -> float:
        """Mean ms per step of ``n`` steps run back to back (one sync at the end)."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(n):
            loss = self.step(self.x, None, TIMING_LR)
        _sync(self.device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)}")
        return (time.perf_counter() - start) * 1e3 / n

    def row(self, ms: float) -> dict[str, Any]:
        row = {"ms": ms, "warmup_s": round(self.warmup_s, 1)}
        row.update(
            loss_step1=self.loss_step1,
            loss_check=self.loss_check,
            grad_norm_check=self.grad_norm_check,
            update_norm=self.update_norm,
        )
        if self.step.mode == "compile":
            row.update(graphs=self.graphs, graph_breaks=self.graph_breaks)
        return row


def _block_size(variant: _Variant, min_block_s: float) -> int:
    """Steps per timed block: enough for ``min_block_s`` of wall time, at least 2."""
    return max(2, round(min_block_s * 1e3 / variant.block(1)))


def _compare(rows: list[dict[str, Any]], base: dict[str, Any], amp: str | None) -> None:
    """``matches_eager`` (each of :data:`_CHECKED` against ``base``'s) and ``speedup_vs_eager``, in place; a row
    that does not match keeps its figures but loses its time (no speed is reported for a wrong answer)."""
    for row in rows:
        if "ms" not in row:
            continue
        wrong = [
            f"{key} {row.get(key, math.nan):.6g} against {base[key]:.6g}"
            for key, tol in _CHECKED.items()
            if not abs(row.get(key, math.nan) - base[key]) <= tol[amp] * abs(base[key])
        ]
        row["matches_eager"] = not wrong
        if row["matches_eager"]:
            row["speedup_vs_eager"] = base["ms"] / row["ms"]
        else:
            row["error"] = f"mismatch with eager: {'; '.join(wrong)}; not timed"
            del row["ms"]


CPU_VARIANTS = {
    "eager": ("eager", False),
    "compiled": ("compile", False),
    "reversible": ("eager", True),
    "compiled-reversible": ("compile", True),
}
"""``variant: (TrainStep mode, reversible)`` of ``train_step_cpu``."""


def cpu_reference_rows(quick: bool, budget: Budget | None = None) -> list[dict[str, Any]]:
    """``train_step_cpu``: the reference step in each of :data:`CPU_VARIANTS`, timed round-robin on the CPU."""
    device = torch.device("cpu")
    budget = budget or Budget()
    cfg = {k: v for k, v in CPU_REFERENCE.items() if k != "amp"}
    variants: dict[str, _Variant] = {}
    times: dict[str, list[float]] = {}
    # Both compiled variants compile TrainStep's code: each must compile for its own static shapes, as a process
    # training one model does, not have the second compilation mark the shapes that differ dynamic (which
    # Inductor fails to compile for these models with torch 2.13).
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for name, (mode, reversible) in CPU_VARIANTS.items():
            if budget.expired():
                break
            variants[name] = _Variant(CPU_REFERENCE, mode, reversible, device)
        blocks = {name: _block_size(v, 0.3 if quick else 1.0) for name, v in variants.items()}
        times = {name: [] for name in variants}
        for _ in range(3 if quick else 7):
            if budget.expired() and all(times.values()):
                break
            for name, variant in variants.items():
                times[name].append(variant.block(blocks[name]))
    rows = []
    for name in CPU_VARIANTS:
        row: dict[str, Any] = {**cfg, "variant": name}
        if name in variants:
            row.update(variants[name].row(statistics.median(times[name])), blocks=len(times[name]))
        else:
            row.update(SKIPPED)
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    if "ms" in by_name["eager"]:
        _compare(rows, by_name["eager"], None)
    for name, standard in (("reversible", "eager"), ("compiled-reversible", "compiled")):
        if "ms" in by_name[name] and "ms" in by_name[standard]:
            by_name[name]["time_vs_standard"] = by_name[name]["ms"] / by_name[standard]["ms"]
    if "speedup_vs_eager" in by_name["compiled"]:
        by_name["compiled"]["target_met"] = by_name["compiled"]["speedup_vs_eager"] >= 1.5
    if "time_vs_standard" in by_name["reversible"]:
        by_name["reversible"]["target_met"] = by_name["reversible"]["time_vs_standard"] <= 1.35
    return rows


def _measure_gpu(cfg: dict[str, Any], mode: str, device: torch.device) -> dict[str, Any]:
    """One ``train_modes`` row, in this process; an error (out of memory, a failed capture or compilation) is
    reported in the row, not raised."""
    try:
        variant = _Variant(cfg, mode, False, device)
        block = _block_size(variant, 0.3)
        row = variant.row(statistics.median(variant.block(block) for _ in range(5)))
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        del variant  # the model and its graph pool go before the next mode's
    except (RuntimeError, ValueError, FloatingPointError) as err:
        row = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return row


def _child_rows(
    order: list[tuple[str, int]], budget: Budget
) -> tuple[dict[tuple[str, int], dict[str, Any]], dict[str, Any]]:
    """Run :func:`_measure_gpu` for ``order`` in a child process, collecting its rows until it ends or
    ``budget`` expires (then it is killed); returns the rows by ``(mode, index)`` and the row for those it
    did not send (``skipped: time``, or the child's exit status if it died)."""
    cmd = [sys.executable, "-m", "benchmarks.step_modes", "--child", json.dumps(order)]
    child = BoxedProcess(cmd, own_group=False)  # in our process group: killing a time-boxed gpu-check step kills it
    got: dict[tuple[str, int], dict[str, Any]] = {}
    for line in child.lines(budget.until):
        if line.startswith(_ROW_TAG):
            mode, index, row = json.loads(line[len(_ROW_TAG) :])
            got[mode, index] = row
        print(line, end="", flush=True)  # rows too: in the log (and a device's output) if the case is cut short
    if child.killed:
        print(f"train_modes: time box over, child stopped after {len(got)} of {len(order)} rows", flush=True)
        return got, dict(SKIPPED)
    return got, {"error": f"the measuring process exited with status {child.process.returncode}"}


def gpu_mode_rows(budget: Budget | None = None, resolutions: tuple[int, ...] | None = None) -> list[dict[str, Any]]:
    """``train_modes``: rows of ``{config, mode, ms, speedup_vs_eager, speedup_vs_compile, ...}`` for the configs
    of :data:`GPU_CONFIGS` at ``resolutions`` (default: all), so that one size's three modes, the compilation
    included, can have a call of their own."""
    chosen = [i for i, cfg in enumerate(GPU_CONFIGS) if resolutions is None or cfg["resolution"] in resolutions]
    if not chosen:
        sizes = sorted(cfg["resolution"] for cfg in GPU_CONFIGS)
        raise ValueError(f"train_modes measures resolutions {sizes}, got {list(resolutions or ())}")
    got, missing = _child_rows([(mode, i) for mode, i in GPU_ORDER if i in chosen], budget or Budget())
    rows = []
    for index, cfg in ((i, GPU_CONFIGS[i]) for i in chosen):
        group = [
            {**cfg, "mode": mode, **got.get((mode, index), missing)} for mode in ("eager", "compile", "cuda-graph")
        ]
        by_mode = {r["mode"]: r for r in group}
        if "ms" in by_mode["eager"]:
            _compare(group, by_mode["eager"], cfg["amp"])
        if "ms" in by_mode["compile"]:
            for row in group:
                if "ms" in row:
                    row["speedup_vs_compile"] = by_mode["compile"]["ms"] / row["ms"]
        rows += group
    return rows


def _child_main(order: list[tuple[str, int]]) -> None:
    device = torch.device("cuda")
    for mode, index in order:
        row = _measure_gpu(GPU_CONFIGS[index], mode, device)
        print(_ROW_TAG + json.dumps([mode, index, row]), flush=True)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="train_modes child: measure (mode, config index) pairs on CUDA")
    parser.add_argument("--child", required=True, help='JSON list of [mode, config index], e.g. [["eager", 0]]')
    args = parser.parse_args(argv)
    _child_main([tuple(pair) for pair in json.loads(args.child)])


if __name__ == "__main__":
    _main()
