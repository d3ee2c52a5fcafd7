"""The training loop: step-seeded batches, exact resume, checkpoints that survive a killed write, mixed precision."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fastflow.checkpoint import load_checkpoint
from fastflow.data import TensorImages, batch_at_step
from fastflow.models import Glow
from fastflow.train import CHECKPOINT_NAME, TrainConfig, initialize_actnorm, train

N_BINS = 17


def _data() -> torch.Tensor:
    return torch.randint(0, N_BINS, (48, 1, 4, 4), generator=torch.Generator().manual_seed(3))


def _model(seed: int = 0) -> Glow:
    torch.manual_seed(seed)
    return Glow(1, 4, levels=1, steps=2, hidden=8, n_bins=N_BINS)


def _config(out, steps: int, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch=8, lr=1e-2, warmup=2, progress=False, out=str(out), samples=4, **kw)


def test_batches_depend_only_on_seed_and_step():
    source = TensorImages(_data())
    x, _ = batch_at_step(source, 5, 8, N_BINS, seed=1)
    torch.rand(100)  # the global RNG must not matter
    again, _ = batch_at_step(source, 5, 8, N_BINS, seed=1)
    torch.testing.assert_close(again, x, rtol=0, atol=0)
    assert not torch.equal(batch_at_step(source, 6, 8, N_BINS, seed=1)[0], x)
    assert not torch.equal(batch_at_step(source, 5, 8, N_BINS, seed=2)[0], x)


def test_learning_rate_warms_up_linearly():
    config = TrainConfig(lr=1e-3, warmup=4)
    assert [config.lr_at(s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path):
    full_model = _model()
    full = train(full_model, _data(), _config(tmp_path / "full", 6))

    first = train(_model(), _data(), _config(tmp_path / "split", 3))
    resumed_model = _model(seed=1)  # other initial weights: everything must come from the checkpoint
    second = train(resumed_model, _data(), _config(tmp_path / "split", 6), resume=True)

    assert len(first) == 3 and len(second) == 3
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(full), rtol=1e-6, atol=1e-6)
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=1e-6, atol=1e-6, msg=name)
    _, payload = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert payload["extra"]["step"] == 6
    assert sorted(os.listdir(tmp_path / "split")) == [CHECKPOINT_NAME, "samples-000003.png", "samples-000006.png"]


def test_a_run_killed_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    full = train(_model(), _data(), _config(tmp_path / "full", 6))
    real_save, calls = torch.save, []

    def killed_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _data(), _config(out, 6, save_every=2))
    monkeypatch.setattr(torch, "save", real_save)

    _, payload = load_checkpoint(out / CHECKPOINT_NAME)
    assert payload["extra"]["step"] == 2
    assert not [name for name in os.listdir(out) if name.startswith(".ckpt-")], "temporary file left behind"
    rest = train(_model(seed=1), _data(), _config(out, 6, save_every=2), resume=True)
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full[2:]), rtol=1e-6, atol=1e-6)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train(_model(), _data(), _config(tmp_path, 2), resume=True)


def test_heldout_bits_per_dim_is_reported_and_stored(tmp_path, capsys):
    train(_model(), _data(), _config(tmp_path, 4, eval_every=2), heldout=_data()[:8])
    lines = [line for line in capsys.readouterr().out.splitlines() if "held-out" in line]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]
    _, payload = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert math.isfinite(payload["extra"]["heldout_bits_per_dim"])
    assert f"{payload['extra']['heldout_bits_per_dim']:.3f}" in lines[-1]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_float32(tmp_path, amp):
    reference = train(_model(), _data(), _config(tmp_path / "fp32", 3))
    losses = train(_model(), _data(), _config(tmp_path / amp, 3, amp=amp))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] != reference[-1], "autocast was not applied"
    assert losses == pytest.approx(reference, abs=0.05)
    scaler = load_checkpoint(tmp_path / amp / CHECKPOINT_NAME)[1]["extra"]["scaler"]
    assert (scaler.get("scale", 0) > 0) == (amp == "fp16"), "fp16 must checkpoint its loss scale"


def test_actnorm_initialisation_runs_once_on_the_given_batch():
    model = _model()
    x = batch_at_step(TensorImages(_data()), 0, 8, N_BINS)[0]
    initialize_actnorm(model, x)
    first = model.blocks[0].layers[1].actnorm
    h = model.blocks[0].layers[0](x)[0]  # the squeeze feeding the first ActNorm
    torch.testing.assert_close(first.bias.flatten(), -h.mean(dim=(0, 2, 3)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialize_actnorm(model, x + 0.1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_data_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\).*\(1, 4, 4\)"):
        train(_model(), torch.zeros(4, 1, 8, 8, dtype=torch.long), TrainConfig(steps=1, progress=False))
