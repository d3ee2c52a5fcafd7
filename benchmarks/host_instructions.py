"""``tabular_instructions``: CPU instructions per training step of TabularFlow and of zuko's RealNVP (issue 14).

The tabular step is host-bound (small tensors: Python, dispatch and the optimizer's per-tensor loop), and this
shared machine's wall clock varies by 10-30% from run to run, more than the differences being worked on.
Instructions retired do not: each model runs ``STEPS`` steps (after ``WARMUP`` untimed ones) in a fresh process
under valgrind's callgrind, counted only inside the steps (the steps run in a libc ``qsort`` comparison callback,
and ``--toggle-collect=qsort*`` counts nothing else: not the import, not the set-up), one thread: a count that
the machine's load does not change. It is a count, not a time: it stands for the time where the step is host-bound
(two moons, ``D = 2``: 1.20x counted, 1.25x in the ``tabular`` case's timing), not where the arithmetic and the
memory traffic grow (``D = 64``: 0.88x counted, while the ``tabular`` case times the 64-D digits step at 1.14x).

Rows, per model (:data:`MODELS`, the tabular benchmark's ``MATCHED`` size: 5 transforms, width 64, 2 hidden
layers, batch 256, ``D`` features) and phase: ``forward`` (``log_prob`` with autograd recording), ``step`` (the
forward, ``zero_grad``, the backward and ``Adam.step``, Adam at its defaults, as the ``tabular`` case trains);
``instructions_per_step`` in millions, ``vs_zuko_realnvp`` the ratio to zuko's row of the same phase and
``D``, and ``parameter_tensors`` (Adam's single-tensor loop costs per tensor). Needs ``valgrind`` (a row says
so where it is missing); about 4 minutes per process, two at a time.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from benchmarks.common import SKIPPED, Budget

__all__ = ["MODELS", "PHASES", "count_instructions", "instruction_rows", "run_counted"]

MODELS = ("fastflow", "zuko_realnvp")
PHASES = ("forward", "step")
FEATURES = (2, 64)
STEPS = 10
WARMUP = 5
BATCH = 256
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
TIMEOUT_S = 1200  # one process takes about 4 minutes under callgrind
PLAUSIBLE = 1e6
"""Fewer instructions per step than this is no step (callgrind counted outside the steps): an error row."""


def _model(name: str, features: int) -> tuple[torch.nn.Module, Any]:
    """The model and its per-example NLL ``x -> -log p(x)``."""
    from benchmarks.tabular import MATCHED

    if name == "fastflow":
        from fastflow.models import TabularFlow

        flow = TabularFlow(features, transforms=MATCHED["transforms"], hidden=MATCHED["hidden"])
        return flow, lambda x: -flow.log_prob(x)
    import zuko

    hidden = (MATCHED["hidden"],) * MATCHED["hidden_layers"]
    realnvp = zuko.flows.RealNVP(features, 0, transforms=MATCHED["transforms"], hidden_features=hidden)
    return realnvp, lambda x: -realnvp().log_prob(x)


def _child(name: str, phase: str, features: int) -> None:
    """Build the model, warm up, then run :data:`STEPS` steps inside ``qsort``'s comparison callback (the only code
    callgrind counts)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, nll = _model(name, features)
    x = torch.randn(BATCH, features)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        loss = nll(x).mean()
        if phase == "step":
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    for _ in range(WARMUP):
        step()
    run_counted(lambda: [step() for _ in range(STEPS)])
    print(len(list(model.parameters())))  # the parameter tensors, for the row


def run_counted(steps: Callable[[], Any]) -> None:
    """Run ``steps()`` once inside ``qsort``'s comparison callback: the only code ``--toggle-collect=qsort*`` counts."""
    ran = []

    def compare(_a: int, _b: int) -> int:
        if not ran:  # the callback may be called more than once: the steps run at the first call
            ran.append(True)
            steps()
        return 0

    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(compare)
    pair = (ctypes.c_int * 2)(1, 2)
    ctypes.CDLL(None).qsort(pair, 2, ctypes.sizeof(ctypes.c_int), callback)
    if not ran:
        raise SystemExit("qsort never called the comparison: no step ran where callgrind counts")


def count_instructions(child: list[str], steps: int) -> tuple[float | None, str, str | None]:
    """Run ``python -m <child...>`` (one thread) under callgrind, counting only what :func:`run_counted` runs:
    ``(millions of instructions per step over steps, the child's stdout, None)``, or ``(None, stdout, error)``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = [
            "valgrind", "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=qsort*",
            f"--log-file={os.path.join(tmp, 'valgrind.log')}",  # stderr keeps the child's own errors only
            f"--callgrind-out-file={out}", sys.executable, "-m", *child,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None, "", f"no result within {TIMEOUT_S} s"
        totals = []
        if os.path.exists(out):
            with open(out) as counts:
                totals = _TOTALS.findall(counts.read())
        if done.returncode != 0 or not totals:
            return None, done.stdout, (done.stderr.strip().splitlines() or ["no callgrind totals"])[-1][:200]
    per_step = int(totals[-1]) / steps
    if per_step < PLAUSIBLE:
        return None, done.stdout, f"{per_step:.0f} instructions per step counted: not the steps"
    return round(per_step / 1e6, 3), done.stdout, None


def _count(name: str, phase: str, features: int) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name, "phase": phase, "features": features}
    per_step, stdout, error = count_instructions(["benchmarks.host_instructions", name, phase, str(features)], STEPS)
    if error is not None:
        return {**row, "error": error}
    row["parameter_tensors"] = int(stdout.split()[-1])
    row["instructions_per_step"] = per_step
    return row


def instruction_rows(quick: bool = False, budget: Budget | None = None) -> list[dict[str, Any]]:
    """The rows of the module docstring (``quick``: ``D = 2`` only), two processes at a time."""
    budget = budget or Budget()
    units = [(m, p, d) for d in (FEATURES[:1] if quick else FEATURES) for p in PHASES for m in MODELS]
    if shutil.which("valgrind") is None:
        return [{"model": m, "phase": p, "features": d, "skipped": "valgrind not installed"} for m, p, d in units]
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for i in range(0, len(units), 2):
            pair = units[i : i + 2]
            if budget.expired():
                rows += [{"model": m, "phase": p, "features": d, **SKIPPED} for m, p, d in pair]
                continue
            rows += list(pool.map(lambda unit: _count(*unit), pair))
    zuko = {(r["phase"], r["features"]): r.get("instructions_per_step") for r in rows if r["model"] == "zuko_realnvp"}
    for r in rows:
        reference = zuko.get((r["phase"], r["features"]))
        if "instructions_per_step" in r and reference:
            r["vs_zuko_realnvp"] = round(r["instructions_per_step"] / reference, 3)
    return rows


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
