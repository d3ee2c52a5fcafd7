"""``python -m benchmarks``: run the suite, print and write the markdown tables, JSON and a PNG plot.

Cases on every device: ``coupling`` (the coupling op), ``spline`` (the rational-quadratic spline transform,
forward + backward, against torch.compile, zuko and nflows; :mod:`benchmarks.bench_spline`),
``actnorm_invconv`` (ActNorm + 1x1 conv), ``flowstep`` (one Glow step), ``train_depth`` (a Glow training step
over depth K, standard vs reversible, time and peak memory), ``train_resolution`` (a Glow training step at
growing resolution for standard, per-step checkpointing, reversible and reversible+tiled), ``census``
(launches and bytes per pixel of one FlowStep and
one training step, eager and compiled, :mod:`benchmarks.census`). CPU only: ``train_step_cpu`` (the
reference step eager, compiled, reversible; :mod:`benchmarks.step_modes`), ``peers_glow`` (the digits demo
against normflows' Glow, :mod:`benchmarks.peers`), ``tabular`` (TabularFlow against zuko's RealNVP and NSF on
vector data, held-out NLL and training-step time, and a conditional flow against one flow per condition;
:mod:`benchmarks.tabular`), ``tabular_instructions`` (CPU instructions per TabularFlow and zuko RealNVP training
step under callgrind, noise-free; :mod:`benchmarks.host_instructions`; only when ``--cases`` names it),
``reversible_instructions`` (the same count for the reference step's structure with tiny tensors, standard against
reversible backprop: the walk's host work; :mod:`benchmarks.reversible_instructions`; only when named),
``jet_memory`` (a Jet training step at 32 and 64 couplings, per-coupling checkpointing vs reversible, peak memory
and time; :mod:`benchmarks.bench_jet`),
``pixel_mix`` (the compiled CPU channel mix as a summed product against ``bmm``, :mod:`benchmarks.bench_pixel_mix`).
CUDA only: ``train_modes``
(the step eager vs compiled vs CUDA graph in bf16, :mod:`benchmarks.step_modes`), ``largest_batch`` (the
largest batch that fits at 256, 512 and 1024 pixels per backprop mode), ``jet_largest_batch`` (the same for a
Jet at 256x256, standard, checkpoint and reversible; :mod:`benchmarks.bench_jet`), ``flowstep_max_autotune``
(``flowstep``'s first size with ``torch.compile(mode="max-autotune")`` too). Each timed case checks the fused
result against eager first and refuses to report a speed for a wrong answer.

Time boxes: ``--budget-s`` (per case) and ``--deadline`` (a UNIX time for the whole run) make each case stop
starting new work once its box is over: what it measured is kept, what it did not start is recorded as
``skipped: time``, and a case with no time left at all is not started (its earlier rows in the results file,
if any, are kept). Results are written after every case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch

from benchmarks import (
    bench_actnorm_invconv,
    bench_coupling,
    bench_flowstep,
    bench_jet,
    bench_pixel_mix,
    bench_spline,
    census,
    host_instructions,
    peers,
    reversible_instructions,
    step_modes,
    tabular,
    train_step,
)
from benchmarks.common import (
    SKIPPED,
    Budget,
    copy_bandwidth_gbs,
    device_slug,
    environment,
    markdown_table,
    write_results,
)
from benchmarks.plot import plot_results

CASES = (
    "coupling",
    "spline",
    "actnorm_invconv",
    "flowstep",
    "train_depth",
    "train_resolution",
    "census",
    "train_step_cpu",
    "peers_glow",
    "tabular",
    "tabular_instructions",
    "reversible_instructions",
    "jet_memory",
    "pixel_mix",
    "train_modes",
    "largest_batch",
    "jet_largest_batch",
    "flowstep_max_autotune",
)
CPU_ONLY = (
    "train_step_cpu",
    "peers_glow",
    "tabular",
    "tabular_instructions",
    "reversible_instructions",
    "jet_memory",
    "pixel_mix",
)
RESOLUTION_CASES = ("train_resolution", "largest_batch", "train_modes")
"""The cases ``--resolutions`` restricts (the rows of other resolutions already in the results file are kept)."""
CUDA_ONLY = ("train_modes", "largest_batch", "jet_largest_batch", "flowstep_max_autotune")
NAMED_ONLY = ("tabular_instructions", "reversible_instructions")
"""Cases a run takes only when ``--cases`` names them: 5 to 20 minutes under valgrind."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_cases(device_type: str) -> tuple[str, ...]:
    """Every case that runs on ``device_type`` (``"cpu"`` or ``"cuda"``)."""
    other = CUDA_ONLY if device_type == "cpu" else CPU_ONLY
    return tuple(c for c in CASES if c not in other)


