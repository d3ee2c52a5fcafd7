"""Tests for benchmarks/: the channel-mix threshold read off results, and a quick CPU run of one case."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_actnorm_invconv
from benchmarks.__main__ import main
from benchmarks.common import environment


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
    assert rows[-1] == earlier_row  # kept, and sorted after the C=6 rows
    new = [r for r in rows if r["channels"] == 6]
    assert {(r["height"], r["mode"], r["variant"]) for r in new} == {
        (h, m, v) for h in (32, 128) for m in ("forward", "forward+backward") for v in ("eager", "fused", "compiled")
    }
    assert all(r["median_ms"] > 0 for r in new if r["error"] is None)
    assert "says nothing of KERNEL_MAX_CHANNELS" in (tmp_path / "cpu.md").read_text()


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


def test_threshold_note_names_the_channels_timed():
    from benchmarks.__main__ import _threshold_note

    note = _threshold_note(_rows({48: [2.0], 96: [1.5]}))
    assert "supported by this run: 96" in note and "C timed: [48, 96]" in note and "not timed: [6, 12, 24, 128]" in note


def test_census_counts_launches_and_bytes_per_pixel():
    """The census of issue 13: reversible backprop launches more in backward (it recomputes each layer) and
    the same in forward; every row counts something."""
    from benchmarks.census import census_rows

    rows = {(r["case"], r["mode"]): r for r in census_rows(torch.device("cpu"))}
    assert len(rows) == 4
    for (case, _), row in rows.items():
        assert row["forward_launches"] > 0 and row["backward_values_per_pixel"] > 0
        assert rows[case, "reversible"]["forward_launches"] == rows[case, "eager"]["forward_launches"]
        assert rows[case, "reversible"]["backward_launches"] > rows[case, "eager"]["backward_launches"]
