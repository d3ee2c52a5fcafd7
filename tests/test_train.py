"""The training loop: step-seeded batches, exact resume, checkpoints that survive a killed write, mixed precision."""

from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch

from fastflow.checkpoint import load_checkpoint
from fastflow.data import TensorImages, batch_at_step
from fastflow.models import Glow
from fastflow.train import (
    CHECKPOINT_NAME,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    evaluate_bits_per_dim,
    initialize_actnorm,
    train,
)

N_BINS = 17


def _data() -> torch.Tensor:
    return torch.randint(0, N_BINS, (48, 1, 4, 4), generator=torch.Generator().manual_seed(3))


def _model(seed: int = 0) -> Glow:
    torch.manual_seed(seed)
    return Glow(1, 4, levels=1, steps=2, hidden=8, n_bins=N_BINS)


def _config(out, steps: int, progress: bool = False, **kw) -> TrainConfig:
    return TrainConfig(steps=steps, batch=8, lr=1e-2, warmup=2, progress=progress, out=str(out), samples=4, **kw)


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


@pytest.mark.parametrize("saved, resumed", [(True, False), (False, True)])
def test_resume_in_the_other_channels_last_layout_matches_the_uninterrupted_run(tmp_path, saved, resumed):
    """The Adam moments saved in one layout follow the parameters into the other (the fused CPU Adam ignores
    strides: each weight got another element's moments, 4e-2 off after three steps). Float64: the layouts then
    differ by rounding alone."""
    full_model = _model().double()
    train(full_model, _data(), _config(tmp_path / "full", 6, channels_last=saved))
    train(_model().double(), _data(), _config(tmp_path / "split", 3, channels_last=saved))
    resumed_model = _model(seed=1).double()
    train(resumed_model, _data(), _config(tmp_path / "split", 6, channels_last=resumed), resume=True)
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=1e-10, atol=1e-12, msg=name)


def _progress_losses(err: str) -> dict[str, str]:
    """``{"4/6": "loss 1.234 bits/dim", ...}`` from the lines of a progress log."""
    return {m.group(1): m.group(2) for m in re.finditer(r"train (\d+/\d+) .*?(loss \S+ bits/dim)", err)}


def test_a_resumed_run_shows_the_progress_loss_of_the_uninterrupted_run(tmp_path, capsys):
    """The mean of the last 50 losses goes on from the checkpoint's losses (it restarted from none)."""
    train(_model(), _data(), _config(tmp_path / "full", 6, progress=True))
    full = _progress_losses(capsys.readouterr().err)
    train(_model(), _data(), _config(tmp_path / "split", 3))
    capsys.readouterr()
    train(_model(seed=1), _data(), _config(tmp_path / "split", 6, progress=True), resume=True)
    resumed = _progress_losses(capsys.readouterr().err)
    assert list(resumed) == ["4/6", "5/6", "6/6"]
    assert resumed == {step: full[step] for step in resumed}
    _, payload = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)
    assert len(payload["extra"]["recent_losses"]) == 6


def test_every_progress_line_shows_the_loss_up_to_its_step(capsys, monkeypatch):
    """Past 500 steps a line comes every 5% of the run, which READ_EVERY did not divide: the lines showed the
    losses of the last read, up to 24 steps before theirs (here scaled down: reads every 2 steps, lines every 3)."""
    import fastflow.train as train_module

    monkeypatch.setattr(train_module, "READ_EVERY", 2)
    history = train(_model(), _data(), TrainConfig(steps=60, batch=8, lr=1e-3, progress=True))
    shown = _progress_losses(capsys.readouterr().err)
    for step in (3, 9, 15, 30, 60):
        recent = history[max(0, step - 50) : step]
        assert shown[f"{step}/60"] == f"loss {sum(recent) / len(recent):.3f} bits/dim"


