"""The ``make demo`` job: a short run writes its outputs; the full run meets the bits/dim target."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.checkpoint import load_checkpoint
from fastflow.demo import main
from tests.helpers import assert_drawn_as_levels


def test_short_demo_writes_samples_and_checkpoint(tmp_path):
    bpd = main(["--steps", "5", "--batch", "16", "--out", str(tmp_path)])
    assert math.isfinite(bpd)
    assert assert_drawn_as_levels(tmp_path / "samples.png", 17)  # the digits' 17 levels, black to white
    model, payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["extra"]["heldout_bits_per_dim"] == pytest.approx(bpd)


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


def test_ctrl_c_stops_the_demo_with_one_line_and_no_promise_of_a_checkpoint(tmp_path, capsys, monkeypatch):
    """The handler promised a checkpoint the demo never saves, then a TrainingInterrupted traceback followed."""
    from tests.test_train import _interrupt_at

    _interrupt_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as caught:
        main(["--steps", "5", "--batch", "16", "--out", str(tmp_path)])
    assert caught.value.code == 130
    err = capsys.readouterr().err
    assert "stopping after this step (Ctrl-C again stops at once)" in err and "to save a checkpoint" not in err
    assert "interrupted at step 2: nothing written" in err
    assert list(tmp_path.iterdir()) == []


def test_samples_that_cannot_be_drawn_cost_the_grid_not_the_checkpoint(tmp_path, capsys, monkeypatch):
    """The grid was written first: non-finite samples raised and the trained model was never saved."""
    from fastflow.models import Glow

    real = Glow.sample

    def non_finite(self, *args, **kwargs):
        samples = real(self, *args, **kwargs)
        samples.view(-1)[0] = float("inf")
        return samples

    monkeypatch.setattr(Glow, "sample", non_finite)
    with pytest.warns(RuntimeWarning, match="no sample grid"):
        bpd = main(["--steps", "2", "--batch", "16", "--out", str(tmp_path)])
    assert load_checkpoint(tmp_path / "checkpoint.pt")[1]["extra"]["heldout_bits_per_dim"] == pytest.approx(bpd)
    assert not (tmp_path / "samples.png").exists()
    assert f"wrote {tmp_path / 'checkpoint.pt'}\n" in capsys.readouterr().out
