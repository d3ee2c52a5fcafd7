"""``reversible_instructions``: CPU instructions per training step, standard against reversible backprop, of the
reference Glow step's structure with tiny tensors (issue 13).

The reversible target (a step at most 1.35x a standard one, ``train_step_cpu``) is missed by host work: the walk's
Python, dispatch and nested autograd calls, not its arithmetic. At the reference step's structure (Glow, 3 levels of
8 steps) with tensors too small to compute anything (:data:`CONFIG`: 8x8 images, batch 1, hidden width 8) a step is
host work only, and its instruction count under callgrind (one thread, counted inside the steps only, as
:mod:`benchmarks.host_instructions` counts) does not move with the load of this shared machine, whose wall clock
varies by more than the changes being measured. Rows, per mode: the configuration (``steps`` is Glow's steps per
level; :data:`STEPS` training steps are counted), ``instructions_per_step`` in millions (the
:class:`~fastflow.step.TrainStep` of ``train_step_cpu``, optimizer included) and ``vs_standard``. 5 to 15 minutes
(two processes at a time, longer on a loaded machine).
"""

from __future__ import annotations

import shutil
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from benchmarks.common import SKIPPED, Budget
from benchmarks.host_instructions import count_instructions, run_counted

__all__ = ["CONFIG", "MODES", "instruction_rows"]

CONFIG = {"resolution": 8, "levels": 3, "steps": 8, "hidden": 8, "batch": 1, "amp": None}
"""The reference step's structure (levels, steps per level) with tiny tensors: a host-only step."""
MODES = ("standard", "reversible")
STEPS = 3


def _child(mode: str) -> None:
    """Build and warm up the step (``train_step_cpu``'s, eager), then run :data:`STEPS` steps where callgrind counts."""
    from benchmarks.step_modes import _Variant

    torch.set_num_threads(1)
    with warnings.catch_warnings():  # batch 1 at a 1x1 level: ActNorm's single-value warning, expected here
        warnings.simplefilter("ignore", RuntimeWarning)
        variant = _Variant(CONFIG, "eager", mode == "reversible", torch.device("cpu"))
    run_counted(lambda: variant.block(STEPS))
    print(mode)


def instruction_rows(budget: Budget | None = None) -> list[dict[str, Any]]:
    """One row per mode of :data:`MODES` (module docstring); both processes at once."""
    budget = budget or Budget()
    if shutil.which("valgrind") is None:
        return [{"mode": m, **CONFIG, "skipped": "valgrind not installed"} for m in MODES]
    if budget.expired():
        return [{"mode": m, **CONFIG, **SKIPPED} for m in MODES]
    with ThreadPoolExecutor(max_workers=len(MODES)) as pool:
        counts = list(pool.map(lambda m: count_instructions(["benchmarks.reversible_instructions", m], STEPS), MODES))
    rows = []
    for mode, (per_step, _, error) in zip(MODES, counts):
        row: dict[str, Any] = {"mode": mode, **CONFIG}
        rows.append({**row, "error": error} if error is not None else {**row, "instructions_per_step": per_step})
    standard = rows[0].get("instructions_per_step")
    for row in rows:
        if standard and "instructions_per_step" in row:
            row["vs_standard"] = round(row["instructions_per_step"] / standard, 3)
    return rows


if __name__ == "__main__":
    _child(sys.argv[1])
