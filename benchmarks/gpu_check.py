"""``make gpu-check`` (``python -m benchmarks.gpu_check``): issue 13's GPU check in one command, within a deadline.

Steps, in this order, each a child process with a time box (``reserve_s``: the seconds kept for it; a step may
use whatever earlier steps left, but never the time reserved for the steps after it):

1. ``gpu-tests``: the gpu-marked tests (``pytest -m gpu``) with TF32 on, in four concurrent pytest processes
   (:mod:`benchmarks.gpu_tests`: their time is mostly cold compilation, CPU work);
2. ``coupling`` and 3. ``flowstep``: the fused kernels against eager and ``torch.compile``;
4. ``spline``: the rational-quadratic spline, fused against eager, ``torch.compile``, zuko and nflows
   (issue 15's target size first);
5. ``train_modes``: the training step eager vs compiled vs CUDA graph, bf16, at 32x32 (L=3, K=32, hidden 512,
   batch 64) and 256x256 (L=6, K=32, hidden 512, batch 4);
6. ``largest_batch``: the largest batch that fits at 256, 512 and 1024 pixels for standard, checkpoint,
   reversible and tiled backprop;
7. ``jet_largest_batch``: the largest batch that fits for a Jet at 256x256 (standard, checkpoint, reversible),
   issue 16's GPU figure, only with the time left (no reserve: the six steps above fill the budget; when it is
   skipped, ``make gpu-bench BENCH_ARGS="--cases jet_largest_batch"`` is the second call of the split);
8. ``flowstep_max_autotune``: only with the time left (``torch.compile`` max-autotune takes minutes).

A benchmark step gets ``--deadline`` (its box less :data:`SOFT_MARGIN_S`): it stops starting work and writes
what it measured, marking the rest ``skipped: time``; at the end of its box it is killed (with its children).
Results go to ``benchmarks/results/<device>.*`` as each case finishes (``python -m benchmarks`` writes them);
with ``--out`` (default ``$OUT`` when set) the check keeps one file there, ``<out>/gpu-check.tar.gz``, rewritten
(atomically) after every step and when the check is stopped (SIGTERM, SIGINT): each step's log
(``gpu-check/<n>-<step>.log``), ``gpu-check/summary.md`` (each step's status and seconds) and copies of the
result files written since the start (``gpu-check/results/``). One file, because the GPU machine returns only a
few files from ``$OUT``. A benchmark step killed at its time box keeps the rows its case had written and does not
fail the check; the gpu tests killed at theirs do (exit status 1: a step failed).

Budget (``--total-s``, default 460 s, so that with ``make gpu-install`` the whole check stays under 8 minutes
on a fresh H100): the reserves in :data:`PLAN`, from the last GPU timings (the gpu tests, in one process, 99 s
on an H200 on 2026-11-26 and killed at their 120 s box on an H100 on 2026-11-27 with no line written: pytest's
output was block-buffered into the pipe, so every step's child now runs unbuffered; coupling 33 s and flowstep's default
compile about 40 s on the H100; the step eager and CUDA graph at both sizes about 40 s on the H200) and
estimates for the rest (``torch.compile`` of the whole step: one to three minutes per size, so the 256x256
compile is the row most likely to be cut); each benchmark step also pays ~5 s to start (import, CUDA context,
a copy-bandwidth measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from benchmarks.common import BoxedProcess
from fastflow.atomic_file import atomic_file

__all__ = ["ARCHIVE", "PLAN", "SOFT_MARGIN_S", "Step", "deadlines", "main"]

ARCHIVE = "gpu-check.tar.gz"
"""The one file the check keeps in ``--out``."""

SOFT_MARGIN_S = 15.0
"""Seconds between a benchmark step's soft deadline (stop starting work) and its kill."""


@dataclass(frozen=True)
class Step:
    """One step of the check: ``python <argv>``; ``reserve_s`` seconds are kept for it; ``min_s``: it is not
    started with less time than that left; ``env``: extra environment variables."""

    name: str
    argv: tuple[str, ...]
    reserve_s: float
    min_s: float = 10.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def is_benchmark(self) -> bool:
        """Whether the step is a ``python -m benchmarks`` run (which takes a soft ``--deadline``)."""
        return self.argv[:2] == ("-m", "benchmarks")


def _bench(case: str, reserve_s: float, min_s: float = 20.0) -> Step:
    return Step(case, ("-m", "benchmarks", "--device", "cuda", "--cases", case), reserve_s, min_s)


PLAN = (
    Step("gpu-tests", ("-m", "benchmarks.gpu_tests", "--shards", "4"), 100),
    _bench("coupling", 40),
    _bench("flowstep", 55),
    _bench("spline", 50, min_s=30),
    _bench("train_modes", 130, min_s=60),
    _bench("largest_batch", 65, min_s=30),
    _bench("jet_largest_batch", 0, min_s=30),
    _bench("flowstep_max_autotune", 0, min_s=90),
)
"""The steps of ``make gpu-check``, in order; the reserves add up to 440 s of the default 460."""


