"""Shared benchmark plumbing: median timing, the device's copy bandwidth, environment facts, result files."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "BoxedProcess",
    "Budget",
    "dying_with_this_process",
    "SKIPPED",
    "largest_fitting_batch",
    "step_fits",
    "out_of_memory",
    "median_ms",
    "interleaved_medians_ms",
    "peak_mib",
    "copy_bandwidth_gbs",
    "environment",
    "device_slug",
    "markdown_table",
    "write_results",
    "frozen_adam",
    "check_close",
    "dynamo_counts",
    "MismatchError",
]


SKIPPED = {"skipped": "time"}
"""The mark of a row whose measurement was not started because its case's time box ran out."""


class Budget:
    """A case's time box: :meth:`expired` once the wall clock (``time.time()``) passes ``until`` (None: never).

    Cases check it between units of work (a size, a mode, a configuration) and record the units they did not
    start as :data:`SKIPPED` rows, so a run that must finish by a deadline keeps what it measured.
    """

    def __init__(self, until: float | None = None) -> None:
        self.until = until

    @classmethod
    def of(cls, seconds: float | None = None, deadline: float | None = None) -> Budget:
        """The box ending ``seconds`` from now or at the UNIX time ``deadline``, whichever is first."""
        ends = [t for t in (deadline, None if seconds is None else time.time() + seconds) if t is not None]
        return cls(min(ends) if ends else None)

    def remaining(self) -> float:
        """Seconds left (``inf`` without a limit; negative once expired)."""
        return float("inf") if self.until is None else self.until - time.time()

    def expired(self) -> bool:
        """Whether the time is up."""
        return self.remaining() <= 0


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says CUDA ran out of memory: ``torch.cuda.OutOfMemoryError``, or a library's own
    allocation failure surfacing as a ``RuntimeError`` (cuBLAS ``CUBLAS_STATUS_ALLOC_FAILED``, cuDNN, an
    attention kernel's workspace)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def step_fits(step: Callable[[], Any], model: nn.Module) -> bool:
    """Whether ``step()`` (one training step of ``model``) runs within CUDA memory: False on an out-of-memory
    error (:func:`out_of_memory`), other errors raised. ``model``'s gradients are zeroed in place and the cache
    emptied after, so the next try starts from the same memory."""
    try:
        step()
        torch.cuda.synchronize()
        return True
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one
        if not out_of_memory(error):
            raise
        return False
    finally:
        model.zero_grad(set_to_none=False)
        torch.cuda.empty_cache()


def frozen_adam(model: nn.Module) -> torch.optim.Optimizer:
    """The fused Adam of ``fastflow train`` at learning rate 0, its moments allocated: a largest-batch search
    holds what training holds (weights, gradients, two moments per weight) and runs the update, weights kept."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, fused=True)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates the moments
    return optimizer


def largest_fitting_batch(fits: Callable[[int], bool], cap: int, budget: Budget) -> dict[str, Any]:
    """A largest-batch row's fields: ``largest_batch``, the largest power-of-two batch up to ``cap`` for which
    ``fits(batch)`` (0 when batch 1 does not fit), trying 1, 2, 4, ... until one does not fit; ``capped`` (it
    reached ``cap``); ``search``, ``"done"`` or ``"stopped: time"`` when ``budget`` expired first (what was found
    so far is kept); ``search_s``, the seconds the search took."""
    start = time.perf_counter()
    best, batch, search = 0, 1, "done"
    while batch <= cap:
        if budget.expired():
            search = "stopped: time"
            break
        if not fits(batch):
            break
        best, batch = batch, batch * 2
    return {
        "largest_batch": best,
        "capped": best == cap,
        "search": search,
        "search_s": round(time.perf_counter() - start, 1),
    }


_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(137)  # the parent died before prctl\n"
    "signal.signal(signal.SIGPIPE, signal.SIG_DFL); signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def dying_with_this_process(cmd: Sequence[str]) -> list[str]:
    """``cmd`` prefixed so that it gets SIGKILL when this process, which starts it, dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``, kept across ``exec``; SIGPIPE and SIGXFSZ, which the prefix's Python ignores,
    reset first); elsewhere ``cmd`` as is. A child in a process group of its own outlives a parent killed by
    SIGKILL otherwise (a ``timeout -s KILL`` around ``make gpu-check``) and goes on using the GPU."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]


