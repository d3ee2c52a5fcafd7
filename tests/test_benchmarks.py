"""Tests for benchmarks/: the channel-mix threshold read off results, quick CPU runs of some cases, the census,
time boxes (per case, per run and per gpu-check step), the case registry and the merging of result files."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from benchmarks import bench_actnorm_invconv, train_step
from benchmarks.__main__ import main
from benchmarks.common import Budget, environment


def _rows(speedups: dict[int, list[float | None]], backend: str = "triton") -> list[dict]:
    """Fused and eager rows per channel count, one fused row per given speed-up."""
    rows = []
    for channels, values in speedups.items():
        for speedup in values:
            rows.append({"channels": channels, "variant": "eager", "fused_backend": backend, "speedup_vs_eager": 1.0})
            rows.append(
                {"channels": channels, "variant": "fused", "fused_backend": backend, "speedup_vs_eager": speedup}
            )
    return rows


def test_kernel_max_channels_is_the_last_c_of_the_winning_prefix():
    rows = _rows({6: [2.0, 1.5], 12: [3.0, 1.1], 24: [2.0, 2.0], 48: [1.2, 0.9], 96: [2.0, 2.0]})
    assert bench_actnorm_invconv.kernel_max_channels(rows) == 24  # one loss at 48; 96 beyond it does not count


def test_kernel_max_channels_edge_cases():
    assert bench_actnorm_invconv.kernel_max_channels(_rows({6: [2.0], 128: [1.01]})) == 128
    assert bench_actnorm_invconv.kernel_max_channels(_rows({6: [0.8], 12: [3.0]})) == 0
    assert bench_actnorm_invconv.kernel_max_channels(_rows({6: [2.0], 12: [None]})) == 6  # a failed timing loses
    assert bench_actnorm_invconv.kernel_max_channels(_rows({6: [2.0]}, backend="eager")) is None
    assert bench_actnorm_invconv.kernel_max_channels([]) is None


def test_cpu_run_of_some_channels_keeps_the_other_channels_rows(tmp_path):
    env = environment(torch.device("cpu"))
    earlier_row = {"channels": 12, "height": 32, "variant": "eager", "fused_backend": "eager", "median_ms": 1.0}
    (tmp_path / "cpu.json").write_text(json.dumps({"environment": env, "results": {"actnorm_invconv": [earlier_row]}}))

    assert (
        main(["--device", "cpu", "--quick", "--cases", "actnorm_invconv", "--channels", "6", "--out", str(tmp_path)])
        == 0
    )

    rows = json.loads((tmp_path / "cpu.json").read_text())["results"]["actnorm_invconv"]
    assert rows[-1] == {**earlier_row, "run": "unstamped"}  # kept (marked as of an unstamped run), sorted last
    new = [r for r in rows if r["channels"] == 6]
    assert {(r["height"], r["mode"], r["variant"]) for r in new} == {
        (h, m, v) for h in (32, 128) for m in ("forward", "forward+backward") for v in ("eager", "fused", "compiled")
    }
    assert all(r["median_ms"] > 0 for r in new if r["error"] is None)
    assert "say nothing of KERNEL_MAX_CHANNELS" in (tmp_path / "cpu.md").read_text()


def test_a_quick_run_writes_beside_the_committed_results_not_over_them(tmp_path, monkeypatch):
    """``python -m benchmarks --quick`` (the README's commands) replaced the full run's rows in
    ``benchmarks/results``; only ``make bench`` passed ``--out benchmarks/results/quick``."""
    monkeypatch.chdir(tmp_path)
    assert main(["--device", "cpu", "--quick", "--cases", "actnorm_invconv", "--channels", "6"]) == 0
    assert (tmp_path / "benchmarks/results/quick/cpu.json").is_file()
    assert not (tmp_path / "benchmarks/results/cpu.json").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--cases", "coupling", "--channels", "12"], "applies to the actnorm_invconv case only"),
        (["--cases", "actnorm_invconv", "--channels", "12,256"], "must lie in 1..128"),
    ],
)
def test_bad_channels_argument(argv, match, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", *argv])
    assert match in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--device", "cpu", "--cases", ""], "--cases names no case"),
        (["--device", "cpu", "--cases", ","], "--cases names no case"),
        (["--device", "foo"], "--device 'foo' is not a torch device"),
        (["--device", "cpu", "--cases", "spline", "--budget-s", "-5"], "--budget-s must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_usage_errors(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_device_cuda_without_cuda_is_a_usage_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--cases", "coupling", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "no CUDA device is available" in capsys.readouterr().err


def test_threshold_note_names_the_channels_timed():
    from benchmarks.__main__ import _threshold_note

    note = _threshold_note(_rows({48: [2.0], 96: [1.5]}))
    assert (
        "supported by these rows: 96" in note and "C timed: [48, 96]" in note and "not timed: [6, 12, 24, 128]" in note
    )


def test_census_counts_launches_and_bytes_per_pixel():
    """The census of issue 13: reversible backprop launches more in backward (it recomputes each layer) and at
    least as much in forward (its forward does each step's C x C work per step, not batched per level yet);
    every row counts something."""
    from benchmarks.census import census_rows

    rows = {(r["case"], r["mode"]): r for r in census_rows(torch.device("cpu"), modes=("eager", "reversible"))}
    assert len(rows) == 4
    for (case, _), row in rows.items():
        assert row["forward_launches"] > 0 and row["backward_values_per_pixel"] > 0
        assert rows[case, "reversible"]["forward_launches"] >= rows[case, "eager"]["forward_launches"]
        assert rows[case, "reversible"]["backward_launches"] > rows[case, "eager"]["backward_launches"]
        assert rows[case, "reversible"]["launches_vs_eager"] > 1 and rows[case, "eager"]["bytes_vs_eager"] == 1


@pytest.mark.slow
def test_census_counts_what_compiled_code_launches():
    """Under torch.compile the census sees Inductor's generated C++ kernels (instrumented) as well as the
    extern ops the compiled code dispatches: fewer launches than eager, some of them generated."""
    from benchmarks.census import _flowstep, compile_supported

    if not compile_supported():
        pytest.skip(f"torch {torch.__version__}: dispatch modes cannot see compiled code")
    torch._dynamo.reset()
    tiny = {"channels": 4, "hidden": 8, "side": 4}
    eager = _flowstep("eager", torch.device("cpu"), **tiny)
    compiled = _flowstep("compiled", torch.device("cpu"), **tiny)
    assert compiled["generated_kernels"] > 0 and compiled["graphs"] >= 1
    launches = compiled["forward_launches"] + compiled["backward_launches"]
    assert compiled["generated_kernels"] < launches < eager["forward_launches"] + eager["backward_launches"]


class _ExpiresAfter(Budget):
    """A budget that expires after ``checks`` calls of :meth:`expired`."""

    def __init__(self, checks: int) -> None:
        super().__init__()
        self.checks = checks

    def expired(self) -> bool:
        self.checks -= 1
        return self.checks < 0


def test_interleaved_medians_time_each_function_in_turn():
    from benchmarks.common import interleaved_medians_ms

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    medians = interleaved_medians_ms(fns, torch.device("cpu"), rounds=4, calls=2)
    assert list(medians) == ["a", "b", "c"] and all(m >= 0 for m in medians.values())
    assert calls == (["a"] * 3 + ["b"] * 3 + ["c"] * 3) * 4  # per round each in turn: one warm call, two timed


def test_budget_takes_the_earlier_of_its_limits():
    now = time.time()
    assert Budget.of().remaining() == float("inf") and not Budget.of().expired()
    assert Budget.of(seconds=100, deadline=now + 10).until == pytest.approx(now + 10, abs=1)
    assert Budget.of(seconds=10, deadline=now + 100).until == pytest.approx(now + 10, abs=1)
    assert Budget.of(deadline=now - 1).expired()


def test_a_case_stops_at_its_budget_and_marks_the_rest_skipped():
    from benchmarks.census import census_rows

    rows = census_rows(torch.device("cpu"), modes=("eager", "reversible"), budget=_ExpiresAfter(1))
    assert [r.get("skipped") for r in rows] == [None, "time", "time", "time"]
    assert rows[0]["forward_launches"] > 0
    skipped = train_step.depth_sweep(torch.device("cpu"), quick=True, budget=_ExpiresAfter(0))
    assert skipped and all(r["skipped"] == "time" and "steps" in r and "mode" in r for r in skipped)


def test_a_run_past_its_deadline_starts_nothing_and_keeps_earlier_rows(tmp_path, capsys):
    env = environment(torch.device("cpu"))
    earlier = {"case": "flowstep B2 C12 16x16 h512", "mode": "eager", "forward_launches": 7}
    (tmp_path / "cpu.json").write_text(json.dumps({"environment": env, "results": {"census": [earlier]}}))

    argv = ["--device", "cpu", "--cases", "census,train_depth", "--deadline", "1", "--out", str(tmp_path)]
    assert main(argv) == 0

    results = json.loads((tmp_path / "cpu.json").read_text())["results"]
    assert results == {"census": [{**earlier, "run": "unstamped"}], "train_depth": [{"skipped": "time"}]}
    assert "census: skipped, no time left" in capsys.readouterr().out


def test_case_registry_by_device(capsys):
    from benchmarks.__main__ import CASES, CPU_ONLY, CUDA_ONLY, NAMED_ONLY, default_cases, device_cases

    assert set(device_cases("cpu")) == set(CASES) - set(CUDA_ONLY)
    assert set(device_cases("cuda")) == set(CASES) - set(CPU_ONLY)
    named = {"tabular_instructions", "reversible_instructions"}
    assert set(default_cases("cpu")) == set(device_cases("cpu")) - named
    assert set(default_cases("cuda")) == set(device_cases("cuda")) and set(NAMED_ONLY) <= set(CPU_ONLY)
    assert {"census", "train_step_cpu", "peers_glow"} <= set(default_cases("cpu"))
    assert {"coupling", "flowstep", "train_modes", "largest_batch"} <= set(default_cases("cuda"))
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--cases", "train_modes"])
    assert "do not run on cpu" in capsys.readouterr().err


def test_resolution_rows_merge_with_earlier_ones():
    from benchmarks.__main__ import _merged

    earlier = [{"resolution": r, "mode": m, "largest_batch": 1} for r in (256, 512, 1024) for m in ("a", "b")]
    new = [{"resolution": 512, "mode": m, "largest_batch": 8} for m in ("a", "b")]
    merged = _merged("largest_batch", new, earlier, None, (512,))
    assert [(r["resolution"], r["mode"], r["largest_batch"]) for r in merged] == [
        (256, "a", 1), (256, "b", 1), (512, "a", 8), (512, "b", 8), (1024, "a", 1), (1024, "b", 1),
    ]  # fmt: skip
    assert _merged("largest_batch", new, earlier, None, None) == new  # a full run replaces the case


def test_a_time_boxed_run_never_replaces_a_measurement_with_a_skip():
    """Rows skipped for time give way to the earlier measured row of the same unit (with its own run stamp); a
    case skipped whole keeps its earlier rows; measured rows replace earlier ones; an earlier case-level skip
    row (no channels key) does not break a --channels merge."""
    from benchmarks.__main__ import _merged

    earlier = [
        {"size": "a", "variant": "eager", "ms": 1.0, "run": "2026-11-25"},
        {"size": "b", "variant": "eager", "ms": 2.0, "run": "2026-11-25"},
        {"size": "c", "variant": "eager", "error": "oom", "run": "2026-11-25"},
    ]
    new = [
        {"size": "a", "variant": "eager", "ms": 1.5, "run": "2026-11-27"},
        {"size": "b", "variant": "eager", "skipped": "time", "run": "2026-11-27"},
        {"size": "c", "variant": "eager", "skipped": "time", "run": "2026-11-27"},
        {"size": "d", "variant": "eager", "skipped": "time", "run": "2026-11-27"},
    ]
    assert _merged("coupling", new, earlier, None, None) == [new[0], earlier[1], earlier[2], new[3]]
    whole_skip = [{"skipped": "time", "run": "2026-11-27"}]
    assert _merged("coupling", whole_skip, earlier, None, None) == earlier
    assert _merged("coupling", whole_skip, [], None, None) == whole_skip
    rows = [{"channels": 6, "height": 32, "ms": 1.0}]
    assert _merged("actnorm_invconv", rows, [{"skipped": "time"}], (6,), None) == [{"skipped": "time"}, *rows]
    ambiguous = [{"size": "b", "variant": "eager", "ms": 2.0}, {"size": "b", "variant": "eager", "ms": 3.0}]
    assert _merged("coupling", new[1:2], ambiguous, None, None) == new[1:2]  # which one? neither


def test_results_are_stamped_and_written_whole(tmp_path, capsys, monkeypatch):
    """Each row says its run (date, quick); the files are replaced whole (no partial file left); an unreadable
    results file is moved aside with a warning instead of failing the run."""
    from benchmarks import census
    from benchmarks.__main__ import _stamped

    env = {"date": "2026-11-27"}
    assert _stamped([{"a": 1}], env, True) == [{"a": 1, "run": "2026-11-27 quick"}]
    assert _stamped([{"a": 1}], env, False) == [{"a": 1, "run": "2026-11-27"}]
    (tmp_path / "cpu.json").write_text('{"environment": {"dev')  # cut short by a kill mid-write
    monkeypatch.setattr(census, "census_rows", lambda device, budget=None: [{"case": "x", "mode": "eager"}])
    assert main(["--device", "cpu", "--cases", "census", "--quick", "--out", str(tmp_path)]) == 0
    assert "could not be read" in capsys.readouterr().out
    assert (tmp_path / "cpu.json.unreadable").read_text() == '{"environment": {"dev'
    payload = json.loads((tmp_path / "cpu.json").read_text())
    run = f"{payload['environment']['date']} quick"
    assert payload["results"] == {"census": [{"case": "x", "mode": "eager", "run": run}]}
    assert not list(tmp_path.glob("*.partial"))


def test_cuda_median_of_a_long_call_times_every_rep(monkeypatch):
    """A call too long for do_bench's 100 ms (which would time it once) is timed ``reps`` times, one by one."""
    import triton.testing

    from benchmarks import common

    calls = []
    timings = iter([300.0, 310.0, 290.0, 500.0])  # the estimate, then three reps
    monkeypatch.setattr(common, "_cuda_event_ms", lambda fn: (fn(), next(timings))[1])
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("do_bench times one call"))
    assert common.median_ms(lambda: calls.append(1), torch.device("cuda"), reps=3, warmup=1) == 310.0
    assert len(calls) == 5  # a warm call, the estimate, three reps
    monkeypatch.setattr(common, "_cuda_event_ms", lambda fn: 1.0)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **k: 0.5)
    assert common.median_ms(lambda: None, torch.device("cuda"), reps=20) == 0.5  # short calls: do_bench