def test_resume_from_a_checkpoint_without_its_recent_losses(tmp_path, capsys):
    """Checkpoints written before the progress losses were kept still resume; progress starts from none."""
    train(_model(), _data(), _config(tmp_path, 2))
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    del payload["extra"]["recent_losses"]
    torch.save(payload, path)
    capsys.readouterr()
    history = train(_model(seed=1), _data(), _config(tmp_path, 4, progress=True), resume=True)
    assert len(history) == 2
    assert _progress_losses(capsys.readouterr().err)["3/4"] == f"loss {history[0]:.3f} bits/dim"


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
    assert not [name for name in os.listdir(out) if name.startswith(".")], "temporary file left behind"
    rest = train(_model(seed=1), _data(), _config(out, 6, save_every=2), resume=True)
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full[2:]), rtol=1e-6, atol=1e-6)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train(_model(), _data(), _config(tmp_path, 2), resume=True)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda payload: payload.update(optimizer="junk"), "its optimizer state is not an optimizer's state_dict"),
        (lambda payload: payload["extra"].pop("scaler"), "its training state needs a loss-scaler dict and an int step"),
        (
            lambda payload: payload["extra"].update(step="2"),
            "its training state needs a loss-scaler dict and an int step",
        ),
    ],
)
def test_resume_from_a_damaged_training_state_names_the_file(tmp_path, damage, named):
    train(_model(), _data(), _config(tmp_path, 2))
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    damage(payload)
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"cannot resume from .*{CHECKPOINT_NAME}.*: {named}"):
        train(_model(seed=1), _data(), _config(tmp_path, 4), resume=True)


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


def test_actnorm_initialisation_takes_a_vector_flow_and_its_context():
    """It ran ``bits_per_dim``, which a flow without ``n_bins`` refuses (the README points compile users to it)."""
    from fastflow.models import TabularFlow

    model = TabularFlow(4, context=2, transforms=2, hidden=16)
    x = torch.randn(32, 4) * 3 + 1
    initialize_actnorm(model, x, torch.randn(32, 2))
    first = next(m for m in model.modules() if type(m).__name__ == "ActNorm")
    torch.testing.assert_close(first.bias.flatten(), -x.mean(dim=0))


def test_data_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"data must have shape \(N, 1, 4, 4\) .*got \(4, 1, 8, 8\)"):
        train(_model(), torch.zeros(4, 1, 8, 8, dtype=torch.long), TrainConfig(steps=1, progress=False))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: train(m, _data().numpy(), TrainConfig(steps=1)), TypeError, "data must be a tensor of integer"),
        (lambda m: train(m, _data(), {"steps": 1}), TypeError, "config must be a TrainConfig, got dict"),
        (lambda m: train(m, _data().float(), TrainConfig(steps=1)), TypeError, "data must be an integer tensor"),
        (lambda m: evaluate_bits_per_dim(m, _data()[:0]), ValueError, r"levels must .*N >= 1"),
        (lambda m: evaluate_bits_per_dim(m, _data(), batch=0), ValueError, "batch must be >= 1, got 0"),
    ],
)
def test_train_and_evaluate_name_the_bad_argument(call, error, match):
    """They failed with an AttributeError, a ZeroDivisionError or range()'s message, or named "levels" for data."""
    with pytest.raises(error, match=match):
        call(_model())