class BoxedProcess:
    """A child process whose output (stdout and stderr merged) is read line by line within a time limit:
    :meth:`lines` kills it when the time is up, so a step that hangs or compiles for too long costs no more than
    its box. With ``own_group`` the child leads a process group of its own and the kill takes the whole group
    (the child's children too); without, it stays in ours, so that whoever kills our group kills it too."""

    def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None, own_group: bool = True) -> None:
        self.process = subprocess.Popen(
            dying_with_this_process(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=own_group,
        )
        self.own_group = own_group
        self.killed = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def lines(self, until: float | None = None) -> Iterator[str]:
        """The child's output lines as they come, until it closes its output (then it is waited for) or the
        UNIX time ``until`` passes (then it is killed and :attr:`killed` set)."""
        while True:
            try:
                if until is not None and time.time() >= until:
                    raise queue.Empty  # checked on every line: a child that never stops printing is killed too
                line = self._lines.get(timeout=None if until is None else max(until - time.time(), 0.01))
            except queue.Empty:
                self.kill()
                break
            if line is None:
                break
            yield line
        self.process.wait()

    def kill(self) -> None:
        """Kill the child (and its group where it leads one: children it left behind too); :attr:`killed` says
        whether it was still running."""
        self.killed = self.process.poll() is None
        with contextlib.suppress(ProcessLookupError):
            if self.own_group:
                os.killpg(self.process.pid, signal.SIGKILL)
            elif self.killed:
                self.process.kill()


class MismatchError(AssertionError):
    """A fused result differs from eager on the benchmark's own inputs: no speed is reported for it."""


def check_close(name: str, fused: torch.Tensor, eager: torch.Tensor, atol: float, rtol: float) -> None:
    """Raise :class:`MismatchError` unless ``fused`` matches ``eager`` within tolerance."""
    try:
        torch.testing.assert_close(fused.float(), eager.float(), atol=atol, rtol=rtol)
    except AssertionError as err:
        raise MismatchError(f"{name}: fused result differs from eager, refusing to time it\n{err}") from err


def dynamo_counts() -> tuple[int, int]:
    """``(graphs compiled, graph breaks)`` by Dynamo in this process so far: the difference across a
    compilation says how many graphs it made and how often it broke."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


DO_BENCH_REP_MS = 100
"""``triton.testing.do_bench``'s ``rep``: the milliseconds of calls it times (at least one call)."""


CUDA_SAMPLES = 20
"""Calls per provider of a side-by-side comparison on CUDA: the do_bench cut-off (all fit in
:data:`DO_BENCH_REP_MS`) and the number of event-timed rounds otherwise, whatever a case's CPU ``rounds``."""


def _do_bench_ms(fn: Callable[[], Any]) -> float:
    """``triton.testing.do_bench``'s median of ``fn`` over :data:`DO_BENCH_REP_MS` (L2 flushed before each call)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=DO_BENCH_REP_MS, return_mode="median"))


def _cuda_event_ms(fn: Callable[[], Any]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def median_ms(fn: Callable[[], Any], device: torch.device, reps: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds over warm runs. On CUDA (CUDA events):
    ``triton.testing.do_bench`` where ``reps`` calls fit its :data:`DO_BENCH_REP_MS`, else (a whole training
    step: do_bench would time a single call) ``reps`` calls timed one by one after ``warmup`` warm ones. On
    the CPU, ``time.perf_counter`` around each of ``reps`` calls after ``warmup``."""
    if device.type == "cuda":
        fn()  # warm, so that the estimate below is of a warm call
        if _cuda_event_ms(fn) * reps <= DO_BENCH_REP_MS:
            return _do_bench_ms(fn)
        for _ in range(warmup - 2):
            fn()
        return statistics.median(_cuda_event_ms(fn) for _ in range(reps))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def interleaved_medians_ms(
    fns: dict[str, Callable[[], Any]], device: torch.device, rounds: int = 20, calls: int = 3
) -> dict[str, float]:
    """Median wall time in milliseconds of each of ``fns``, measured side by side: on the CPU ``rounds`` rounds
    in which every function in turn makes one untimed call (its caches and allocations warm again after the
    others ran) and ``calls`` timed ones (``time.perf_counter``), so that a slow spell of a shared machine lands
    on all of them rather than on whichever ran then. On CUDA (``rounds`` and ``calls`` are the CPU's) one method
    for all, chosen from the slowest warm call: ``triton.testing.do_bench`` of each where
    :data:`CUDA_SAMPLES` calls of every one fit its :data:`DO_BENCH_REP_MS`, else :data:`CUDA_SAMPLES` rounds of
    one CUDA-event-timed call each, in turn (a comparison no longer mixes do_bench's cold-L2 repetitions for the
    fast providers with warm single calls for the slow)."""
    if device.type == "cuda":
        estimates = {}
        for name, fn in fns.items():
            fn()  # warm
            estimates[name] = _cuda_event_ms(fn)
        if max(estimates.values(), default=0.0) * CUDA_SAMPLES <= DO_BENCH_REP_MS:
            return {name: _do_bench_ms(fn) for name, fn in fns.items()}
        events: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(CUDA_SAMPLES):
            for name, fn in fns.items():
                events[name].append(_cuda_event_ms(fn))
        return {name: statistics.median(t) for name, t in events.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Memory one call of ``fn`` adds at its peak, in MiB (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 << 20, reps: int = 10) -> float:
    """Measured device-memory copy bandwidth in GB/s (read + write) of a ``nbytes`` buffer copy: the ceiling
    memory-bound kernels are compared against."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=reps)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def environment(device: torch.device) -> dict[str, Any]:
    """Device name, library versions and date for a results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    )
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "threads": torch.get_num_threads(),
    }


def device_slug(env: dict[str, Any]) -> str:
    """A file-name-safe name for the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu``."""
    name = env["device"].lower()
    if name.startswith("cpu"):
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(payload: dict[str, Any], tables: dict[str, str], out_dir: str, slug: str) -> tuple[str, str]:
    """Write ``<out_dir>/<slug>.json`` and ``<out_dir>/<slug>.md``, each whole or not at all (written beside and
    renamed: a kill mid-write leaves the previous file); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"{slug}.json")
    md_path = os.path.join(out_dir, f"{slug}.md")
    env = payload["environment"]
    header = (
        f"# fastflow benchmarks on {env['device']} (latest run {env['date']}, torch {env['torch']}, "
        f"triton {env['triton']}; each row's `run` gives its date, and `quick` for a --quick run)\n"
    )
    markdown = header + "".join(f"\n## {title}\n\n{table}\n" for title, table in tables.items())
    _replace_file(json_path, json.dumps(payload, indent=2, default=str))
    _replace_file(md_path, markdown)
    return json_path, md_path


def _replace_file(path: str, text: str) -> None:
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)