def test_cuda_side_by_side_timing_uses_one_method_for_every_provider(monkeypatch):
    """One slow provider makes every provider's time come from CUDA-event rounds, taken in turn; all fast: do_bench
    for each (before, each provider picked its own method, so one comparison mixed them)."""
    import triton.testing

    from benchmarks import common

    order = []
    speed = {"fast": 0.1, "slow": 50.0}
    monkeypatch.setattr(common, "_cuda_event_ms", lambda fn: (fn(), speed[order[-1]])[1])
    monkeypatch.setattr(triton.testing, "do_bench", lambda *a, **k: pytest.fail("a method for all: events"))
    fns = {name: (lambda n=name: order.append(n)) for name in speed}
    assert common.interleaved_medians_ms(fns, torch.device("cuda"), rounds=3) == {"fast": 0.1, "slow": 50.0}
    assert order[-6:] == ["fast", "slow"] * 3  # the timed rounds alternate
    speed["slow"] = 0.2
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **k: (fn(), speed[order[-1]] / 2)[1])
    assert common.interleaved_medians_ms(fns, torch.device("cuda"), rounds=3) == {"fast": 0.05, "slow": 0.1}


def test_flowstep_check_scales_with_dtype_and_a_mismatch_loses_its_time(monkeypatch):
    from benchmarks import bench_flowstep
    from benchmarks.common import MismatchError

    want = torch.linspace(-4, 4, 64, dtype=torch.bfloat16)
    got = (want.float() + 0.023).to(torch.bfloat16)  # within bfloat16's rounding of a whole step
    bench_flowstep._check("bf16", [("y", got), ("logdet", got)], [("y", want), ("logdet", want)])
    with pytest.raises(MismatchError):
        bench_flowstep._check("fp32", [("y", got.float())], [("y", want.float())])

    monkeypatch.setattr(bench_flowstep, "_sizes", lambda device, quick: [(2, 4, 4, 4, 8)])
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    checked = bench_flowstep._check

    def wrong_compile(name, results, eager):
        if name == "compile":
            raise MismatchError("flowstep compile y: fused result differs from eager")
        checked(name, results, eager)

    monkeypatch.setattr(bench_flowstep, "_check", wrong_compile)
    rows = {r["variant"]: r for r in bench_flowstep.run(torch.device("cpu"), torch.float32, quick=True)}
    assert "fwd_bwd_ms" not in rows["compile"] and rows["compile"]["error"].startswith("MismatchError")
    assert rows["eager"]["speedup_vs_eager"] == 1.0 and "speedup_vs_compile" not in rows["eager"]