def _interrupt_at(monkeypatch, at_step: int) -> None:
    """Send ourselves SIGINT (Ctrl-C) while the loop fetches the batch of 0-based step ``at_step``."""
    import signal

    import fastflow.train as train_module

    real = train_module.batch_at_step

    def fetch(source, step, *args, **kwargs):
        if step == at_step:
            signal.raise_signal(signal.SIGINT)
        return real(source, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_at_step", fetch)


def test_ctrl_c_finishes_the_step_saves_and_resumes_to_the_same_curve(tmp_path, monkeypatch, capsys):
    full = train(_model(), _data(), _config(tmp_path / "full", 6))
    out = tmp_path / "run"
    _interrupt_at(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted) as info:
        train(_model(), _data(), _config(out, 6, save_every=5))
    assert info.value.step == 3 and info.value.checkpoint == str(out / CHECKPOINT_NAME)
    assert isinstance(info.value, KeyboardInterrupt)
    assert load_checkpoint(out / CHECKPOINT_NAME)[1]["extra"]["step"] == 3
    assert "stopping after this step to save a checkpoint (Ctrl-C again" in capsys.readouterr().err
    monkeypatch.undo()
    rest = train(_model(seed=1), _data(), _config(out, 6, save_every=5), resume=True)
    assert len(rest) == 3
    torch.testing.assert_close(torch.tensor(rest), torch.tensor(full[3:]), rtol=1e-6, atol=1e-6)


def test_a_non_finite_loss_names_the_global_step(tmp_path, monkeypatch):
    import fastflow.train as train_module

    real, model = train_module.batch_at_step, _model()

    def poisoned(source, step, *args, **kwargs):
        if step == 4:  # as if the update of step 4 had blown a weight up
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real(source, step, *args, **kwargs)

    train(_model(), _data(), _config(tmp_path, 3))
    monkeypatch.setattr(train_module, "batch_at_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 5 \(non-finite") as info:
        train(model, _data(), _config(tmp_path, 6), resume=True)
    assert info.value.step == 5 and isinstance(info.value, FloatingPointError)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["extra"]["step"] == 3, "the last checkpoint survives"


@pytest.mark.parametrize("clip", [50.0, 0.0])
def test_non_finite_gradients_at_a_finite_loss_name_their_step_and_never_reach_the_weights(clip):
    """A gradient that blows up while the loss stays finite (here: a hook on step 3's backward) is caught like a
    non-finite loss: that step is named and its update, and every later one, skipped."""
    model, steps_done = _model(), []
    weight = next(model.parameters())

    def blow_up(grad: torch.Tensor) -> torch.Tensor:
        steps_done.append(1)
        return grad * float("inf") if len(steps_done) == 3 else grad

    weight.register_hook(blow_up)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 3 \(non-finite gradient norm") as info:
        train(model, _data(), TrainConfig(steps=6, batch=8, progress=False, clip=clip))
    assert info.value.step == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_first_failing_step_is_named_when_a_later_step_s_loss_is_not_finite(monkeypatch):
    """A non-finite gradient norm on step 2 (finite loss), then a NaN loss on step 4 in the same read window: the
    losses were searched first, so step 4 was named though the weights had been frozen from step 2."""
    import fastflow.train as train_module

    model, fetched = _model(), []
    real = train_module.batch_at_step

    def fetch(source, step, *args, **kwargs):
        fetched.append(step)
        if step == 3:  # the forward of step 4 (1-based) comes out NaN
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return real(source, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_at_step", fetch)
    next(model.parameters()).register_hook(lambda grad: grad * float("inf") if fetched[-1] == 1 else grad)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 2 \(non-finite gradient norm") as info:
        train(model, _data(), TrainConfig(steps=6, batch=8, progress=False))
    assert info.value.step == 2


def test_resume_from_a_checkpoint_of_a_non_fused_adam(tmp_path):
    """Checkpoints written before the training step went sync-free hold a non-fused Adam's settings."""
    train(_model(), _data(), _config(tmp_path, 2))
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    for group in payload["optimizer"]["param_groups"]:
        group["fused"] = None
    torch.save(payload, path)
    assert len(train(_model(seed=1), _data(), _config(tmp_path, 4), resume=True)) == 2


def test_resume_from_an_optimizer_state_of_other_parameters_is_a_clear_error(tmp_path):
    """As for checkpoints written before the LU factors were packed: one optimizer entry more per 1x1 conv."""
    train(_model(), _data(), _config(tmp_path, 2))
    path = tmp_path / CHECKPOINT_NAME
    payload = torch.load(path, weights_only=True)
    payload["optimizer"]["param_groups"][0]["params"].append(10_000)
    torch.save(payload, path)
    with pytest.raises(ValueError, match="cannot resume from .*optimizer state does not fit"):
        train(_model(seed=1), _data(), _config(tmp_path, 4), resume=True)


def test_labels_outside_the_classes_are_refused_before_training():
    model = Glow(1, 4, levels=1, steps=1, hidden=8, n_bins=N_BINS, num_classes=3)
    labels = torch.arange(len(_data())) % 4
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\), got values in \[0, 3\]"):
        train(model, _data(), TrainConfig(steps=2, batch=8, progress=False), labels=labels)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_resume_refuses_other_run_settings(tmp_path):
    """Refused, and the caller's model keeps its own weights (the checkpoint's had been loaded into it first)."""
    train(_model(), _data(), _config(tmp_path, 2))
    model = _model(seed=1)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lr=0.5 \(checkpoint: 0.01\), batch|batch=4 \(checkpoint: 8\), .*lr=0.5"):
        train(model, _data(), TrainConfig(steps=4, batch=4, lr=0.5, warmup=2, out=str(tmp_path)), resume=True)
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items())
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)[0].state_dict()
    assert not all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # they differ: a real check


@pytest.mark.parametrize(
    "bad, error, named",
    [
        ({"steps": 2.5}, TypeError, "steps must be an int, got float 2.5"),
        ({"steps": 0}, ValueError, "steps must be >= 1, got 0"),
        ({"warmup": float("nan")}, TypeError, "warmup must be an int, got float nan"),
        ({"batch": 0}, ValueError, "batch must be >= 1, got 0"),
        ({"save_every": -1}, ValueError, "save_every must be >= 0, got -1"),
        ({"samples": True}, TypeError, "samples must be an int, got bool True"),
        ({"lr": True}, TypeError, "lr must be a real number, got bool True"),  # was taken as 1.0
        ({"clip": True}, TypeError, "clip must be a real number"),
        ({"temperature": True}, TypeError, "temperature must be a real number"),  # failed at the first grid
        ({"seed": 2**64}, ValueError, "seed must be < 2"),  # failed at the first grid, after the training
        ({"channels_last": "no"}, TypeError, "channels_last must be a bool or None, got str 'no'"),  # was on
        ({"progress": "yes"}, TypeError, "progress must be a bool, got str 'yes'"),
        ({"quiet": 1}, TypeError, "quiet must be a bool, got int 1"),
        ({"out": 5}, TypeError, r"out must be a folder path \(str or os.PathLike\) or None, got int 5"),
        ({"out": b"run"}, TypeError, "out must be a folder path"),
    ],
)
def test_integer_settings_are_checked(bad, error, named):
    with pytest.raises(error, match=named):
        TrainConfig(**bad)


def test_out_may_be_a_path_and_is_stored_as_a_str(tmp_path):
    assert TrainConfig(out=tmp_path).out == str(tmp_path)  # a checkpoint stores the config: plain values only


def test_an_unwritable_out_fails_before_the_first_step(tmp_path):
    """``out`` is checked before the training (it was found out by the first save, after all the steps)."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"config.out '{taken}' is not a writable folder"):
        train(model, _data(), _config(taken, 2))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)), "a step ran"


def test_a_class_conditional_run_writes_its_grids_and_evaluates_with_heldout_labels(tmp_path, capsys):
    torch.manual_seed(0)
    model = Glow(1, 4, levels=1, steps=1, hidden=8, n_bins=N_BINS, num_classes=3)
    data = _data()
    labels = torch.arange(len(data)) % 3
    config = TrainConfig(steps=2, batch=8, progress=False, out=str(tmp_path), samples=4, eval_every=1)
    with pytest.raises(ValueError, match="heldout_labels is required"):  # a conditional model's held-out data
        train(model, data, config, labels=labels, heldout=data[:6])
    history = train(model, data, config, labels=labels, heldout=data[:6], heldout_labels=labels[:6])
    assert len(history) == 2 and (tmp_path / CHECKPOINT_NAME).exists()
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["extra"]["heldout_bits_per_dim"] is not None
    assert sorted(p.name for p in tmp_path.glob("samples-*.png")) == ["samples-000002.png"]


@pytest.mark.parametrize("where", ["data", "heldout"])
def test_levels_out_of_range_are_refused_before_the_first_step(tmp_path, where):
    data = _data().clone()
    bad = data.clone()
    bad[5, 0, 1, 1] = N_BINS + 2
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    args = {"data": bad} if where == "data" else {"data": data, "heldout": bad[:8]}
    with pytest.raises(ValueError, match=rf"{where} must lie in \[0, n_bins\) = \[0, {N_BINS}\)"):
        train(model, config=_config(tmp_path, 2), **args)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [{"lr": float("nan")}, {"clip": float("inf")}, {"temperature": float("nan")}])
def test_non_finite_settings_are_refused(bad):
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a finite number"):
        TrainConfig(**bad)


def test_progress_in_a_log_is_plain_lines_with_global_steps(tmp_path, capsys):
    train(_model(), _data(), _config(tmp_path, 2))
    capsys.readouterr()
    config = TrainConfig(steps=5, batch=8, lr=1e-2, warmup=2, out=str(tmp_path), samples=4)
    train(_model(), _data(), config, resume=True)  # progress=True, stderr captured: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["train 3/5", "train 4/5", "train 5/5"]
    assert all("steps/s" in line and "bits/dim" in line for line in lines)


def test_progress_lines_are_few_whatever_the_run_length():
    import io

    from fastflow.progress import Progress

    stream = io.StringIO()
    progress = Progress(1000, initial=0, stream=stream)
    for step in range(1, 1001):
        progress.update(step, "loss 1.0")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and lines[0].startswith("train 50/1000 (5%)") and "\r" not in stream.getvalue()


def test_progress_on_a_terminal_is_a_tqdm_bar_at_the_global_step():
    import io

    from fastflow.progress import Progress

    stream = io.StringIO()
    progress = Progress(300, initial=100, stream=stream, bar=True)
    progress.update(101, "loss 1.0")
    progress.close()
    assert "101/300" in stream.getvalue() and "\r" in stream.getvalue()


def test_quiet_prints_nothing(tmp_path, capsys):
    train(_model(), _data(), _config(tmp_path, 4, eval_every=2, quiet=True), heldout=_data()[:8])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_a_non_finite_batch_names_its_step(tmp_path, monkeypatch):
    """A NaN pixel in step 4's batch: the updates from it on are skipped and the error names the step (it was a
    bare ValueError from the diagnosis)."""
    import fastflow.train as train_module

    real = train_module.batch_at_step

    def poisoned(source, step, *args, **kwargs):
        x, y = real(source, step, *args, **kwargs)
        if step == 3:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(train_module, "batch_at_step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 4 \(x holds 1 non-finite") as info:
        train(_model(), _data(), _config(tmp_path, 6))
    assert info.value.step == 4


def test_a_sample_grid_that_cannot_be_drawn_warns_and_keeps_the_checkpoint(tmp_path):
    """Non-finite samples (here too hot a temperature) cost the grid, not the checkpoint (which came after it):
    ``written`` names the checkpoint alone (the CLI claimed the grid too) and the warning is one line (it echoed a
    line of train.py's source, under --quiet too)."""
    written = ["stale"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_model(), _data(), _config(tmp_path, 2, save_every=2, temperature=1e30), written=written)
    assert [str(w.message).split(":")[0] for w in caught] == ["no sample grid at step 2"]
    assert all(w.category is RuntimeWarning for w in caught)
    shown = warnings.formatwarning(caught[0].message, caught[0].category, caught[0].filename, caught[0].lineno)
    assert shown.count("\n") == 1, shown
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["extra"]["step"] == 2
    assert not list(tmp_path.glob("samples-*.png"))
    assert written == [str(tmp_path / CHECKPOINT_NAME)]


def test_written_names_the_files_of_the_last_save(tmp_path):
    written: list[str] = []
    train(_model(), _data(), _config(tmp_path, 4, save_every=2), written=written)
    assert written == [str(tmp_path / CHECKPOINT_NAME), str(tmp_path / "samples-000004.png")]
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT_NAME, "samples-000002.png", "samples-000004.png"]


