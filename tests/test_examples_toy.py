"""``python -m fastflow.examples.toy``: the toy data, and a short run that writes its plots and learns."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.examples.toy_data import TOY_DATASETS, eight_gaussians, toy_dataset


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_data_is_seeded_2d_float(name):
    a, b = toy_dataset(name, 300, seed=3), toy_dataset(name, 300, seed=3)
    assert a.shape == (300, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, toy_dataset(name, 300, seed=4))


def test_eight_gaussians_sit_on_their_ring():
    radii = eight_gaussians(4000, seed=0, radius=2.0, std=0.05).norm(dim=1)
    assert (radii - 2.0).abs().max() < 0.3


def test_unknown_toy_dataset():
    with pytest.raises(ValueError, match="name must be one of"):
        toy_dataset("spirals", 10, seed=0)


@pytest.mark.parametrize("dataset", TOY_DATASETS)
def test_short_run_writes_plots_and_beats_the_untrained_flow(dataset, tmp_path):
    from fastflow.examples.toy import main

    argv = ["--dataset", dataset, "--steps", "100", "--transforms", "4", "--hidden", "32", "--out", str(tmp_path)]
    result = main(argv)
    for name in ("density.png", "samples.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(result.nll_untrained) and math.isfinite(result.nll_trained)
    # the untrained flow is a Gaussian fitted by ActNorm's data init; 100 steps must beat it clearly
    assert result.nll_trained < result.nll_untrained - 0.2


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--transforms", "0"], "--transforms must be >= 1"),
        (["--hidden", "0"], "--hidden must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--lr", "nan"], "--lr must be a finite number > 0"),
    ],
)
def test_bad_arguments_are_usage_errors(flags, named, tmp_path, capsys):
    from fastflow.examples.toy import main

    with pytest.raises(SystemExit) as exit_info:
        main([*flags, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_a_usage_error(tmp_path, capsys):
    from fastflow.examples.toy import main

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(blocker / "out")])
    assert exit_info.value.code == 2 and "is not a writable folder" in capsys.readouterr().err


def test_the_plots_leave_the_model_in_its_mode_and_take_a_constant_coordinate(tmp_path):
    pytest.importorskip("matplotlib")
    from fastflow.examples.toy import plot_density, plot_samples
    from fastflow.models import TabularFlow

    model = TabularFlow(2, transforms=1, hidden=8).train()
    data = torch.stack([torch.randn(64), torch.full((64,), 2.0)], dim=1)  # y is constant: a zero span
    model.log_prob(data)  # ActNorm initialisation (warns on the constant feature)
    plot_density(model, data, str(tmp_path / "density.png"), resolution=16)
    plot_samples(model, data, str(tmp_path / "samples.png"), n=32)
    assert model.training  # the plots used to leave it in eval mode
    assert (tmp_path / "density.png").exists() and (tmp_path / "samples.png").exists()


def test_the_plots_take_a_float64_model_and_refuse_a_bad_resolution(tmp_path):
    pytest.importorskip("matplotlib")
    from fastflow.examples.toy import plot_density, plot_samples
    from fastflow.models import TabularFlow

    model = TabularFlow(2, transforms=1, hidden=8).double()
    data = toy_dataset("moons", 256, seed=0).double()
    model.log_prob(data[:64])
    plot_density(model, data, str(tmp_path / "density.png"), resolution=8)
    plot_samples(model, data, str(tmp_path / "samples.png"), n=32)
    assert (tmp_path / "density.png").exists() and (tmp_path / "samples.png").exists()
    for resolution in (0, -3, 1):
        with pytest.raises(ValueError, match="resolution"):
            plot_density(model, data, str(tmp_path / "bad.png"), resolution=resolution)


def test_a_missing_matplotlib_is_a_usage_error_before_training(tmp_path, capsys, monkeypatch):
    import sys

    from fastflow.examples.toy import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "5", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "need matplotlib" in captured.err and "trained" not in captured.out


def test_a_seed_past_what_the_data_takes_is_a_usage_error(tmp_path, capsys):
    """--seed 4294967295 drew the held-out points with seed + 1 = 2**32, which scikit-learn refused with a
    traceback naming a number the user never passed."""
    from fastflow.examples.toy import MAX_SEED, main
    from fastflow.examples.toy_data import toy_dataset

    with pytest.raises(SystemExit) as exit_info:
        main(["--seed", "4294967295", "--steps", "1", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and f"--seed must be <= {MAX_SEED}" in capsys.readouterr().err
    for name in ("moons", "gaussians"):
        toy_dataset(name, 2, seed=MAX_SEED + 1)  # the largest seed's held-out draw is taken


def test_a_run_that_goes_non_finite_while_training_stops_with_the_lr_hint(tmp_path):
    """At --lr 10 the training itself meets a non-finite log-density: a FloatingPointError traceback before."""
    from fastflow.examples.toy import main

    args = ["--steps", "150", "--lr", "10", "--transforms", "2", "--hidden", "16", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert str(info.value.code).startswith("error: ") and "training diverged: try a lower --lr than 10.0" in str(
        info.value.code
    )


def test_a_diverged_run_warns_and_a_plot_it_cannot_draw_stops_with_the_hint(tmp_path, capsys, monkeypatch):
    """A diverged run printed its held-out NLL rising (or NaN) without a word, then died in the plots with a
    FloatingPointError traceback (or drew an empty samples panel). Which way a real run diverges depends on the
    platform: the evaluation and the plot are stood in for."""
    pytest.importorskip("matplotlib")
    from fastflow.examples import toy

    def not_finite(*args, **kwargs):
        raise FloatingPointError("the density is not finite")

    nll = iter([2.0, float("nan")])  # untrained, trained: NaN counts as diverged
    monkeypatch.setattr(toy, "heldout_nll", lambda model, data: next(nll))
    monkeypatch.setattr(toy, "plot_density", not_finite)
    with pytest.raises(SystemExit) as info:
        toy.main(["--steps", "1", "--lr", "1", "--out", str(tmp_path / "out")])
    assert str(info.value.code) == (
        "error: cannot plot the trained model (the density is not finite): training diverged: try a lower --lr than 1.0"
    )
    assert "warning: training diverged: try a lower --lr than 1.0 (the held-out NLL rose)" in capsys.readouterr().err