def test_a_child_that_never_stops_printing_is_killed_at_its_box():
    from benchmarks.common import BoxedProcess

    child = BoxedProcess([sys.executable, "-c", "while True: print('x', flush=True)"])
    start = time.time()
    for _ in child.lines(until=start + 1):
        pass
    assert child.killed and time.time() - start < 10


def test_gpu_check_takes_the_running_step_down_with_it():
    """SIGTERM or SIGINT to gpu-check (a timeout around make) kills the running step's own process group."""
    import signal

    from benchmarks import gpu_check
    from benchmarks.common import BoxedProcess

    child = BoxedProcess([sys.executable, "-c", "import time; time.sleep(60)"])
    gpu_check._RUNNING.append(child)
    try:
        with pytest.raises(SystemExit) as exit_info:
            gpu_check._stop_running(signal.SIGTERM, None)
    finally:
        gpu_check._RUNNING.remove(child)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert child.process.wait(timeout=10) == -signal.SIGKILL and child.killed


def test_train_modes_rows_compare_with_eager_and_compile(monkeypatch):
    from benchmarks import step_modes

    def measured(ms, loss_step1, loss_check, grad_norm=2.0, update_norm=0.1):
        return dict(
            ms=ms, loss_step1=loss_step1, loss_check=loss_check, grad_norm_check=grad_norm, update_norm=update_norm
        )

    got = {
        ("eager", 0): measured(30.0, 5.0, 4.0),
        ("cuda-graph", 0): measured(10.0, 5.01, 4.01, grad_norm=2.02),  # within bf16's tolerances
        ("compile", 0): measured(15.0, 5.0, 4.0, update_norm=0.102),
        ("eager", 1): measured(90.0, 4.0, 3.0),
        ("cuda-graph", 1): measured(30.0, 4.0, 3.5),  # a wrong replayed step
    }
    monkeypatch.setattr(step_modes, "_child_rows", lambda order, budget: (got, {"skipped": "time"}))
    rows = {(r["resolution"], r["mode"]): r for r in step_modes.gpu_mode_rows()}
    assert rows[32, "cuda-graph"]["speedup_vs_eager"] == 3.0 and rows[32, "cuda-graph"]["speedup_vs_compile"] == 1.5
    assert rows[32, "cuda-graph"]["matches_eager"] and rows[32, "compile"]["matches_eager"]
    wrong = rows[256, "cuda-graph"]  # its first loss matches: the check after the updates does not, so no time
    assert not wrong["matches_eager"] and "ms" not in wrong and "speedup_vs_eager" not in wrong
    assert wrong["error"].startswith("mismatch with eager: loss_check 3.5 against 3")
    assert rows[256, "compile"] == {**step_modes.GPU_CONFIGS[1], "mode": "compile", "skipped": "time"}

    # equal losses (the update at TIMING_LR moves them less than bf16's tolerance) do not hide a gradient off by
    # a constant factor (which Adam's normalised update would not show) nor a replay that updated nothing
    got[("cuda-graph", 0)] = measured(10.0, 5.0, 4.0, grad_norm=3.0)
    got[("compile", 0)] = measured(15.0, 5.0, 4.0, update_norm=0.1 * (1 - 1 / step_modes.CHECK_STEP))
    rows = {(r["resolution"], r["mode"]): r for r in step_modes.gpu_mode_rows()}
    assert "grad_norm_check 3 against 2" in rows[32, "cuda-graph"]["error"] and "ms" not in rows[32, "cuda-graph"]
    assert "update_norm" in rows[32, "compile"]["error"] and not rows[32, "compile"]["matches_eager"]


def test_step_variants_agree_with_eager_within_the_fp32_check():
    """A real reversible step matches eager's losses, gradient norm and updates within :data:`_CHECKED`'s float32
    tolerances (which a wrong mode fails: the mocked rows above), and the check reads a gradient norm from
    TrainStep."""
    from benchmarks import step_modes

    cfg = {"resolution": 8, "levels": 2, "steps": 2, "hidden": 8, "batch": 2, "amp": None}
    rows = [
        {"variant": name, **step_modes._Variant(cfg, "eager", reversible, torch.device("cpu")).row(1.0)}
        for name, reversible in (("eager", False), ("reversible", True))
    ]
    step_modes._compare(rows, rows[0], None)
    assert rows[1]["matches_eager"] and rows[0]["grad_norm_check"] > 0 and rows[0]["update_norm"] > 0


def test_train_modes_runs_one_resolution_in_a_call_of_its_own(monkeypatch):
    """``--resolutions 32``: the child measures the three modes of the 32x32 config only, and the results file
    keeps the 256x256 rows of an earlier run; a resolution it does not measure is refused."""
    from benchmarks import step_modes
    from benchmarks.__main__ import _merged

    orders = []
    monkeypatch.setattr(step_modes, "_child_rows", lambda order, budget: (orders.append(order), ({}, {}))[1])
    rows = step_modes.gpu_mode_rows(resolutions=(32,))
    assert orders == [[("eager", 0), ("cuda-graph", 0), ("compile", 0)]]
    step_modes.gpu_mode_rows()  # both sizes: the compilations (the slow part) after every eager and graph row
    assert orders[1] == [
        ("eager", 0), ("cuda-graph", 0), ("eager", 1), ("cuda-graph", 1), ("compile", 0), ("compile", 1),
    ]  # fmt: skip
    assert {(r["resolution"], r["mode"]) for r in rows} == {(32, "eager"), (32, "compile"), (32, "cuda-graph")}
    earlier = [{"resolution": r, "mode": "eager", "ms": 1.0} for r in (32, 256)]
    assert [r["resolution"] for r in _merged("train_modes", rows, earlier, None, (32,))] == [32, 32, 32, 256]
    with pytest.raises(ValueError, match="train_modes measures resolutions"):
        step_modes.gpu_mode_rows(resolutions=(64,))


def test_gpu_check_plan_follows_the_issue_and_fits_its_deadline():
    from benchmarks.gpu_check import PLAN, deadlines

    assert [s.name for s in PLAN] == [
        "gpu-tests", "coupling", "flowstep", "spline", "train_modes", "largest_batch", "jet_largest_batch",
        "flowstep_max_autotune",
    ]  # fmt: skip
    assert PLAN[0].argv[:2] == ("-m", "benchmarks.gpu_tests")
    ends = deadlines(PLAN, start=0.0, total_s=460.0)
    assert ends == sorted(ends) and ends[-1] == 460.0
    assert ends[0] == 460.0 - sum(s.reserve_s for s in PLAN[1:])
    assert sum(s.reserve_s for s in PLAN) <= 460.0