def deadlines(plan: Sequence[Step], start: float, total_s: float) -> list[float]:
    """The latest end of each step: the total deadline less the reserves of the steps after it."""
    ends = []
    for i in range(len(plan)):
        ends.append(start + total_s - sum(step.reserve_s for step in plan[i + 1 :]))
    return ends


_RUNNING: list[BoxedProcess] = []
"""The step running now: each runs in a process group of its own, which a signal to ours does not reach."""


def _stop_running(signum: int, frame: object) -> None:
    """On SIGTERM or SIGINT (a ``timeout`` around ``make gpu-check``, Ctrl-C): kill the running step's group too,
    so that nothing keeps the GPU or writes results after the check is gone."""
    for child in _RUNNING:
        child.kill()
    raise SystemExit(128 + signum)


def _run(step: Step, until: float, log_path: str | None) -> str:
    """Run ``step`` until it ends or ``until`` (UNIX time) passes; returns its status. Output goes to this
    process's stdout and to ``log_path``."""
    cmd = [sys.executable, *step.argv]
    if step.is_benchmark:
        cmd += ["--deadline", f"{until - SOFT_MARGIN_S:.0f}"]
    with open(log_path, "w") if log_path else contextlib.nullcontext() as log:
        child = BoxedProcess(cmd, {"PYTHONUNBUFFERED": "1", **step.env})  # a killed step's log keeps its lines
        _RUNNING.append(child)
        try:
            for line in child.lines(until):
                if log:  # the log first: a signal between the two writes leaves the line in the archive
                    log.write(line)
                    log.flush()
                print(line, end="", flush=True)
        finally:
            _RUNNING.remove(child)
    if child.killed:
        return "killed at its time box"
    return "ok" if child.process.returncode == 0 else f"failed (exit {child.process.returncode})"


def _copy_results(results_dir: str, out: str, since: float) -> None:
    """Copy the result files written since ``since`` to ``out/results``."""
    if not os.path.isdir(results_dir):
        return
    target = os.path.join(out, "results")
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(results_dir):
        path = os.path.join(results_dir, name)
        if os.path.isfile(path) and os.path.getmtime(path) >= since:
            shutil.copy2(path, target)


def _archive(work: str, out: str, summary: list[str], start: float) -> None:
    """Write ``summary`` into ``work``, copy the results written since ``start`` there, and pack ``work`` into
    ``out/gpu-check.tar.gz`` (atomically: an interrupted write leaves the previous archive)."""
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write("\n".join(summary) + "\n")
    _copy_results("benchmarks/results", work, start)
    with atomic_file(os.path.join(out, ARCHIVE)) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname="gpu-check")


def main(argv: list[str] | None = None) -> int:
    """Run :data:`PLAN` (or ``--steps``) within ``--total-s``; returns 1 if a step failed, else 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    parser.add_argument("--total-s", type=float, default=460.0, help="seconds for the whole check")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for logs and result copies")
    parser.add_argument("--steps", default=None, help="comma-separated subset of the plan's step names")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its deadlines only")
    args = parser.parse_args(argv)

    plan = list(PLAN)
    if args.steps:
        names = [n.strip() for n in args.steps.split(",")]
        unknown = sorted(set(names) - {s.name for s in PLAN})
        if unknown:
            parser.error(f"unknown steps {unknown}; choose from {[s.name for s in PLAN]}")
        plan = [s for s in PLAN if s.name in names]
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_running)
    start = time.time()
    ends = deadlines(plan, start, args.total_s)
    work = tempfile.mkdtemp(prefix="gpu-check-") if args.out and not args.dry_run else None
    summary = ["| step | status | seconds | box ends at (s) |", "|---|---|---|---|"]
    failed = False
    try:
        for n, (step, until) in enumerate(zip(plan, ends), start=1):
            left = until - time.time()
            print(f"\n=== gpu-check {n}/{len(plan)}: {step.name} (up to {left:.0f} s) ===", flush=True)
            if args.dry_run:
                summary.append(f"| {step.name} | planned | | {until - start:.0f} |")
                continue
            step_start = time.time()
            if left < step.min_s:
                status = f"skipped: time ({left:.0f} s left, needs {step.min_s:.0f})"
            else:
                try:
                    status = _run(step, until, os.path.join(work, f"{n}-{step.name}.log") if work else None)
                except SystemExit:  # SIGTERM or SIGINT: the step is killed; the archive below says so
                    summary.append(f"| {step.name} | stopped by a signal | {time.time() - step_start:.0f} | |")
                    raise
            # a benchmark step killed at its box keeps the rows it wrote; the tests must finish
            failed |= status.startswith("failed") or (status.startswith("killed") and not step.is_benchmark)
            seconds = time.time() - step_start
            summary.append(f"| {step.name} | {status} | {seconds:.0f} | {until - start:.0f} |")
            print(f"=== {step.name}: {status}, {seconds:.0f} s ===", flush=True)
            if work:
                _archive(work, args.out, summary, start)
    finally:
        if work:
            for signum in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the last archive short
                signal.signal(signum, signal.SIG_IGN)
            try:
                _archive(work, args.out, summary, start)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print(f"\ngpu-check: {time.time() - start:.0f} s of {args.total_s:.0f}\n" + "\n".join(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
