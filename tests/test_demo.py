"""The ``make demo`` job: a short run writes its outputs; the full run meets the bits/dim target."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fastflow.checkpoint import load_checkpoint
from fastflow.cli import TRAIN_DEFAULTS
from fastflow.cli import main as cli_main
from fastflow.demo import main
from tests.helpers import assert_drawn_as_levels


def test_short_demo_writes_samples_and_a_checkpoint_that_fastflow_train_resumes(tmp_path, capsys):
    """The demo's checkpoint held no training state: `fastflow train --resume` refused it."""
    bpd = main(["--steps", "5", "--batch", "16", "--out", str(tmp_path)])
    assert math.isfinite(bpd)
    assert assert_drawn_as_levels(tmp_path / "samples-000005.png", 17)  # the digits' 17 levels, black to white
    model, payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["extra"]["heldout_bits_per_dim"] == pytest.approx(bpd)
    assert f"wrote {tmp_path / 'checkpoint.pt'} and {tmp_path / 'samples-000005.png'}\n" in capsys.readouterr().out
    resume = ["train", "--out", str(tmp_path), "--resume", "--iterations", "7", "--quiet"]
    assert cli_main([*resume, "--resolution", "8"]) == 0  # the flags stored as fastflow train stores them
    resumed, payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["extra"]["step"] == 7 and payload["extra"]["cli"]["batch"] == 16
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))


def test_the_checkpoint_stores_train_s_flags_so_resume_refuses_a_contradiction(tmp_path):
    """Without them --resume fell back to the stored TrainConfig, which has no model flags: --levels 3 passed."""
    main(["--steps", "2", "--batch", "16", "--out", str(tmp_path)])
    flags = load_checkpoint(tmp_path / "checkpoint.pt")[1]["extra"]["cli"]
    want = {**TRAIN_DEFAULTS, "resolution": 8, "iterations": 2, "batch": 16, "save_every": 0, "eval_every": 0}
    assert flags == want
    assert cli_main(["train", "--out", str(tmp_path), "--resume", "--levels", "3", "--quiet"]) == 2


def test_a_replaced_checkpoint_is_said(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("fastflow.demo.train", lambda *args, **kwargs: None)
    monkeypatch.setattr("fastflow.demo.evaluate_bits_per_dim", lambda *args, **kwargs: 3.0)
    main(["--steps", "1", "--out", str(tmp_path)])
    assert "replacing" not in capsys.readouterr().out
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    main(["--steps", "1", "--out", str(tmp_path)])
    assert f"replacing the checkpoint of an earlier run in {tmp_path}\n" in capsys.readouterr().out


def test_ctrl_c_before_the_training_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("fastflow.demo.load_digits", interrupted)
    with pytest.raises(SystemExit) as caught:
        main(["--steps", "1", "--out", str(tmp_path / "demo")])
    assert caught.value.code == 130
    assert capsys.readouterr().err == "python -m fastflow.demo: interrupted\n"
    assert not (tmp_path / "demo").exists()


def test_help_names_the_module_and_says_what_every_flag_is(capsys):
    """It showed `usage: demo.py` and nothing for --steps, --batch and --seed."""
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m fastflow.demo")
    for flag, what in [("--steps", "training steps"), ("--batch", "images per step"), ("--seed", "seed of")]:
        assert what in text.split(flag)[-1].splitlines()[0]


def test_usage_errors_and_a_diverged_run_are_one_line_naming_what_to_do(tmp_path, capsys, monkeypatch):
    """argparse printed its usage too; a diverged run's hint named --lr and --warmup, which the demo lacks."""
    from fastflow.train import TrainingDiverged

    with pytest.raises(SystemExit) as caught:
        main(["--steps", "0", "--out", str(tmp_path / "demo")])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "python -m fastflow.demo: error: argument --steps: must be an integer >= 1, got '0' "
        "(see python -m fastflow.demo --help)"
    ]

    def diverge(*args, **kwargs):
        raise TrainingDiverged(3, "non-finite loss")

    monkeypatch.setattr("fastflow.demo.train", diverge)
    with pytest.raises(SystemExit) as caught:
        main(["--steps", "5", "--out", str(tmp_path / "demo")])
    assert caught.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith("try fastflow train with a lower --lr or a longer --warmup") and "step 3" in line
    assert not (tmp_path / "demo").exists()


def test_a_run_that_fails_is_one_line_and_leaves_no_out_folder(tmp_path, capsys, monkeypatch):
    """A batch too large to allocate gave a traceback and left an empty --out (made before the training)."""
    import fastflow.train as train_module

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train_module, "batch_at_step", fail)
    with pytest.raises(SystemExit) as caught:
        main(["--steps", "5", "--batch", "16", "--out", str(tmp_path / "demo")])
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert err.endswith("python -m fastflow.demo: error: RuntimeError: DefaultCPUAllocator: can't allocate memory\n")
    assert err.count("\n") == 1 and not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_full_demo_reaches_target_bits_per_dim(tmp_path):
    torch.set_num_threads(2)
    bpd = main(["--out", str(tmp_path)])
    assert bpd <= 2.4


def test_an_unwritable_out_fails_before_training(tmp_path, capsys, monkeypatch):
    """--out was checked only when the results were written, after the training."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr("fastflow.demo.train", lambda *args, **kwargs: pytest.fail("trained before checking --out"))
    with pytest.raises(SystemExit) as caught:
        main(["--steps", "5", "--out", str(blocker / "demo")])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"--out '{blocker / 'demo'}' is not a writable folder" in err
    assert blocker.read_text() == "not a folder"


def test_a_seed_out_of_a_generator_s_range_is_a_usage_error(tmp_path, capsys):
    """It overflowed in torch.manual_seed with a traceback, leaving an empty --out."""
    with pytest.raises(SystemExit) as caught:
        main(["--steps", "1", "--seed", str(2**64), "--out", str(tmp_path / "demo")])
    assert caught.value.code == 2
    assert "--seed" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes_it(tmp_path, capsys, monkeypatch):
    """The demo kept nothing on Ctrl-C (a run of minutes lost); now it saves where it stopped, as train does."""
    from tests.test_train import _interrupt_at

    _interrupt_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as caught:
        main(["--steps", "5", "--batch", "16", "--out", str(tmp_path)])
    assert caught.value.code == 130
    err = capsys.readouterr().err
    assert "stopping after this step to save a checkpoint" in err
    assert f"interrupted at step 2; resume with: {sys.executable} -m fastflow train --out {tmp_path} --resume" in err
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1]["extra"]["step"] == 2


def test_samples_that_cannot_be_drawn_cost_the_grid_not_the_checkpoint(tmp_path, capsys, monkeypatch):
    """The grid was written first: non-finite samples raised and the trained model was never saved."""
    from fastflow.models import Glow

    real = Glow.sample

    def non_finite(self, *args, **kwargs):
        samples = real(self, *args, **kwargs)
        samples.view(-1)[0] = float("inf")
        return samples

    monkeypatch.setattr(Glow, "sample", non_finite)
    with pytest.warns(RuntimeWarning, match="no sample grid at step 2"):
        bpd = main(["--steps", "2", "--batch", "16", "--out", str(tmp_path)])
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1]["extra"]["heldout_bits_per_dim"] == pytest.approx(bpd)
    assert not list(tmp_path.glob("samples*"))
    assert f"wrote {tmp_path / 'checkpoint.pt'}\n" in capsys.readouterr().out
