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