def test_gpu_check_kills_a_step_at_its_time_box(tmp_path):
    from benchmarks.gpu_check import Step, _run

    sleeper = Step("sleeper", ("-c", "import time; print('started', flush=True); time.sleep(60)"), 0)
    start = time.time()
    status = _run(sleeper, until=start + 3, log_path=str(tmp_path / "sleeper.log"))
    assert status == "killed at its time box" and time.time() - start < 20
    assert (tmp_path / "sleeper.log").read_text() == "started\n"
    # unflushed output of a killed child is in its log too (children run unbuffered)
    quiet = Step("quiet", ("-c", "import time; print('half way'); time.sleep(60)"), 0)
    assert _run(quiet, until=time.time() + 3, log_path=str(tmp_path / "quiet.log")) == "killed at its time box"
    assert (tmp_path / "quiet.log").read_text() == "half way\n"
    assert _run(Step("ok", ("-c", "print('done')"), 0), until=time.time() + 60, log_path=None) == "ok"
    assert (
        _run(Step("bad", ("-c", "raise SystemExit(3)"), 0), until=time.time() + 60, log_path=None) == "failed (exit 3)"
    )


def test_gpu_tests_deal_keeps_a_functions_cases_together_and_balances():
    from benchmarks.gpu_tests import PYTEST_ENV, deal

    ids = ["a.py::f[1]", "a.py::f[2]", "a.py::f[3]", "a.py::g", "b.py::h[x]", "b.py::h[y]", "b.py::k"]
    shards = deal(ids, 3)
    assert shards == [["a.py::f[1]", "a.py::f[2]", "a.py::f[3]"], ["a.py::g", "b.py::k"], ["b.py::h[x]", "b.py::h[y]"]]
    assert deal(ids, 1) == [ids] and len(deal(ids[:2], 4)) == 1  # empty shards dropped
    with pytest.raises(ValueError, match="shards must be >= 1"):
        deal(ids, 0)
    assert PYTEST_ENV["FASTFLOW_TEST_GPU"] == "1" and PYTEST_ENV["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] == "1"


def test_gpu_tests_runs_shards_and_reports_a_failure(tmp_path, capsys):
    from benchmarks.gpu_tests import main

    (tmp_path / "test_marked.py").write_text(
        "import pytest\n"
        "@pytest.mark.gpu\n@pytest.mark.parametrize('n', [1, 2])\ndef test_ok(n):\n    assert n\n"
        "@pytest.mark.gpu\ndef test_other():\n    assert True\n"
        "def test_unmarked():\n    raise AssertionError('not selected')\n"
    )
    assert main(["--shards", "2", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count(" PASSED") == 3 and "test_unmarked" not in out
    assert "[shard 0]" in out and "[shard 1]" in out  # test_ok's two cases in one shard, test_other in the other
    assert {line.split()[1][:-1] for line in out.splitlines() if "test_ok[" in line and "PASSED" in line} == {"0"}
    (tmp_path / "test_broken.py").write_text("import pytest\n@pytest.mark.gpu\ndef test_fails():\n    assert False\n")
    assert main(["--shards", "2", str(tmp_path)]) == 1
    assert main(["--marker", "no_such_marker", str(tmp_path)]) == 1
    assert "no tests collected" in capsys.readouterr().out


def test_normflows_glow_has_the_demo_structure():
    pytest.importorskip("normflows")
    from benchmarks.peers import DEMO, normflows_glow

    torch.manual_seed(0)
    model = normflows_glow(DEMO["levels"], DEMO["steps"], DEMO["hidden"], (1, 8, 8))
    x = torch.rand(4, 1, 8, 8) - 0.5
    log_prob = model.log_prob(x, None)
    assert log_prob.shape == (4,) and torch.isfinite(log_prob).all()
    assert len(model.flows) == DEMO["levels"] and all(len(level) == DEMO["steps"] + 1 for level in model.flows)


def test_largest_batch_search_doubles_to_the_cap_and_stops_at_its_budget(monkeypatch):
    """The search's logic, without a GPU: a fake step fits up to a per-mode batch."""
    fits_up_to = {"standard": 2, "checkpoint": 8, "reversible": 1000, "tiled": 0}
    mode = {}
    monkeypatch.setattr(train_step, "_model_and_batch", lambda cfg, device: (object(), torch.zeros(1, 3, 4, 4)))
    monkeypatch.setattr(train_step, "_set_mode", lambda model, m, tile_budget_mb: mode.update(now=m))
    monkeypatch.setattr(train_step, "frozen_adam", lambda model: "adam")
    monkeypatch.setattr(train_step, "_fits", lambda model, x, optimizer: len(x) <= fits_up_to[mode["now"]])

    rows = train_step.largest_batch_rows(torch.device("cpu"), resolutions=(256,))
    assert {r["mode"]: (r["largest_batch"], r["capped"]) for r in rows} == {
        "standard": (2, False), "checkpoint": (8, False), "reversible": (train_step.LARGEST_BATCH_CAP, True),
        "tiled": (0, False),
    }  # fmt: skip

    # budget checks: model build, standard's start, its batch-1 step; then time is up
    rows = train_step.largest_batch_rows(torch.device("cpu"), resolutions=(256,), budget=_ExpiresAfter(3))
    assert (rows[0]["largest_batch"], rows[0]["search"]) == (1, "stopped: time")
    assert [r.get("skipped") for r in rows[1:]] == ["time"] * 3


def test_out_of_memory_recognises_cuda_and_library_allocation_failures():
    from benchmarks.common import out_of_memory

    assert out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not out_of_memory(ValueError("out of memory"))


def test_jet_largest_batch_search_per_mode_and_its_budget(monkeypatch):
    """The Jet search's logic, without a GPU: a fake step fits up to a per-mode batch; the checkpoint mode wraps
    the block's layers and the other modes undo it."""
    from benchmarks import bench_jet

    fits_up_to = {"standard": 4, "checkpoint": 64, "reversible": 10**6}
    seen = []

    def fake_fits(model, optimizer, batch, device):
        assert optimizer.state  # the moments are allocated
        mode = "reversible" if model.reversible else "checkpoint" if "forward" in vars(model.blocks[0]) else "standard"
        seen.append(mode)
        return batch <= fits_up_to[mode]

    small = {**bench_jet.LARGE, "resolution": 8, "patch_size": 4, "width": 8, "couplings": 2}
    monkeypatch.setattr(bench_jet, "LARGE", small)
    monkeypatch.setattr(bench_jet, "_fits", fake_fits)
    rows = bench_jet.jet_largest_batch_rows(torch.device("cpu"))
    assert {r["mode"]: (r["largest_batch"], r["capped"], r["search"]) for r in rows} == {
        "standard": (4, False, "done"), "checkpoint": (64, False, "done"),
        "reversible": (bench_jet.LARGEST_BATCH_CAP, True, "done"),
    }  # fmt: skip
    assert set(seen) == {"standard", "checkpoint", "reversible"}

    rows = bench_jet.jet_largest_batch_rows(torch.device("cpu"), budget=_ExpiresAfter(2))
    assert (rows[0]["largest_batch"], rows[0]["search"]) == (1, "stopped: time")
    assert [r.get("skipped") for r in rows[1:]] == ["time"] * 2


def test_spline_grid_takes_the_batch_sizes_in_turn():
    from benchmarks.bench_spline import BATCHES, BINS, FEATURES, TARGET_SIZE, grid_sizes

    sizes = grid_sizes()
    assert sizes[0] == TARGET_SIZE
    assert sorted(sizes[1:]) == sorted((b, d, k) for b in BATCHES for d in FEATURES for k in BINS)
    assert [b for b, _, _ in sizes[1:5]] == [4096, 65536, 4096, 65536]  # a cut run has rows at both


def test_tabular_case_rows_and_time_box(monkeypatch):
    """The ``tabular`` case at a few steps: every dataset and library gets a finite held-out NLL and a step time,
    the conditional rows compare with per-condition flows; past its time box the rest is marked skipped."""
    from benchmarks import tabular

    monkeypatch.setitem(tabular.SETTINGS, "quick", {"steps": 3, "batch": 32, "libraries": ("fastflow", "zuko_realnvp")})
    rows = tabular.tabular_rows(quick=True)
    spread = [r for r in rows if r["dataset"] == "moons, seeds"]
    assert [(r["library"], r["seeds"]) for r in spread] == [("fastflow", 2), ("zuko_realnvp", 2)]
    for r in spread:
        per_seed = [float(v) for v in r["heldout_nll_per_seed"].split()]
        assert len(per_seed) == 2 and r["heldout_nll"] == pytest.approx(sum(per_seed) / 2, abs=1e-3)
    rows = [r for r in rows if r not in spread]
    unconditional = [r for r in rows if not r["dataset"].startswith("simulator")]
    assert {(r["dataset"], r["library"]) for r in unconditional} == {
        (d, lib) for d in ("moons", "digits", "breast_cancer") for lib in ("fastflow", "zuko_realnvp")
    }
    assert all(math.isfinite(r["heldout_nll"]) and r["ms_per_step"] > 0 and r["best_step"] >= 1 for r in unconditional)
    conditional, per_condition = rows[-2:]
    assert math.isfinite(conditional["gap_vs_per_condition"]) and math.isfinite(per_condition["heldout_nll"])

    skipped = tabular.unconditional_rows(quick=True, budget=_ExpiresAfter(1))
    assert [r.get("skipped") for r in skipped] == [None, None, "time", "time", "time", "time"]
    # a seed cut short by the time box is not averaged in as if it had trained its steps
    cut = tabular.seed_spread_rows(quick=True, budget=_ExpiresAfter(2))
    assert [(r["seeds"], r["truncated_seeds"], r.get("skipped")) for r in cut] == [(0, 1, "time"), (0, 1, "time")]


def test_spline_case_checks_and_times_every_provider():
    """The ``spline`` case at one tiny size: eager, compile and zuko timed with what they save for backward (the
    compiled graph saves less than eager's intermediates), nflows timed or marked not installed; past its time
    box every size is marked skipped."""
    from benchmarks import bench_spline

    rows = {r["provider"]: r for r in bench_spline.run("cpu", quick=True, sizes=[(64, 3, 4)])}
    assert {"eager", "compile", "zuko", "nflows"} == set(rows)  # no fused row on the CPU
    for name in ("eager", "compile", "zuko"):
        assert rows[name]["median_ms"] > 0 and rows[name]["saved_mb"] > 0 and rows[name]["gbps"] > 0
    assert rows["compile"]["saved_mb"] < rows["eager"]["saved_mb"]
    assert rows["nflows"].get("skipped") == "not installed" or rows["nflows"]["median_ms"] > 0
    skipped = bench_spline.run("cpu", quick=True, budget=_ExpiresAfter(0))
    assert len(skipped) == len(bench_spline.QUICK_SIZES) and all(r["skipped"] == "time" for r in skipped)


def test_spline_case_records_a_compile_mismatch_and_raises_on_a_fused_one(monkeypatch: pytest.MonkeyPatch):
    """A compiled result off by 1e-3 is not timed: its row says so and the other providers are timed; the same
    error in the fused kernels stops the case."""
    from benchmarks import bench_spline
    from benchmarks.common import MismatchError
    from fastflow.ops.spline import rq_spline_ref

    def off(x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, logdet = rq_spline_ref(x, raw, 4, bench_spline.BOUND)
        return y + 1e-3, logdet

    providers = bench_spline._providers
    monkeypatch.setattr(bench_spline, "_providers", lambda *a: {**providers(*a), "compile": ("eager", off)})
    rows = {r["provider"]: r for r in bench_spline.run("cpu", quick=True, sizes=[(64, 3, 4)])}
    assert rows["compile"]["skipped"] == "mismatch" and "compile y: largest error" in rows["compile"]["mismatch"]
    assert "median_ms" not in rows["compile"] and rows["eager"]["median_ms"] > 0 and rows["zuko"]["median_ms"] > 0

    monkeypatch.setattr(bench_spline, "_providers", lambda *a: {**providers(*a), "fused": ("eager", off)})
    with pytest.raises(MismatchError, match="fused y: largest error"):
        bench_spline.run("cpu", quick=True, sizes=[(64, 3, 4)])


def test_spline_check_bounds_the_mean_error_and_the_largest():
    """The spline case's three-way check passes a provider whose errors are eager's in distribution but peak at
    another element (largest 4x eager's); it refuses one wrong element (largest over 8x eager's) and a
    provider less accurate on the whole (mean over 2x eager's)."""
    from benchmarks import bench_spline
    from benchmarks.common import MismatchError

    truth = torch.linspace(-1.0, 1.0, 1000, dtype=torch.float64)
    noise = 1e-7 * torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eager = truth + noise
    eager[10] += 1e-5
    eager_errors = bench_spline._errors([eager], [truth])

    def check(got: torch.Tensor) -> None:
        bench_spline._check("spline", [got], eager_errors, [truth], atol=0.0)

    other_peak = truth + noise
    other_peak[500] += 4e-5
    check(other_peak)
    wrong_element = truth + noise
    wrong_element[500] += 1e-3
    with pytest.raises(MismatchError, match="y: largest error"):
        check(wrong_element)
    with pytest.raises(MismatchError, match="y: mean error"):
        check(truth + 3 * noise.abs() + 1e-6)


def test_spline_near_knot_flags_the_elements_whose_bin_float32_leaves_open():
    """An ``x`` one float32 ulp from an interior knot is flagged, as is one at the check's limit; the bin
    midpoints and the bound (a knot of no bin pair) are not."""
    from benchmarks import bench_spline
    from fastflow.ops import spline_eager as E

    bins, eps = 4, torch.finfo(torch.float32).eps
    raw = torch.randn(3, 3 * bins - 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spline = E.Spline(bins, bench_spline.BOUND, 1e-3, 1e-3, 1e-3)
    sizes, right = E.sizes_and_knots(raw[:, :bins], spline, 1e-3)
    knot = right[:, 1]
    limit = bench_spline.KNOT_ULPS * eps * bench_spline.BOUND
    x = torch.stack(
        [
            torch.nextafter(knot.float(), torch.tensor(-9.0)).double(),
            knot + 0.99 * limit,
            knot - 0.5 * sizes[:, 1],  # the middle of bin 1
            torch.full_like(knot, bench_spline.BOUND),
        ],
        dim=1,
    )
    raw = raw.unsqueeze(1).expand(3, 4, -1)
    near = bench_spline._near_knot(x, raw, bins, torch.float32)
    assert near[:, :2].all() and not near[:, 2:].any()
    assert not bench_spline._near_knot(x, raw, bins, torch.float64)[:, 1].any()


def test_spline_check_leaves_out_near_knot_gradients_but_not_their_nans():
    """A gradient taken from the neighbouring bin at an element next to a knot passes the three-way check; the
    same error elsewhere, a NaN there, or an error in ``y`` there do not."""
    from benchmarks import bench_spline
    from benchmarks.common import MismatchError

    gen = torch.Generator().manual_seed(0)
    truth = [torch.randn(50, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    truth.insert(1, torch.randn(50, generator=gen, dtype=torch.float64))
    truth.append(torch.randn(50, 4, 5, generator=gen, dtype=torch.float64))
    eager = [t + 1e-7 * torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in truth]
    near = torch.zeros(50, 4, dtype=torch.bool)
    near[7, 2] = True
    eager_errors = bench_spline._errors(eager, truth, near)

    def check(index: int, at: tuple[int, ...], value: float) -> None:
        got = [t.clone() for t in eager]
        got[index][at] = value
        bench_spline._check("spline", got, eager_errors, truth, 0.0, near)

    check(2, (7, 2), 3e3)
    check(3, (7, 2, 4), -1e2)
    for index, at, value, message in (
        (2, (7, 3), 3e3, "grad_x: largest error"),
        (3, (8, 2, 0), 3e3, "grad_raw: largest error"),
        (2, (7, 2), math.nan, "grad_x: not finite"),
        (0, (7, 2), 3e3, "y: largest error"),
    ):
        with pytest.raises(MismatchError, match=message):
            check(index, at, value)


def test_tabular_fastflow_nsf_trainee_steps():
    from benchmarks import tabular

    trainee = tabular._trainee("fastflow_nsf", 3, 0, steps=2)
    trainee.step(torch.randn(16, 3))
    assert trainee.error is None and math.isfinite(trainee.heldout_nll(torch.randn(8, 3)))


def test_checkpoint_mode_gives_the_standard_loss_and_gradients():
    """``train_step``'s per-layer checkpointing recomputes, it changes no number (Glow passes a context)."""
    from fastflow.models import Glow

    torch.manual_seed(0)
    model = Glow(3, 8, levels=2, steps=2, hidden=8).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5
    model.log_prob(x)  # initialises ActNorm
    results = []
    for mode in ("standard", "checkpoint"):
        train_step._set_mode(model, mode, 64.0)
        model.zero_grad()
        loss = model.bits_per_dim(x).mean()
        loss.backward()
        results.append([loss.detach(), *(p.grad.clone() for p in model.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_a_resolution_out_of_memory_is_marked_and_left_out_of_the_ratios():
    """An out-of-memory row used to become the baseline (``ms`` NaN: every ratio NaN) or break the ratios."""
    rows = train_step._relative_to_standard(
        [
            {"mode": "standard", "error": "oom"},
            {"mode": "reversible", "ms": 20.0, "peak_mb": 100.0},
        ]
    )
    assert "time_vs_standard" not in rows[1]
    rows = train_step._relative_to_standard(
        [
            {"mode": "standard", "ms": 10.0, "peak_mb": 400.0},
            {"mode": "checkpoint", "error": "oom"},
            {"mode": "reversible", "ms": 15.0, "peak_mb": 100.0},
        ]
    )
    assert "time_vs_standard" not in rows[1] and rows[2]["time_vs_standard"] == 1.5
    assert rows[2]["memory_vs_standard"] == 0.25


def test_actnorm_invconv_reports_a_wrong_compiled_twin_without_a_time(monkeypatch):
    """The compiled twin is checked like the fused op: a wrong one gets an error in its rows, not a time."""

    def wrong_compile(fn, **kwargs):
        def compiled(x, *params):
            y, logdet = fn(x, *params)
            return y * 1.01, logdet

        return compiled

    monkeypatch.setattr(bench_actnorm_invconv.torch, "compile", wrong_compile)
    rows = bench_actnorm_invconv.run(torch.device("cpu"), torch.float32, quick=True, channels=(6,))
    compiled = [r for r in rows if r["variant"] == "compiled"]
    assert compiled and all(r["median_ms"] is None and "MismatchError" in r["error"] for r in compiled)
    assert all(r["median_ms"] > 0 for r in rows if r["variant"] == "eager")


def test_coupling_providers_are_timed_side_by_side_on_the_cpu(monkeypatch):
    """Each coupling row is checked, then every provider of a (kind, pass, size) is timed in the same rounds
    (timed one after another, a slow spell landed on one provider: eager forward read slower than forward +
    backward)."""
    from benchmarks import bench_coupling, common

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the compile provider, without compiling
    rounds = []
    interleaved = common.interleaved_medians_ms

    def recorded(fns, device, rounds_=20, calls=3, **kwargs):
        rounds.append(sorted(fns))
        return interleaved(fns, device, rounds_, calls)

    monkeypatch.setattr(bench_coupling, "interleaved_medians_ms", recorded)
    rows = bench_coupling.run("cpu", sizes=[(2, 4, 3, 3)], quick=True)
    assert rounds and all(names == ["compile", "eager"] for names in rounds)
    assert rows and all(r["median_ms"] > 0 and r["speedup_vs_eager"] > 0 for r in rows if "skipped" not in r)


def test_profile_overhead_counts_every_kernel_launch_call():
    from types import SimpleNamespace

    from benchmarks.profile_overhead import kernel_launches

    events = [("cudaLaunchKernel", 3), ("cudaLaunchKernelExC", 2), ("cuLaunchKernelEx", 1), ("cudaLaunchHostFunc", 5)]
    assert kernel_launches([SimpleNamespace(key=k, count=c) for k, c in events]) == 6  # cuBLAS/cuDNN's ExC too


def test_a_frozen_adam_holds_its_moments_and_keeps_the_weights():
    from benchmarks.common import frozen_adam

    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = frozen_adam(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    assert all(set(optimizer.state[p]) >= {"exp_avg", "exp_avg_sq"} for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_pixel_mix_times_both_compiled_mixes_and_reports_a_mismatch(monkeypatch):
    """The compiled CPU mix case times the summed product and the ``bmm`` side by side at each size, says which one
    compiled flow code takes there, reports a variant that disagrees instead of timing it, and marks the sizes its
    budget leaves out."""
    from benchmarks import bench_pixel_mix

    monkeypatch.setattr(bench_pixel_mix, "QUICK_SIZES", ((2, 3, 4, 4),))
    monkeypatch.setattr(bench_pixel_mix, "interleaved_medians_ms", lambda fns, device: {"bmm": 1.0, "sum": 0.5})
    monkeypatch.setattr(bench_pixel_mix, "copy_bandwidth_gbs", lambda device: 0.002)
    rows = bench_pixel_mix.pixel_mix_rows(quick=True)
    assert [(r["variant"], r["path"], r["median_ms"], r["speedup_vs_bmm"], r["error"]) for r in rows] == [
        ("bmm", "sum", 1.0, 1.0, None),
        ("sum", "sum", 0.5, 2.0, None),
    ]
    # x read once and its gradient written once: 2 * 4 bytes for each of the 96 elements, over the median
    assert [(r["bytes"], r["gbps"], r["pct_of_copy_bandwidth"]) for r in rows] == [
        (768, pytest.approx(768e-6), pytest.approx(38.4)),
        (768, pytest.approx(1536e-6), pytest.approx(76.8)),
    ]
    wrong = dict(
        bench_pixel_mix.VARIANTS, sum=lambda x, weight, bias: bench_pixel_mix.pixel_sum(x, weight, bias) * 1.01
    )
    monkeypatch.setattr(bench_pixel_mix, "VARIANTS", wrong)
    rows = bench_pixel_mix.pixel_mix_rows(quick=True)
    assert all(r["median_ms"] is None and r["gbps"] is None and "differs" in r["error"] for r in rows)
    skipped = bench_pixel_mix.pixel_mix_rows(quick=True, budget=_ExpiresAfter(0))
    assert [(r["variant"], r["skipped"]) for r in skipped] == [("bmm", "time"), ("sum", "time")]


WRITES_RESULTS = "import os; os.makedirs('benchmarks/results', exist_ok=True); open('benchmarks/results/dev.json', 'w')"


def _gpu_check_in(folder, plan: str, out, stop_at: str | None = None, total_s: float = 120):
    """``python -m benchmarks.gpu_check --out out`` with ``plan`` (Python source of a PLAN) in ``folder``; with
    ``stop_at``, SIGTERM (a ``timeout`` around make) once a line of its output says that (not after a fixed time,
    which a loaded machine may not reach it in)."""
    code = (
        "import sys, benchmarks.gpu_check as g\n"
        "from benchmarks.gpu_check import Step\n"
        f"g.PLAN = {plan}\n"
        f"sys.exit(g.main(['--out', {str(out)!r}, '--total-s', '{total_s}']))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    child = subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=env, stdout=subprocess.PIPE, text=True)
    if stop_at is not None:
        for line in child.stdout:  # the steps' output goes to gpu-check's stdout too
            if stop_at in line:
                child.send_signal(signal.SIGTERM)
                break
    child.communicate(timeout=120)
    return child.returncode


def _archived(out) -> dict[str, str]:
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_gpu_check_keeps_one_archive_in_out_with_logs_summary_and_results(tmp_path):
    """The GPU machine returns only a few files from $OUT: the check keeps one archive there (it wrote a log per
    step, a summary and result copies, 10 to 12 files); a step killed at its box does not fail the check."""
    plan = f"(Step('a', ('-c', 'print(1)'), 0), Step('b', ('-c', {WRITES_RESULTS!r}), 0))"
    out = tmp_path / "out"
    assert _gpu_check_in(tmp_path, plan, out) == 0
    assert os.listdir(out) == ["gpu-check.tar.gz"]
    files = _archived(out)
    assert set(files) == {
        "gpu-check/1-a.log",
        "gpu-check/2-b.log",
        "gpu-check/summary.md",
        "gpu-check/results/dev.json",
    }
    assert files["gpu-check/1-a.log"] == "1\n" and "| b | ok |" in files["gpu-check/summary.md"]


def test_a_stopped_gpu_check_still_leaves_its_logs_summary_and_results(tmp_path):
    """SIGTERM (a timeout around make) kills the running step; the archive then holds what was done, the results
    the finished steps wrote and a summary naming the step that was stopped (before, neither reached $OUT)."""
    sleeps = "import time; print('waiting', flush=True); time.sleep(60)"
    plan = f"(Step('b', ('-c', {WRITES_RESULTS!r}), 0), Step('c', ('-c', {sleeps!r}), 0))"
    out = tmp_path / "out"
    assert _gpu_check_in(tmp_path, plan, out, stop_at="waiting") == 128 + signal.SIGTERM
    files = _archived(out)
    assert "gpu-check/results/dev.json" in files and files["gpu-check/2-c.log"] == "waiting\n"
    assert "| c | stopped by a signal |" in files["gpu-check/summary.md"]


def test_a_boxed_step_dies_with_the_process_that_started_it(tmp_path):
    """A step leads its own process group, so a SIGKILL of gpu-check (which no handler sees) left it running on
    the GPU; now the kernel kills it when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    pid_file = tmp_path / "pid"
    step = tmp_path / "step.py"
    step.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    parent_script = tmp_path / "parent.py"
    parent_script.write_text(
        f"import sys, time\nfrom benchmarks.common import BoxedProcess\nBoxedProcess([sys.executable, {str(step)!r}])\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    parent = subprocess.Popen([sys.executable, str(parent_script)], env=env)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    for _ in range(100):
        try:
            with open(f"/proc/{pid}/stat") as f:  # a zombie (dead, not yet reaped) counts as gone
                if f.read().rsplit(") ", 1)[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the step outlived its parent")


def test_gpu_tests_cut_off_at_their_box_fail_the_check_where_a_benchmark_does_not(tmp_path, monkeypatch):
    """Benchmark steps write their rows as they go and stop at a soft deadline: killed at the box they keep what
    they wrote. The gpu tests must finish: killed, the check fails (it passed without them)."""
    from benchmarks import gpu_check

    sleeps = "import time; time.sleep(60)"
    out = tmp_path / "out"
    assert _gpu_check_in(tmp_path, f"(Step('gpu-tests', ('-c', {sleeps!r}), 0, min_s=1),)", out, total_s=4) == 1
    assert "| gpu-tests | killed at its time box |" in _archived(out)["gpu-check/summary.md"]
    monkeypatch.setattr(gpu_check, "_run", lambda step, until, log: "killed at its time box")
    monkeypatch.setattr(gpu_check, "PLAN", (gpu_check.PLAN[1],))  # coupling, a benchmark step
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert gpu_check.main(["--total-s", "60"]) == 0
    finally:  # main installs its own: pytest's Ctrl-C stays pytest's
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_boxed_commands_and_test_shards_start_with_default_signals_and_die_with_their_parent(monkeypatch):
    """The prefix that sets PR_SET_PDEATHSIG resets the signals its Python ignores (SIGPIPE, SIGXFSZ: inherited
    by the command otherwise), and the gpu-test runner starts its pytest shards through it too (they outlived a
    SIGKILLed check)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    from benchmarks import gpu_tests
    from benchmarks.common import BoxedProcess

    child = BoxedProcess(["grep", "SigIgn", "/proc/self/status"])
    ignored = int("".join(child.lines(time.time() + 60)).split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1)), hex(ignored)
    started = []

    class Recorded:
        def __init__(self, argv, **kwargs):
            started.append(argv)
            self.stdout = iter(())

        def wait(self):
            return 0

    monkeypatch.setattr(gpu_tests.subprocess, "Popen", Recorded)
    gpu_tests.main(["--shards", "2", "tests/test_gpu.py"])
    assert len(started) == 2 and all(argv[:2] == [sys.executable, "-c"] and "prctl" in argv[2] for argv in started)
    assert all(argv[4:7] == [sys.executable, "-m", "pytest"] for argv in started)


def _stand_in_counts(monkeypatch, counts: dict[tuple[str, str, int], float]) -> None:
    """``host_instructions`` with valgrind "installed" and ``counts[model, phase, features]`` as its counts."""
    from benchmarks import host_instructions

    monkeypatch.setattr(host_instructions.shutil, "which", lambda name: "/usr/bin/valgrind")
    monkeypatch.setattr(
        host_instructions,
        "_count",
        lambda m, p, d: {"model": m, "phase": p, "features": d, "instructions_per_step": counts[m, p, d]},
    )


def test_tabular_instructions_rows_pair_each_model_with_zuko(monkeypatch):
    """``tabular_instructions`` without valgrind's four minutes per process: the child runs its steps inside the
    ``qsort`` callback and reports the parameter tensors; the rows are the ratios of stand-in counts to zuko's of the
    same phase and width; past the time box a pair is skipped; without valgrind every row says so."""
    from benchmarks import host_instructions

    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_instructions", "fastflow", "step", "2"],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert child.stdout.split()[-1] == "45"  # 5 x (ActNorm 2 + LU 1 + MLP 6)

    counts = {("fastflow", "forward", 2): 9.0, ("zuko_realnvp", "forward", 2): 6.0}
    counts.update({("fastflow", "step", 2): 25.0, ("zuko_realnvp", "step", 2): 20.0})
    _stand_in_counts(monkeypatch, counts)
    rows = host_instructions.instruction_rows(quick=True)
    assert [(r["model"], r["phase"], r["vs_zuko_realnvp"]) for r in rows] == [
        ("fastflow", "forward", 1.5), ("zuko_realnvp", "forward", 1.0),
        ("fastflow", "step", 1.25), ("zuko_realnvp", "step", 1.0),
    ]  # fmt: skip
    cut = host_instructions.instruction_rows(quick=True, budget=_ExpiresAfter(1))
    assert [r.get("skipped") for r in cut] == [None, None, "time", "time"]
    monkeypatch.setattr(host_instructions.shutil, "which", lambda name: None)
    assert {r["skipped"] for r in host_instructions.instruction_rows(quick=True)} == {"valgrind not installed"}


def test_tabular_instructions_reads_callgrind_totals(monkeypatch, tmp_path):
    """A callgrind file's ``totals`` line over :data:`STEPS` steps, in millions per step; a failed run's error row."""
    from benchmarks import host_instructions

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--callgrind-out-file="))
        with open(out, "w") as f:
            f.write("events: Ir\nsummary: 5\ntotals: 1230000000\n")  # the last one: 123M per step over 10 steps
        return subprocess.CompletedProcess(cmd, 0, stdout="45\n", stderr="")

    monkeypatch.setattr(host_instructions.subprocess, "run", fake_run)
    row = host_instructions._count("fastflow", "step", 2)
    assert (row["instructions_per_step"], row["parameter_tensors"]) == (123.0, 45)
    assert {"--collect-atstart=no", "--toggle-collect=qsort*"} <= set(calls[0])
    assert calls[0][-3:] == ["fastflow", "step", "2"]
    failed = lambda cmd, **kw: (fake_run(cmd), subprocess.CompletedProcess(cmd, 1, "", "child failed\n"))[1]  # noqa: E731
    monkeypatch.setattr(host_instructions.subprocess, "run", failed)  # totals written, but the child failed
    assert host_instructions._count("fastflow", "step", 2)["error"] == "child failed"
    no_file = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "45\n", "")  # noqa: E731
    monkeypatch.setattr(host_instructions.subprocess, "run", no_file)
    assert host_instructions._count("fastflow", "step", 2)["error"] == "no callgrind totals"
    monkeypatch.setattr(host_instructions.subprocess, "run", fake_run)
    monkeypatch.setattr(host_instructions, "STEPS", 10**9)  # the same total over many more steps: not plausible
    assert "not the steps" in host_instructions._count("fastflow", "step", 2)["error"]
    monkeypatch.setattr(
        host_instructions.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "boom\n")
    )
    assert host_instructions._count("fastflow", "step", 2)["error"] == "boom"


def test_tabular_instructions_ratio_is_to_zuko_at_the_same_width(monkeypatch):
    from benchmarks import host_instructions

    counts = {("fastflow", "forward", 2): 9.0, ("zuko_realnvp", "forward", 2): 6.0, ("fastflow", "step", 2): 25.0}
    counts.update({("zuko_realnvp", "step", 2): 20.0, ("fastflow", "forward", 64): 30.0})
    counts.update({("zuko_realnvp", "forward", 64): 40.0, ("fastflow", "step", 64): 50.0})
    counts[("zuko_realnvp", "step", 64)] = 100.0
    _stand_in_counts(monkeypatch, counts)
    rows = host_instructions.instruction_rows(quick=False)
    ratios = {(r["model"], r["phase"], r["features"]): r["vs_zuko_realnvp"] for r in rows}
    assert ratios["fastflow", "forward", 64] == 0.75 and ratios["fastflow", "step", 64] == 0.5
    assert ratios["fastflow", "step", 2] == 1.25


def _counted_child(monkeypatch, qsort_calls: int) -> tuple[list[int], list[int]]:
    """``host_instructions`` with a tiny model whose NLL counts its calls, an Adam that counts its steps and a
    stand-in libc whose ``qsort`` calls the comparison ``qsort_calls`` times."""
    from benchmarks import host_instructions

    linear, forwards, steps = torch.nn.Linear(2, 1), [], []

    def nll(x):
        forwards.append(1)
        return linear(x).squeeze(-1)

    class CountingAdam(torch.optim.Adam):
        def step(self, *args, **kwargs):
            steps.append(1)
            return super().step(*args, **kwargs)

    class Libc:
        def qsort(self, base, count, size, compare):
            for _ in range(qsort_calls):
                compare(None, None)

    monkeypatch.setattr(host_instructions, "_model", lambda name, features: (linear, nll))
    monkeypatch.setattr(host_instructions.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setattr(host_instructions.torch.optim, "Adam", CountingAdam)
    monkeypatch.setattr(host_instructions.torch, "set_num_threads", lambda n: None)  # this process keeps its threads
    return forwards, steps


def test_tabular_instructions_child_runs_its_steps_once_inside_the_callback(monkeypatch):
    from benchmarks import host_instructions

    total = host_instructions.WARMUP + host_instructions.STEPS
    forwards, steps = _counted_child(monkeypatch, qsort_calls=3)  # the steps run at the first comparison only
    host_instructions._child("fastflow", "step", 2)
    assert len(forwards) == len(steps) == total
    forwards, steps = _counted_child(monkeypatch, qsort_calls=1)
    host_instructions._child("fastflow", "forward", 2)
    assert len(forwards) == total and steps == []  # the forward phase does not train
    _counted_child(monkeypatch, qsort_calls=0)
    with pytest.raises(SystemExit, match="never called"):
        host_instructions._child("fastflow", "step", 2)


def test_reversible_instructions_child_counts_the_train_step_of_its_mode(monkeypatch):
    """The child builds ``train_step_cpu``'s step at the tiny config in its mode and runs :data:`STEPS` of them in
    the counted callback (here a stand-in that calls it directly)."""
    from benchmarks import reversible_instructions, step_modes

    built, counted = [], []

    class Variant:
        def __init__(self, cfg, mode, reversible, device):
            built.append((cfg, mode, reversible, device.type))

        def block(self, n):
            counted.append(n)

    monkeypatch.setattr(step_modes, "_Variant", Variant)
    monkeypatch.setattr(reversible_instructions, "run_counted", lambda steps: steps())
    monkeypatch.setattr(reversible_instructions.torch, "set_num_threads", lambda n: None)
    reversible_instructions._child("reversible")
    reversible_instructions._child("standard")
    config = reversible_instructions.CONFIG
    assert built == [(config, "eager", True, "cpu"), (config, "eager", False, "cpu")]
    assert counted == [reversible_instructions.STEPS] * 2


def test_reversible_instructions_rows_are_ratios_to_standard(monkeypatch):
    from benchmarks import reversible_instructions

    seen = []

    def count(child, steps):
        seen.append((child, steps))
        per_step = {"standard": 100.0, "reversible": 141.0}[child[-1]]
        return per_step, "", None

    monkeypatch.setattr(reversible_instructions.shutil, "which", lambda name: "/usr/bin/valgrind")
    monkeypatch.setattr(reversible_instructions, "count_instructions", count)
    rows = reversible_instructions.instruction_rows()
    assert [(r["mode"], r["instructions_per_step"], r["vs_standard"]) for r in rows] == [
        ("standard", 100.0, 1.0), ("reversible", 141.0, 1.41)
    ]  # fmt: skip
    assert sorted(seen) == [(["benchmarks.reversible_instructions", m], 3) for m in ("reversible", "standard")]
    assert all(r["resolution"] == 8 and r["batch"] == 1 for r in rows)
    monkeypatch.setattr(reversible_instructions, "count_instructions", lambda child, steps: (None, "", "boom"))
    failed = reversible_instructions.instruction_rows()
    assert [r.get("error") for r in failed] == ["boom", "boom"] and all(r["resolution"] == 8 for r in failed)
    half = lambda child, steps: (None, "", "boom") if child[-1] == "standard" else (141.0, "", None)  # noqa: E731
    monkeypatch.setattr(reversible_instructions, "count_instructions", half)
    rows = reversible_instructions.instruction_rows()  # no ratio without the standard count
    assert rows[0]["error"] == "boom" and rows[1]["instructions_per_step"] == 141.0
    assert not any("vs_standard" in r for r in rows)
    assert [r.get("skipped") for r in reversible_instructions.instruction_rows(_ExpiresAfter(0))] == ["time"] * 2
    monkeypatch.setattr(reversible_instructions.shutil, "which", lambda name: None)
    assert {r["skipped"] for r in reversible_instructions.instruction_rows()} == {"valgrind not installed"}


def test_count_instructions_divides_by_its_own_steps(monkeypatch):
    from benchmarks import host_instructions

    def fake_run(cmd, **kwargs):
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--callgrind-out-file="))
        with open(out, "w") as f:
            f.write("events: Ir\ntotals: 300000000\n")
        return subprocess.CompletedProcess(cmd, 0, stdout="standard\n", stderr="")

    monkeypatch.setattr(host_instructions.subprocess, "run", fake_run)
    child = ["benchmarks.reversible_instructions", "standard"]
    per_step, stdout, error = host_instructions.count_instructions(child, 3)  # not host_instructions.STEPS (10)
    assert (per_step, stdout.split()[-1], error) == (100.0, "standard", None)


def test_the_runner_hands_reversible_instructions_its_budget(monkeypatch):
    from benchmarks import __main__ as runner
    from benchmarks import reversible_instructions

    got = []
    monkeypatch.setattr(reversible_instructions, "instruction_rows", lambda budget=None: got.append(budget) or [])
    budget = Budget()
    runner._run_case("reversible_instructions", torch.device("cpu"), torch.float32, True, None, None, budget)
    assert got == [budget]