def default_cases(device_type: str) -> tuple[str, ...]:
    """The cases a run without ``--cases`` takes on ``device_type``: those of the device but :data:`NAMED_ONLY`."""
    return tuple(c for c in device_cases(device_type) if c not in NAMED_ONLY)


def _run_case(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    quick: bool,
    channels: tuple[int, ...] | None,
    resolutions: tuple[int, ...] | None,
    budget: Budget,
) -> list[dict[str, Any]]:
    if name == "coupling":
        kwargs = {} if not quick else {"sizes": bench_coupling.GLOW_SIZES[:2]}
        return bench_coupling.run(device, dtype, quick=quick, budget=budget, **kwargs)
    if name == "spline":
        return bench_spline.run(device, dtype, quick=quick, budget=budget)
    if name == "actnorm_invconv":
        return bench_actnorm_invconv.run(device, dtype, quick, channels, budget)
    if name in ("flowstep", "flowstep_max_autotune"):
        return bench_flowstep.run(device, dtype, quick, max_autotune=name == "flowstep_max_autotune", budget=budget)
    if name == "train_depth":
        return train_step.depth_sweep(device, quick, budget)
    if name == "census":
        return census.census_rows(device, budget=budget)
    if name == "train_step_cpu":
        return step_modes.cpu_reference_rows(quick, budget)
    if name == "peers_glow":
        return peers.peers_rows(quick, budget)
    if name == "tabular":
        return tabular.tabular_rows(quick, budget)
    if name == "tabular_instructions":
        return host_instructions.instruction_rows(quick, budget)
    if name == "reversible_instructions":
        return reversible_instructions.instruction_rows(budget)
    if name == "jet_memory":
        return bench_jet.jet_memory_rows(device, quick, budget)
    if name == "pixel_mix":
        return bench_pixel_mix.pixel_mix_rows(quick, budget)
    if name == "train_modes":
        return step_modes.gpu_mode_rows(budget, resolutions)
    if name == "largest_batch":
        return train_step.largest_batch_rows(device, resolutions, budget)
    if name == "jet_largest_batch":
        return bench_jet.jet_largest_batch_rows(device, budget)
    return train_step.resolution_sweep(device, quick, resolutions, budget)


_NOT_IDENTITY = {"skipped", "run", "error"}
"""Row keys that do not say which unit a row measures (a skipped row carries the unit's keys and these)."""


def _skipped_for_time(row: dict[str, Any]) -> bool:
    return str(row.get("skipped", "")).startswith("time")


