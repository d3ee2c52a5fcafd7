"""Checkpoints: exact round trip, architecture mismatch named, atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

from fastflow.checkpoint import load_checkpoint, save_checkpoint
from fastflow.models import Glow, RealNVP
from tests.helpers import perturb_parameters


def _trained_glow() -> Glow:
    model = Glow(1, 4, levels=2, steps=2, hidden=8, n_bins=17).train()
    model.log_prob(torch.rand(8, 1, 4, 4) - 0.5)
    perturb_parameters(model)
    return model.eval()


def test_round_trip_restores_outputs_and_optimizer(tmp_path):
    model = _trained_glow()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.log_prob(torch.rand(4, 1, 4, 4) - 0.5).mean().backward()
    optimizer.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, optimizer, step=7)
    loaded, payload = load_checkpoint(path)
    assert isinstance(loaded, Glow) and payload["extra"] == {"step": 7}
    loaded.eval()
    x = torch.rand(3, 1, 4, 4) - 0.5
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), rtol=0, atol=0)
    assert all(bool(m.initialized) for m in loaded.modules() if hasattr(m, "initialized"))
    assert payload["optimizer"]["state"], "optimizer state must be saved"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "no temporary file may be left behind"


def test_loading_into_a_different_architecture_names_the_file(tmp_path):
    path = tmp_path / "glow.pt"
    save_checkpoint(path, _trained_glow())
    with pytest.raises(ValueError, match="glow.pt.*does not match"):
        load_checkpoint(path, RealNVP(1, 4, scales=2, hidden=8))
    with pytest.raises(ValueError, match="glow.pt.*does not match"):
        load_checkpoint(path, Glow(1, 4, levels=2, steps=3, hidden=8, n_bins=17))


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pt"):
        load_checkpoint(path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model = _trained_glow()
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()

    def killed_mid_write(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