def test_channels_last_is_refused_for_vectors():
    from fastflow.models import TabularFlow
    from fastflow.step import TrainStep, make_adam

    model = TabularFlow(4, transforms=1, hidden=4)
    with pytest.raises(ValueError, match=r"channels_last=True is for image batches .* \(B, 4\)"):
        TrainStep(model, model, make_adam(model.parameters(), 1e-3), channels_last=True)


@pytest.mark.parametrize("key", ["recent_losses", "step", "optimizer"])
def test_checkpoint_extra_may_not_take_the_entries_train_writes(tmp_path, key):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=rf"checkpoint_extra may not use \['{key}'\]"):
        train(model, _data(), _config(tmp_path, 2), checkpoint_extra={key: "mine"})
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not os.listdir(tmp_path)


def test_a_checkpoint_extra_value_a_checkpoint_cannot_hold_is_refused_before_the_first_step(tmp_path):
    """A numpy scalar failed the first save, after the steps before it had run, and left no checkpoint."""
    import numpy as np

    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"extra 'lr_found' is a numpy.float64, which a checkpoint cannot hold"):
        train(model, _data(), _config(tmp_path, 2), checkpoint_extra={"lr_found": np.float64(1e-3)})
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before)) and not os.listdir(tmp_path)


def test_levels_out_of_range_are_refused_before_training_whether_a_tensor_or_tensor_images(tmp_path):
    """The batches skip the range check (a host read per step): the whole set is checked once, before the first
    step, also when the caller wraps it in a TensorImages."""
    bad = _data().clone()
    bad[0, 0, 0, 0] = N_BINS
    for data, name in ((bad, "data"), (TensorImages(bad), "data.levels")):
        with pytest.raises(ValueError, match=rf"{name} must lie in \[0, n_bins\)"):
            train(_model(), data, _config(tmp_path, 2))