def _earlier_measured(row: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The one measured row of ``earlier`` for the unit of ``row`` (same values for every key of ``row`` that says
    which unit it is); None when there is none, or several."""
    identity = {k: v for k, v in row.items() if k not in _NOT_IDENTITY}
    if not identity:
        return None
    matches = [
        r for r in earlier if "skipped" not in r and all(k in r and r[k] == v for k, v in identity.items())
    ]  # fmt: skip
    return matches[0] if len(matches) == 1 else None


def _merged(
    case: str,
    rows: list[dict[str, Any]],
    earlier: list[dict[str, Any]],
    channels: tuple[int, ...] | None,
    resolutions: tuple[int, ...] | None,
) -> list[dict[str, Any]]:
    """``rows`` of a run of ``case``, merged with the ``earlier`` rows of the results file:

    - restricted by ``--channels`` or ``--resolutions``, the earlier rows of the channels or resolutions the run
      did not measure stay (so a grid can be run in parts);
    - a row the run skipped for time (``skipped: time``) gives way to the earlier measured row of the same unit,
      which keeps its own ``run`` stamp; a case skipped whole keeps all its earlier rows.

    A time-boxed run thus never replaces a measurement with a skip."""
    if rows and all(_skipped_for_time(r) and not set(r) - _NOT_IDENTITY for r in rows) and earlier:
        return earlier
    if case == "actnorm_invconv" and channels:
        kept = [r for r in earlier if r.get("channels") not in channels]
        rows = sorted(kept + rows, key=lambda r: (r.get("channels", 0), r.get("height", 0)))  # stable: mode, variant
    elif case in RESOLUTION_CASES and resolutions:
        kept = [r for r in earlier if r.get("resolution") not in resolutions]
        rows = sorted(kept + rows, key=lambda r: r.get("resolution", 0))  # stable: mode
    return [(_skipped_for_time(r) and _earlier_measured(r, earlier)) or r for r in rows]


def _stamped(rows: list[dict[str, Any]], env: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """``rows`` with the ``run`` they come from: the date, and ``quick`` for a ``--quick`` run (a results file
    merges rows of several runs)."""
    run = env["date"] + (" quick" if quick else "")
    return [{**row, "run": run} for row in rows]


def _table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(rows, list(dict.fromkeys(k for row in rows for k in row if k != "device")))


def _threshold_note(rows: list[dict[str, Any]]) -> str:
    """The channel-mix kernel threshold these results support, as a line under the case's table."""
    threshold = bench_actnorm_invconv.kernel_max_channels(rows)
    if threshold is None:
        return "\nNo fused (Triton) timings here: these rows say nothing of KERNEL_MAX_CHANNELS.\n"
    timed = sorted({r["channels"] for r in rows})
    missing = sorted(set(bench_actnorm_invconv.CHANNELS) - set(timed))
    return (
        f"\nKERNEL_MAX_CHANNELS supported by these rows: {threshold} (largest C where fused beats eager at every "
        f"size, forward and forward+backward, and at every smaller C timed; C timed: {timed}"
        + (f"; not timed: {missing}" if missing else "")
        + ").\n"
    )


def _earlier_results(path: str, device: str) -> dict[str, list[dict[str, Any]]]:
    """Cases already in this device's results file: a run of some ``--cases`` adds to them (so the suite
    can be run case by case within a time limit) instead of dropping the others."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            earlier = json.load(f)
    except (OSError, ValueError) as err:  # e.g. cut short by a kill in an older version's in-place write
        aside = f"{path}.unreadable"
        os.replace(path, aside)
        print(f"warning: {path} could not be read ({err}); moved to {aside}, starting a new file", flush=True)
        return {}
    if earlier.get("environment", {}).get("device") != device:
        return {}
    # rows written before rows carried their run: marked, so a table never passes them off as this run's
    return {
        case: [{**row, "run": row.get("run", "unstamped")} for row in rows] for case, rows in earlier["results"].items()
    }


def _write(results: dict[str, list[dict[str, Any]]], env: dict[str, Any], out: str, slug: str) -> list[str]:
    """Write ``<slug>.json``, ``.md`` and ``.png`` under ``out`` from every case in ``results``; ``env`` is the
    latest run's (the rows say their own run)."""
    tables = {case: _table(rows) for case, rows in results.items()}
    if "actnorm_invconv" in results:
        tables["actnorm_invconv"] += _threshold_note(results["actnorm_invconv"])
    payload = {"environment": env, "results": results}  # each row's "run" says its date and whether it was quick
    json_path, md_path = write_results(payload, tables, out, slug)
    png_path = plot_results(results, f"{out}/{slug}.png", env["device"])
    return [json_path, md_path] + ([png_path] if png_path else [])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--cases", default=None, help=f"comma-separated subset of {CASES} (default: every case the device runs)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument(
        "--channels",
        type=lambda v: tuple(int(c) for c in v.split(",")),
        help="actnorm_invconv only: these C (comma-separated) instead of the default grid; rows of other C "
        "already in the results file are kept, so the grid can be run in parts within a time limit",
    )
    parser.add_argument(
        "--resolutions",
        type=lambda v: tuple(int(r) for r in v.split(",")),
        help=f"{', '.join(RESOLUTION_CASES)} only: these resolutions (comma-separated); rows of others "
        "already in the results file are kept, so the sweep can be run in parts within a time limit",
    )
    parser.add_argument("--budget-s", type=float, default=None, help="time box of each case, in seconds")
    parser.add_argument(
        "--deadline", type=float, default=None, help="UNIX time by which every case must have stopped (time box)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for <device>.json/.md/.png (default: benchmarks/results; with --quick benchmarks/results/quick, "
        "so quick rows never replace a full run's committed ones)",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = "benchmarks/results/quick" if args.quick else "benchmarks/results"

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s >= 0):
        parser.error(f"--budget-s must be a finite number >= 0, got {args.budget_s}")
    if args.cases is None:
        cases = default_cases(device.type)
    else:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        if not cases:
            parser.error(f"--cases names no case; choose from {CASES}")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {CASES}")
    wrong_device = sorted(set(cases) - set(device_cases(device.type)))
    if wrong_device:
        parser.error(f"cases {wrong_device} do not run on {device.type}")
    if args.channels and "actnorm_invconv" not in cases:
        parser.error("--channels applies to the actnorm_invconv case only; add it to --cases")
    if args.channels and not all(0 < c <= max(bench_actnorm_invconv.CHANNELS) for c in args.channels):
        parser.error(
            f"--channels must lie in 1..{max(bench_actnorm_invconv.CHANNELS)}: wider channel mixes are not "
            "checked for register spills and always run on cuDNN"
        )
    if args.resolutions and not set(RESOLUTION_CASES) & set(cases):
        parser.error(f"--resolutions applies to the {', '.join(RESOLUTION_CASES)} cases only; add one to --cases")
    env = environment(device)
    env["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device)
    print(
        f"fastflow benchmarks on {env['device']} | copy bandwidth {env['copy_bandwidth_gbs']:.0f} GB/s",
        flush=True,
    )
    slug = device_slug(env) + ("" if args.dtype == "float32" else f"-{args.dtype}")
    results = _earlier_results(os.path.join(args.out, f"{slug}.json"), env["device"])
    paths: list[str] = []
    for case in cases:
        start = time.perf_counter()
        budget = Budget.of(args.budget_s, args.deadline)
        if budget.expired():
            results.setdefault(case, [dict(SKIPPED)])  # earlier rows of the case, if any, stay
            print(f"\n## {case}: skipped, no time left", flush=True)
        else:
            rows = _run_case(case, device, DTYPES[args.dtype], args.quick, args.channels, args.resolutions, budget)
            rows = _stamped(rows, env, args.quick)
            results[case] = _merged(case, rows, results.get(case, []), args.channels, args.resolutions)
            print(f"\n## {case} ({time.perf_counter() - start:.0f} s)\n\n{_table(results[case])}", flush=True)
        # Written after every case: a time limit loses only the case in hand.
        paths = _write(results, env, args.out, slug)
    if "actnorm_invconv" in results:
        print(_threshold_note(results["actnorm_invconv"]))
    if paths:
        print("\nwrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
