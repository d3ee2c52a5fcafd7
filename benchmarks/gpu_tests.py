"""``python -m benchmarks.gpu_tests``: the gpu-marked tests in concurrent pytest processes (``make gpu-check``'s
first step).

On a fresh GPU machine most of the gpu tests' time is cold compilation (Triton kernels, Inductor graphs), which is
CPU work: one pytest process used one of the machine's 16 cores for it, and 33 tests took 59 to over 120 s. Here
the selected tests are dealt, one test function (all its parametrizations) at a time, to ``--shards`` pytest
processes that run at once (each collects all and keeps its share: this module is also their pytest plugin), so
a function's later cases find its kernels compiled. Each process's lines are printed as they come
(``[shard i]``), unbuffered, so a run killed at its time box still shows which tests finished; each shard lists
its slowest tests. Exits 1 if a shard failed or no shard collected a test, 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Sequence

import pytest

from benchmarks.common import dying_with_this_process

__all__ = ["PYTEST_ENV", "deal", "main", "pytest_addoption", "pytest_collection_modifyitems"]

PYTEST_ENV = {"FASTFLOW_TEST_GPU": "1", "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1", "PYTHONUNBUFFERED": "1"}
"""The environment of every pytest process: kernels compiled for the device (no interpreter), TF32 on (cuDNN's
TF32 is PyTorch's default; this turns on cuBLAS's), output unbuffered."""


def deal(node_ids: Sequence[str], shards: int) -> list[list[str]]:
    """``node_ids`` dealt to ``shards`` lists: the cases of one test function (ids equal up to ``[``) stay together,
    functions go in their collected order to the shard with the fewest cases so far. Empty shards are dropped."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    groups: dict[str, list[str]] = {}
    for node_id in node_ids:
        groups.setdefault(node_id.split("[", 1)[0], []).append(node_id)
    dealt: list[list[str]] = [[] for _ in range(shards)]
    for group in groups.values():
        min(dealt, key=len).extend(group)
    return [shard for shard in dealt if shard]


def pytest_addoption(parser: pytest.Parser) -> None:
    """The plugin's options (``-p benchmarks.gpu_tests``): which shard of how many this process runs."""
    parser.addoption("--gpu-shard", type=int, default=0, help="this process's shard (0-based)")
    parser.addoption("--gpu-shards", type=int, default=1, help="how many shards the selected tests are dealt to")


@pytest.hookimpl(trylast=True)  # after ``-m`` has deselected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep this process's shard of the selected tests (:func:`deal`; every shard collects the same order)."""
    shards = config.getoption("--gpu-shards")
    if shards <= 1:
        return
    dealt = deal([item.nodeid for item in items], shards)
    index = config.getoption("--gpu-shard")
    mine = set(dealt[index]) if index < len(dealt) else set()
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in mine])
    items[:] = [item for item in items if item.nodeid in mine]


def _pump(index: int, process: subprocess.Popen[str], lines: queue.Queue[tuple[int, str | None]]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.put((index, line))
    lines.put((index, None))


def main(argv: list[str] | None = None) -> int:
    """Run the shards; returns 1 if a shard failed (or no shard collected a test), else 0."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_tests", description=__doc__)
    parser.add_argument("--shards", type=int, default=4, help="concurrent pytest processes")
    parser.add_argument("--marker", default="gpu", help="pytest -m expression")
    parser.add_argument("paths", nargs="*", default=["tests"])
    args = parser.parse_args(argv)
    print(f"gpu-tests: -m {args.marker!r} in {args.shards} concurrent shards", flush=True)
    lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
    processes = []
    for index in range(args.shards):
        process = subprocess.Popen(
            dying_with_this_process(  # a SIGKILLed gpu-check kills this runner, and the runner its shards
                [
                    *(sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "benchmarks.gpu_tests"),
                    *(f"--gpu-shard={index}", f"--gpu-shards={args.shards}", "--durations=4", "-m", args.marker),
                    *args.paths,
                ]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **PYTEST_ENV},
        )  # same process group: a kill of this runner's group (gpu-check's time box) takes the shards too
        processes.append(process)
        threading.Thread(target=_pump, args=(index, process, lines), daemon=True).start()
    open_shards = len(processes)
    while open_shards:
        index, line = lines.get()
        if line is None:
            open_shards -= 1
            continue
        print(f"[shard {index}] {line}", end="", flush=True)
    codes = [process.wait() for process in processes]
    print(f"gpu-tests: shard exit codes {codes}", flush=True)
    if all(code == 5 for code in codes):  # pytest's "no tests collected", in every shard
        print(f"gpu-tests: no tests collected for -m {args.marker!r}", flush=True)
        return 1
    return 0 if all(code in (0, 5) for code in codes) else 1  # a shard may get no tests


if __name__ == "__main__":
    sys.exit(main())