def test_batches_go_to_a_gpu_through_page_locked_memory_without_blocking(monkeypatch):
    """The logic of the copy (the GPU test checks its values): pinned, then non-blocking; no pinning on the CPU."""
    from fastflow.train import _to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: calls.append(("to", a, k)) or t)
    x = torch.zeros(2)
    _to_device(x, torch.device("cuda"), torch.float64)
    assert calls == ["pin", ("to", (torch.device("cuda"), torch.float64), {"non_blocking": True})]
    calls.clear()
    _to_device(x, torch.device("cpu"), torch.float64)
    assert calls == [("to", (torch.device("cpu"), torch.float64), {})]


def test_numpy_numbers_in_the_config_are_stored_as_plain_floats(tmp_path):
    """np.float64 is a float, so it passed the checks, then failed the first save (after the training)."""
    import numpy as np

    lr, clip, temperature = np.logspace(-3, -2, 3)[1], np.float32(5.0), np.float64(0.5)
    config = TrainConfig(steps=2, batch=8, lr=lr, clip=clip, temperature=temperature, out=str(tmp_path), samples=4)
    assert all(type(getattr(config, name)) is float for name in ("lr", "clip", "temperature"))
    train(_model(), _data(), config)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)[1]["extra"]["train_config"]["lr"] == config.lr


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"step_mode": "cuda-graph"}, "needs a model on a CUDA device"),
        ({"step_mode": "cuda-graph", "amp": "fp16"}, "cuda-graph"),
    ],
)
@pytest.mark.parametrize("resume", [False, True])
def test_settings_the_step_cannot_run_are_refused_before_anything_changes(tmp_path, settings, match, resume):
    """They were refused by TrainStep, after train() had loaded the checkpoint into the model (resume), made the
    output folder and initialised ActNorm."""
    out = tmp_path / "run"
    if resume:
        train(_model(seed=1), _data(), _config(out, 2))
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        train(model, _data(), _config(out, 4, **settings), resume=resume)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert out.exists() == resume


def test_a_model_with_nothing_to_train_is_refused_before_anything_changes(tmp_path):
    model = _model().requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no parameters that require grad"):
        train(model, _data(), _config(tmp_path / "run", 2))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not (tmp_path / "run").exists()


def test_label_errors_name_the_argument_and_a_prior_of_your_own_keeps_its_check():
    from fastflow.models.priors import GaussianPrior
    from fastflow.train import evaluate_bits_per_dim

    model = Glow(1, 4, levels=1, steps=1, hidden=8, n_bins=N_BINS, num_classes=3)
    with pytest.raises(ValueError, match=r"^labels must be in \[0, 3\), got values in \[0, 4\]"):  # said "context"
        evaluate_bits_per_dim(model, _data()[:8], torch.arange(8) % 5)
    from fastflow.models import Jet

    with_context = Jet(1, 4, patch_size=2, couplings=2, width=8, depth=1, heads=2, context=3, n_bins=N_BINS)
    assert math.isfinite(evaluate_bits_per_dim(with_context, _data()[:4], torch.randn(4, 3)))  # a context, not labels

    class SevenLabels:
        image_shape = (1, 4, 4)

        def draw(self, n, generator):
            return torch.randint(0, N_BINS, (n, 1, 4, 4), generator=generator), torch.full((n,), 7)

    with pytest.raises(ValueError, match=r"^the labels data.draw\(\) returned must be in \[0, 3\)"):
        train(model, SevenLabels(), TrainConfig(steps=1, batch=8, progress=False))

    class OwnCheck(GaussianPrior):  # written to check_labels(y), before the callers named the labels
        def check_labels(self, y):
            super().check_labels(y)

    model = Glow(1, 4, levels=1, steps=1, hidden=8, n_bins=N_BINS, num_classes=3)
    model.prior.__class__ = OwnCheck
    labels = torch.arange(len(_data())) % 3
    train(model, _data(), TrainConfig(steps=1, batch=8, progress=False), labels=labels)
    with pytest.raises(ValueError, match=r"^heldout_labels must be in"):
        train(model, _data(), TrainConfig(steps=1, batch=8, progress=False), labels=labels,
              heldout=_data()[:8], heldout_labels=torch.full((8,), 5))  # fmt: skip
