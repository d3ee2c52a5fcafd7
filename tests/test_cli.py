"""The ``fastflow`` command line on tiny runs: train (digits, photo crops, image folders, resume), sample,
interpolate, manipulate, and bad input that exits with status 2 naming the file and writing nothing."""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.checkpoint import load_checkpoint, save_checkpoint
from fastflow.cli import _training_data, main
from fastflow.data import split_heldout
from fastflow.image_folder import load_image_folder
from fastflow.models import NSF, Glow, Jet, TabularFlow
from tests.helpers import assert_drawn_as_levels

SCALE = 8  # 8x8 images (plus a 1-pixel border) are enlarged 8 times in the PNGs
TINY = ["--levels", "2", "--steps", "1", "--hidden", "8", "--batch", "16", "--iterations", "4", "--device", "cpu"]


def _folder(path, sizes, mode="RGB", seed=0):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        shape = (h, w, 3) if mode == "RGB" else (h, w)
        Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8)).save(path / f"img{i}.png")
    return path


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert main(["train", *TINY, "--out", str(out), "--save-every", "2", "--eval-every", "2", "--reversible"]) == 0
    return out


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb")
    data = _folder(root / "data", [(12, 9), (8, 8), (20, 30), (9, 16), (10, 10), (16, 8)])
    args = ["--data", str(data), "--resolution", "8", "--n-bits", "3", "--out", str(root / "run")]
    assert main(["train", *TINY, "--levels", "1", *args]) == 0
    return root


def _expect_error(capsys, argv, names, untouched=None):
    before = None if untouched is None else untouched.read_bytes()
    capsys.readouterr()  # drop the output of earlier commands
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert names in err[0] and "error" in err[0]
    if untouched is not None:
        assert untouched.read_bytes() == before, f"{untouched} was overwritten"
    return err[0]


def test_train_writes_checkpoints_sample_grids_and_heldout_bits(digits_run, capsys):
    assert sorted(p.name for p in digits_run.iterdir()) == ["checkpoint.pt", "samples-000002.png", "samples-000004.png"]
    model, payload = load_checkpoint(digits_run / "checkpoint.pt")
    assert payload["extra"]["step"] == 4 and model.config["reversible"] is True
    assert model.image_shape == (1, 8, 8) and model.n_bins == 17
    assert Image.open(digits_run / "samples-000004.png").size == ((8 * 9 + 1) * SCALE, (8 * 9 + 1) * SCALE)


def test_sample_interpolate_and_manipulate_digits(digits_run, tmp_path):
    ckpt = str(digits_run / "checkpoint.pt")
    assert main(["sample", ckpt, "--n", "6", "--temperature", "0.7", "--out", str(tmp_path / "grid.png")]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.std() > 0, "samples must not be constant"
    assert main(["interpolate", ckpt, "digits:0", "digits:1", "--steps", "5", "--out", str(tmp_path / "i.png")]) == 0
    frames = np.asarray(Image.open(tmp_path / "i.png"))
    assert frames.shape == (10 * SCALE, (5 * 9 + 1) * SCALE)
    # each pixel drawn as its level of 17, from black (the digits' background: level 0) to white
    assert_drawn_as_levels(tmp_path / "i.png", 17) and frames.min() == 0
    out = tmp_path / "sub" / "m.png"
    assert main(["manipulate", ckpt, "digits:2", "--label-from", "1", "--label-to", "7", "--out", str(out)]) == 0
    assert Image.open(out).size == ((5 * 9 + 1) * SCALE, 10 * SCALE)
    for path in (tmp_path / "grid.png", out, digits_run / "samples-000004.png"):
        assert_drawn_as_levels(path, 17)


def test_resume_continues_and_a_fresh_run_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "2", "--out", str(out)]) == 0
    ckpt = out / "checkpoint.pt"
    _expect_error(capsys, ["train", *TINY, "--out", str(out)], "checkpoint.pt' exists", untouched=ckpt)
    _expect_error(
        capsys, ["train", *TINY, "--hidden", "16", "--out", str(out), "--resume"], "checkpoint.pt", untouched=ckpt
    )
    assert main(["train", *TINY, "--out", str(out), "--resume"]) == 0
    assert load_checkpoint(ckpt)[1]["extra"]["step"] == 4


def test_train_on_photo_crops(tmp_path):
    out = tmp_path / "photos"
    assert main(["train", *TINY, "--levels", "1", "--resolution", "16", "--batch", "4", "--out", str(out)]) == 0
    model, _ = load_checkpoint(out / "checkpoint.pt")
    assert model.image_shape == (3, 16, 16) and model.n_bins == 32


def test_image_folder_model_interpolates_and_manipulates_files(rgb_run, tmp_path):
    ckpt = str(rgb_run / "run" / "checkpoint.pt")
    model, _ = load_checkpoint(ckpt)
    assert model.image_shape == (3, 8, 8) and model.n_bins == 8
    a, b = (str(rgb_run / "data" / f"img{i}.png") for i in (0, 2))
    assert main(["interpolate", ckpt, a, b, "--steps", "3", "--out", str(tmp_path / "i.png")]) == 0
    with_dir = _folder(tmp_path / "with", [(8, 8)] * 3, seed=1)
    without_dir = _folder(tmp_path / "without", [(8, 8)] * 2, seed=2)
    argv = ["manipulate", ckpt, a, "--attribute-dir", str(with_dir), "--without-dir", str(without_dir)]
    assert main([*argv, "--strengths", "-1", "1", "--out", str(tmp_path / "m.png")]) == 0
    assert Image.open(tmp_path / "m.png").size == ((2 * 9 + 1) * SCALE, 10 * SCALE)


def test_bad_images_for_training_exit_2_and_write_nothing(tmp_path, capsys):
    data = _folder(tmp_path / "data", [(8, 8), (8, 8)])
    (data / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    _expect_error(capsys, ["train", *TINY, "--data", str(data), "--out", str(out)], "zz_broken.jpg")
    (data / "zz_broken.jpg").unlink()
    _expect_error(capsys, ["train", *TINY, "--data", str(data), "--resolution", "16", "--out", str(out)], "img0.png")
    _expect_error(capsys, ["train", *TINY, "--n-bits", "4", "--out", str(out)], "--n-bits")
    Image.new("L", (8, 8)).save(data / "a_grey.png")  # first in sorted order: the RGB files were named
    line = _expect_error(capsys, ["train", *TINY, "--data", str(data), "--out", str(out)], "a_grey.png")
    assert "img0.png" not in line and "convert them to RGB" in line
    assert not out.exists()


def test_a_one_image_folder_is_refused_naming_data(tmp_path, capsys):
    data = _folder(tmp_path / "one", [(8, 8)])
    out = tmp_path / "out"
    line = _one_line_error(capsys, ["train", *TINY, "--data", str(data), "--out", str(out)], 2, ["--data", "one"])
    assert "holds 1 image" in line and "15%" in line
    assert not out.exists()


def test_resume_refuses_a_data_folder_that_changed(tmp_path, capsys):
    """The held-out split is by position in the sorted file list: with files added, --resume held out images the
    run had trained on (and drew other batches)."""
    data = _folder(tmp_path / "data", [(8, 8)] * 6)
    run = ["train", *TINY, "--levels", "1", "--iterations", "2", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*run, "--data", str(data), "--resolution", "8"]) == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    resume = [*run, "--resume", "--iterations", "3"]
    Image.new("RGB", (8, 8)).save(data / "new.png")
    _expect_error(capsys, resume, "--data", untouched=ckpt)
    (data / "new.png").unlink()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(data / "img3.png")  # the same names, one image changed
    _expect_error(capsys, resume, "not those the run", untouched=ckpt)
    _folder(tmp_path / "again", [(8, 8)] * 6).rename(tmp_path / "data2")
    data.rename(tmp_path / "changed")
    (tmp_path / "data2").rename(data)  # the images the run started on
    assert main(resume) == 0
    assert load_checkpoint(ckpt)[1]["extra"]["step"] == 3


def test_bad_input_for_a_checkpoint_exits_2_and_keeps_the_output(rgb_run, digits_run, tmp_path, capsys):
    ckpt = str(rgb_run / "run" / "checkpoint.pt")
    previous = tmp_path / "m.png"
    previous.write_bytes(b"previous output")
    grey = _folder(tmp_path / "grey", [(8, 8)], mode="L")
    rgb = str(rgb_run / "data" / "img0.png")
    out = ["--out", str(previous)]
    argv = ["manipulate", ckpt, rgb, "--attribute-dir", str(grey), "--without-dir", str(rgb_run / "data"), *out]
    line = _expect_error(capsys, argv, "grey/img0.png", untouched=previous)
    assert "1 of 1 images have 1 channel(s) (grey), expected 3 (RGB)" in line and "convert them to RGB" in line
    _expect_error(capsys, ["interpolate", ckpt, rgb, str(grey / "img0.png"), *out], "grey/img0.png", previous)
    _expect_error(capsys, ["interpolate", ckpt, rgb, "digits:0", *out], "digits:0", previous)
    _expect_error(capsys, ["manipulate", ckpt, rgb, "--label-from", "1", "--label-to", "2", *out], ckpt, previous)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    _expect_error(capsys, ["sample", str(broken), *out], "broken.pt", untouched=previous)
    _expect_error(capsys, ["sample", str(tmp_path / "missing.pt"), *out], "missing.pt", untouched=previous)


def test_manipulate_needs_one_kind_of_direction(digits_run, capsys):
    ckpt = str(digits_run / "checkpoint.pt")
    for extra in ([], ["--label-from", "1"], ["--label-from", "1", "--label-to", "2", "--without-dir", "x"]):
        line = _one_line_error(capsys, ["manipulate", ckpt, "digits:0", *extra], 2, ["fastflow manipulate: error"])
        assert "either --attribute-dir and --without-dir, or --label-from and --label-to" in line
    argv = ["manipulate", ckpt, "digits:0", "--attribute-dir", "a", "--without-dir", "b", "--data", "c"]
    _one_line_error(capsys, argv, 2, ["--data goes with --label-from and --label-to"])
    _one_line_error(
        capsys, ["manipulate", ckpt, "digits:0", "--label-from", "1", "--label-to", "12"], 2, ["--label-to"]
    )
    _usage_error(capsys, ["manipulate", ckpt, "digits:0", "--strengths", "nan"], ["must be a finite number, got 'nan'"])
    for spec in ("digits:-1", "digits:x"):
        argv = ["interpolate", ckpt, spec, "digits:0", "--out", "x.png"]
        _one_line_error(capsys, argv, 2, [spec, "must be an integer >= 0"])


def test_outputs_are_checked_before_the_work(digits_run, tmp_path, capsys, monkeypatch):
    ckpt = str(digits_run / "checkpoint.pt")
    monkeypatch.setattr("fastflow.cli._load", lambda args: pytest.fail("loaded the model before checking --out"))
    folder = tmp_path / "folder.png"
    folder.mkdir()
    _one_line_error(capsys, ["sample", ckpt, "--out", str(folder)], 2, ["folder.png", "is a folder"])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _one_line_error(capsys, ["sample", ckpt, "--out", str(blocker / "x.png")], 2, ["not a writable folder"])
    _one_line_error(capsys, ["interpolate", ckpt, "digits:0", "digits:1", "--out", str(blocker / "x.png")], 2, ["file"])
    _one_line_error(capsys, ["export", ckpt, str(blocker)], 2, ["directory", "is a file"])
    _one_line_error(capsys, ["export", ckpt, ""], 2, ["directory must name the folder"])
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is missing")
def test_device_cuda_without_cuda_is_one_line(digits_run, tmp_path, capsys):
    argv = ["sample", str(digits_run / "checkpoint.pt"), "--device", "cuda", "--out", str(tmp_path / "s.png")]
    _one_line_error(capsys, argv, 2, ["device 'cuda' was asked for but CUDA is not available"])


def test_python_dash_m_fastflow_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "fastflow", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: fastflow" in done.stdout


def test_reversible_training_runs_the_coupling_networks_in_tiles(tmp_path, monkeypatch):
    from fastflow.nn.coupling import AffineCoupling

    tile_sides = []
    original = AffineCoupling._tiles

    def spy(self, x):
        parts = original(self, x)
        tile_sides.append(max(t.h1 - t.h0 for t in parts))
        return parts

    monkeypatch.setattr(AffineCoupling, "_tiles", spy)
    args = ["train", *TINY, "--iterations", "2", "--reversible", "--tile-size", "1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert tile_sides and set(tile_sides) == {1}
    _, payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["config"]["reversible"] is True


def _one_line_error(capsys, argv, status, names):
    """Run ``argv``, expect ``status`` and one line on stderr containing each of ``names``; returns it."""
    capsys.readouterr()
    assert main(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "error" in err[0] and all(name in err[0] for name in names), err[0]
    return err[0]


def _usage_error(capsys, argv, names):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(name in err[0] for name in names), err


@pytest.mark.parametrize(("where", "count"), [("samples", "4 of 8 samples"), ("prior", "of 8 samples")])
def test_samples_that_come_out_nan_exit_1_and_write_nothing(digits_run, tmp_path, capsys, monkeypatch, where, count):
    """NaN samples, or (``prior``) non-finite latents through the real decode, whose own finite check used to raise
    first, with a message about latents and contexts a CLI user never sets: the count and the temperature hint."""
    from fastflow.models import FlowModel
    from fastflow.models.priors import GaussianPrior

    owner, rows, value = (FlowModel, 4, float("nan")) if where == "samples" else (GaussianPrior, 3, float("inf"))
    real = owner.sample

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out[:rows] = value
        return out

    monkeypatch.setattr(owner, "sample", poisoned)
    out = tmp_path / "grid.png"
    argv = ["sample", str(digits_run / "checkpoint.pt"), "--n", "8", "--temperature", "2", "--out", str(out)]
    line = _one_line_error(capsys, argv, 1, [count, "NaN", "grid.png", "--temperature below 2"])
    assert "nothing was written" in line and not out.exists()


def test_a_train_run_that_fails_before_its_first_save_leaves_no_out_folder(tmp_path, capsys, monkeypatch):
    """--out was made before the first step: a run that failed then (a batch too large to allocate) left it empty."""
    import fastflow.train as train_module

    def fail(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train_module, "batch_at_step", fail)
    out = tmp_path / "new" / "run"
    _one_line_error(capsys, ["train", *TINY, "--out", str(out)], 1, ["RuntimeError", "can't allocate memory"])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_with_a_nan_weight_is_refused(digits_run, tmp_path, capsys):
    import torch

    payload = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))
    torch.save(payload, tmp_path / "nan.pt")
    argv = ["sample", str(tmp_path / "nan.pt"), "--out", str(tmp_path / "g.png")]
    _one_line_error(capsys, argv, 2, ["nan.pt", "NaN/Inf", name])
    assert not (tmp_path / "g.png").exists()


def test_flags_out_of_range_are_one_line_usage_errors(digits_run, tmp_path, capsys):
    ckpt = str(digits_run / "checkpoint.pt")
    for value in ("nan", "inf", "-1", "0"):
        _usage_error(capsys, ["sample", ckpt, "--temperature", value], ["--temperature", "finite number > 0", value])
    out = ["--out", str(tmp_path / "run")]
    _usage_error(capsys, ["train", *TINY, "--temperature", "nan", *out], ["--temperature"])
    _usage_error(capsys, ["train", *TINY, "--lr", "-0.1", *out], ["--lr", "> 0"])
    _usage_error(capsys, ["train", *TINY, "--clip", "nan", *out], ["--clip", ">= 0"])
    _usage_error(capsys, ["train", *TINY, "--batch", "0", *out], ["--batch", "integer >= 1"])
    big = str(2**64)  # failed after loading the checkpoint, as "Overflow when unpacking long long"
    _usage_error(capsys, ["sample", ckpt, "--seed", big], ["--seed", "< 2**64", big])
    _usage_error(capsys, ["train", *TINY, "--seed", big, *out], ["--seed", "< 2**64"])
    _usage_error(capsys, ["train", *TINY, "--seed", "-1", *out], ["--seed", ">= 0"])
    _usage_error(capsys, ["train", *TINY, "--iterations", "0", *out], ["--iterations", "integer >= 1"])
    _usage_error(capsys, ["sample", ckpt, "--out", str(tmp_path / "grid.gif")], ["grid.gif", ".jpg"])
    assert not (tmp_path / "run").exists()


def test_out_jpg_writes_a_jpeg(digits_run, tmp_path):
    ckpt = str(digits_run / "checkpoint.pt")
    assert main(["sample", ckpt, "--n", "4", "--out", str(tmp_path / "grid.jpg")]) == 0
    assert (tmp_path / "grid.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert Image.open(tmp_path / "grid.jpg").format == "JPEG"
    assert main(["interpolate", ckpt, "digits:0", "digits:1", "--steps", "3", "--out", str(tmp_path / "i.JPEG")]) == 0
    assert Image.open(tmp_path / "i.JPEG").format == "JPEG"


def test_training_divergence_is_one_line_naming_the_step(tmp_path, capsys, monkeypatch):
    import fastflow.train as train_module

    real = train_module.batch_at_step

    def fetch(source, step, *args, **kwargs):
        if step == 2:
            raise FloatingPointError("non-finite output at blocks.0.layers.1 (FlowStep)")
        return real(source, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_at_step", fetch)
    argv = ["train", *TINY, "--lr", "10", "--quiet", "--out", str(tmp_path / "run")]
    line = _one_line_error(capsys, argv, 1, ["diverged at step 3", "blocks.0.layers.1", "lower --lr", "--warmup"])
    assert "Traceback" not in line


def test_disk_full_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import errno

    import fastflow.train as train_module

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, f"cannot write {str(path)!r}: No space left on device")

    monkeypatch.setattr(train_module, "save_checkpoint", full)
    argv = ["train", *TINY, "--quiet", "--out", str(tmp_path / "run")]
    _one_line_error(capsys, argv, 1, ["checkpoint.pt", "No space left"])


def test_ctrl_c_saves_prints_the_resume_command_and_resume_finishes_the_run(tmp_path, capsys, monkeypatch):
    import signal

    import torch

    import fastflow.train as train_module

    full = tmp_path / "full"
    assert main(["train", *TINY, "--seed", "3", "--out", str(full)]) == 0
    real = train_module.batch_at_step

    def fetch(source, step, *args, **kwargs):
        if step == 1:
            signal.raise_signal(signal.SIGINT)
        return real(source, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_at_step", fetch)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *TINY, "--seed", "3", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 2; resume with: fastflow train --out {out} --resume" in err
    assert load_checkpoint(out / "checkpoint.pt")[1]["extra"]["step"] == 2
    monkeypatch.undo()
    assert main(["train", "--out", str(out), "--resume"]) == 0  # every other flag comes from the checkpoint
    resumed, payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["extra"]["step"] == 4 and payload["extra"]["train_config"]["seed"] == 3
    reference = load_checkpoint(full / "checkpoint.pt")[0].state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-5, msg=name)


def test_resume_restores_the_run_flags_and_refuses_contradictions(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    run = ["--batch", "8", "--lr", "0.01", "--warmup", "3", "--clip", "5", "--seed", "2", "--iterations", "2"]
    assert main(["train", *TINY, *run, "--out", str(out)]) == 0
    ckpt = out / "checkpoint.pt"
    line = _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--lr", "0.1"], 2, ["--lr 0.1", "0.01"])
    assert "--iterations" in line, "the error lists the flags that may change"
    _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--reversible"], 2, ["--reversible"])
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.01", "--iterations", "3", "--device", "cpu"]) == 0
    config = load_checkpoint(ckpt)[1]["extra"]["train_config"]
    assert {k: config[k] for k in ("batch", "lr", "warmup", "clip", "seed", "steps")} == {
        "batch": 8, "lr": 0.01, "warmup": 3, "clip": 5.0, "seed": 2, "steps": 3,
    }  # fmt: skip
    progress = capsys.readouterr().err
    assert "train 3/3 (100%)" in progress and "\r" not in progress, "the progress shows the global step"
    before = ckpt.read_bytes()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "already at step 3 of 3" in capsys.readouterr().out
    assert ckpt.read_bytes() == before
    monkeypatch.setenv("RANK", "1")  # another rank of a torchrun launch: rank 0 alone says it
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "already at step" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("entry", "value", "named"),
    [
        ("step", "abc", "stores step 'abc', which is no int >= 0"),
        ("iterations", "10", "stores --iterations = '10', which is no integer"),
        ("hidden", "8", "stores --hidden = '8', which is no integer"),
        ("reversible", 1, "stores --reversible = 1, which is no bool"),
        ("lr", None, "stores --lr = None, which is no number"),
    ],
)
def test_resume_names_an_edited_checkpoint_and_its_entry(tmp_path, capsys, entry, value, named):
    """An edited checkpoint's stored flags and step failed as 'invalid literal for int()', a bare TypeError from a
    comparison, or 'hidden must be an int' (a flag the user never passed), naming neither the file nor the entry."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "2", "--out", str(out)]) == 0
    ckpt = out / "checkpoint.pt"
    payload = torch.load(ckpt, weights_only=True)
    if entry == "step":
        payload["extra"]["step"] = value
    else:
        payload["extra"]["cli"][entry] = value
    torch.save(payload, ckpt)
    _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--device", "cpu"], 2, ["checkpoint.pt", named])


def test_resume_takes_the_default_n_bits_spelled_out(tmp_path, capsys):
    """A run on the photo crops stores --n-bits None (the default, 5): --resume --n-bits 5 says the same and
    continues; another value contradicts it."""
    out = tmp_path / "run"
    assert main(["train", "--resolution", "4", "--levels", "1", "--steps", "1", "--hidden", "4", "--batch", "4",
                 "--iterations", "1", "--device", "cpu", "--quiet", "--out", str(out)]) == 0  # fmt: skip
    _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--n-bits", "4"], 2, ["--n-bits 4", "None"])
    assert main(["train", "--out", str(out), "--resume", "--n-bits", "5", "--iterations", "2", "--quiet"]) == 0
    assert load_checkpoint(out / "checkpoint.pt")[1]["extra"]["step"] == 2


def test_resume_can_turn_a_step_mode_off_or_swap_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "2", "--out", str(out), "--quiet"]) == 0
    ckpt = out / "checkpoint.pt"
    payload = torch.load(ckpt, weights_only=True)
    payload["extra"]["cli"]["cuda_graph"] = True  # as if the run had been started on a GPU with --cuda-graph
    torch.save(payload, ckpt)
    resume = ["train", "--out", str(out), "--resume", "--device", "cpu", "--quiet"]
    _one_line_error(capsys, resume, 2, ["--cuda-graph needs a CUDA device", "--no-cuda-graph"])
    capsys.readouterr()
    assert main([*resume, "--compile"]) == 0  # --compile replaces the run's mode (no "choose one" error)
    assert "already at step 2 of 2" in capsys.readouterr().out
    assert main([*resume, "--no-cuda-graph", "--iterations", "3"]) == 0
    assert load_checkpoint(ckpt)[1]["extra"]["cli"]["cuda_graph"] is False


def test_progress_in_a_log_is_bounded_and_quiet_prints_only_the_final_line(tmp_path, capsys):
    assert main(["train", *TINY, "--iterations", "3", "--eval-every", "1", "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and len(captured.err.splitlines()) == 3
    assert main(["train", *TINY, "--iterations", "3", "--quiet", "--out", str(tmp_path / "b")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.splitlines() == [
        f"wrote {tmp_path / 'b' / 'checkpoint.pt'} and {tmp_path / 'b'}/samples-000003.png"
    ]


def test_the_final_line_names_only_the_files_written(tmp_path, capsys):
    """A sample grid that cannot be drawn (samples too hot to be finite) is not claimed as written."""
    out = tmp_path / "hot"
    with pytest.warns(RuntimeWarning, match="no sample grid at step 2"):
        assert main(["train", *TINY, "--iterations", "2", "--temperature", "1e30", "--quiet", "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {out / 'checkpoint.pt'}"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_settings_are_checked_before_the_first_step(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    _one_line_error(capsys, ["train", *TINY, "--out", str(blocker / "run")], 2, ["--out", "not a writable folder"])
    out = ["--out", str(tmp_path / "run")]
    _one_line_error(capsys, ["train", *TINY, "--tile-size", "2", *out], 2, ["--tile-size", "--reversible"])
    both = ["--reversible", "--tile-size", "2", "--tile-memory-mb", "1"]
    _one_line_error(capsys, ["train", *TINY, *both, *out], 2, ["choose one of --tile-size and --tile-memory-mb"])
    _one_line_error(
        capsys, ["train", *TINY, "--resolution", "12", "--levels", "3", *out], 2, ["divisible by 2**levels = 8"]
    )
    _one_line_error(  # refused before 2 is raised to it (a config's 10**9 took seconds and gigabytes)
        capsys, ["train", *TINY, "--levels", "1000000000", *out], 2, ["divisible by 2**levels = 2**1000000000"]
    )
    data = _folder(tmp_path / "mixed", [(8, 8), (16, 16)])
    _one_line_error(capsys, ["train", *TINY, "--data", str(data), *out], 2, ["several sizes", "--resolution"])
    _one_line_error(capsys, ["train", *TINY, "--compile", "--cuda-graph", *out], 2, ["--compile", "--cuda-graph"])
    _one_line_error(capsys, ["train", *TINY, "--cuda-graph", "--device", "cpu", *out], 2, ["--cuda-graph", "CUDA"])
    assert not (tmp_path / "run").exists()


def test_a_batch_the_launched_ranks_cannot_split_is_refused_before_the_process_group(tmp_path, capsys, monkeypatch):
    """It was refused by every rank after the banner and the process group's setup, naming no flag."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv = ["train", *TINY, "--batch", "7", "--out", str(tmp_path / "run")]
    _one_line_error(capsys, argv, 2, ["--batch 7 does not split evenly over the 2 ranks torchrun launched"])
    monkeypatch.setenv("WORLD_SIZE", "0")  # was a ZeroDivisionError (exit 1) in the batch check
    _one_line_error(capsys, argv, 2, ["WORLD_SIZE must be >= 1, got 0"])


def test_resuming_with_cuda_graph_given_does_not_blame_the_first_run(tmp_path, capsys):
    """The message said the run was started with --cuda-graph whenever --resume was set."""
    out = ["--out", str(tmp_path / "run")]
    assert main(["train", *TINY, "--iterations", "2", *out]) == 0
    err = _one_line_error(capsys, ["train", *out, "--resume", "--iterations", "3", "--cuda-graph"], 2, ["CUDA"])
    assert "started with it" not in err


def test_channels_last_flag_trains_and_is_stored_for_resume(tmp_path):
    # the layout's numerics are tested exactly in tests/test_step.py; here: the flag reaches the run and its checkpoint
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), "--quiet", "--channels-last"]) == 0
    extra = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))[1]["extra"]
    assert extra["cli"]["channels_last"] is True and extra["train_config"]["channels_last"] is True
    assert main(["train", *TINY, "--out", str(tmp_path / "off"), "--quiet", "--no-channels-last"]) == 0
    extra = load_checkpoint(str(tmp_path / "off" / "checkpoint.pt"))[1]["extra"]
    assert extra["cli"]["channels_last"] is False and extra["train_config"]["channels_last"] is False


def test_data_without_resolution_uses_the_image_size_and_says_so(tmp_path, capsys):
    data = _folder(tmp_path / "data", [(16, 16)] * 3)
    assert (
        main(["train", *TINY, "--levels", "1", "--iterations", "1", "--data", str(data), "--out", str(tmp_path / "r")])
        == 0
    )
    assert f"--resolution 16: the shorter side of every image in {data}" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "r" / "checkpoint.pt")[0].image_shape == (3, 16, 16)


def test_manipulate_with_the_classes_of_a_labelled_folder(rgb_run, tmp_path, capsys):
    classes = tmp_path / "classes"
    classes.mkdir()
    _folder(classes / "cats", [(8, 8)] * 3, seed=1)
    _folder(classes / "dogs", [(8, 8)] * 2, seed=2)
    ckpt, image = str(rgb_run / "run" / "checkpoint.pt"), str(rgb_run / "data" / "img0.png")
    argv = ["manipulate", ckpt, image, "--data", str(classes), "--strengths", "-1", "1"]
    assert main([*argv, "--label-from", "cats", "--label-to", "dogs", "--out", str(tmp_path / "m.png")]) == 0
    assert main([*argv, "--label-from", "0", "--label-to", "1", "--out", str(tmp_path / "n.png")]) == 0
    assert (tmp_path / "m.png").read_bytes() == (tmp_path / "n.png").read_bytes(), "a class by name or by index"
    line = _one_line_error(capsys, [*argv, "--label-from", "cats", "--label-to", "birds"], 2, ["birds", "cats, dogs"])
    assert "--label-to" in line
    mice = _folder(classes / "mice", [(8, 8)], mode="L")  # grey, for an RGB model
    (mice / "broken.png").write_bytes(b"\x89PNG not really")
    assert main([*argv, "--label-from", "cats", "--label-to", "dogs", "--out", str(tmp_path / "o.png")]) == 0
    assert (tmp_path / "o.png").read_bytes() == (tmp_path / "m.png").read_bytes(), "only the two classes are read"


def test_an_image_folder_is_held_as_uint8_levels(tmp_path):
    """Folder levels were int64: 8 times the uint8 images resident, about 16 times at the peak."""
    data = _folder(tmp_path / "data", [(8, 8)] * 6)
    args = argparse.Namespace(data=str(data), resolution=8, n_bits=3)
    source, heldout, n_bins, _, _ = _training_data(args)
    assert n_bins == 8 and source.levels.dtype == torch.uint8 and heldout.dtype == torch.uint8
    before = load_image_folder(data, 8).long() * n_bins // 256  # the int64 levels of before
    train_idx, test_idx = split_heldout(6)
    assert torch.equal(source.levels.long(), before[train_idx]) and torch.equal(heldout.long(), before[test_idx])


def test_train_a_jet_then_resume_and_sample_it(tmp_path, capsys):
    jet = ["--model", "jet", "--patch-size", "2", "--couplings", "3", "--width", "16", "--depth", "1", "--heads", "2"]
    run = [*jet, "--batch", "16", "--device", "cpu", "--reversible", "--out", str(tmp_path / "run")]
    assert main(["train", *run, "--iterations", "2"]) == 0
    assert "Jet patch=2 couplings=3 width=16 depth=1 heads=2 on the 8x8 digits" in capsys.readouterr().out
    ckpt = tmp_path / "run" / "checkpoint.pt"
    model, payload = load_checkpoint(ckpt)
    assert type(model).__name__ == "Jet" and model.config["couplings"] == 3 and payload["extra"]["step"] == 2
    # --resume takes the model flags from the run
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--iterations", "3", "--device", "cpu"]) == 0
    assert load_checkpoint(ckpt)[1]["extra"]["step"] == 3
    assert main(["sample", str(ckpt), "--n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    out = ["--out", str(tmp_path / "bad")]
    _one_line_error(capsys, ["train", *jet, "--levels", "2", *out], 2, ["--levels", "--model jet"])
    _one_line_error(capsys, ["train", *jet, "--resolution", "9", *out], 2, ["divisible by --patch-size 2"])
    _one_line_error(capsys, ["train", *jet, "--reversible", "--tile-size", "2", *out], 2, ["--tile-size", "Glow"])
    _one_line_error(capsys, ["train", "--couplings", "4", *out], 2, ["--couplings", "--model glow"])
    # refused by Jet itself (a 1 x 1 token grid has no spatial halves), before --out is made
    line = _one_line_error(capsys, ["train", *jet, "--patch-size", "8", *out], 2, ["patch_size", "equal halves"])
    assert "in Python, kinds=" in line
    assert not (tmp_path / "bad").exists()


UNSERVABLE = {
    "class-conditional": (
        lambda: Glow(1, 8, levels=1, steps=1, hidden=8, n_bins=17, num_classes=3),
        "holds a class-conditional Glow: fastflow {} takes no class labels",
    ),
    "jet-context": (
        lambda: Jet(1, 8, patch_size=2, couplings=1, width=8, depth=1, heads=2, context=2, n_bins=17),
        "holds a Jet conditioned on a context: fastflow {} takes no context",
    ),
    "tabular": (
        lambda: TabularFlow(4, transforms=1, hidden=8),
        "holds a TabularFlow of 4-feature vectors, not images: fastflow {} works on images",
    ),
    "nsf-context": (
        lambda: NSF(4, context=2, transforms=1, hidden=8),
        "holds a NSF of 4-feature vectors, not images: fastflow {} works on images",
    ),
    "2-channel": (
        lambda: Glow(2, 8, levels=1, steps=1, hidden=8, n_bins=17),
        "holds a Glow of 2-channel images: fastflow {} works on images of 1 or 3 channels",
    ),
}


@pytest.mark.parametrize("kind", sorted(UNSERVABLE))
def test_checkpoints_the_commands_cannot_serve_are_refused_up_front(tmp_path, capsys, kind):
    """They failed late, with messages about what the CLI cannot set (class labels, a context, the image shape), or
    (2 channels) after sampling."""
    make, message = UNSERVABLE[kind]
    ckpt = str(tmp_path / "model.pt")
    save_checkpoint(ckpt, make())
    out = tmp_path / "new" / "out.png"
    for command, *args in (
        ("sample", "--n", "2"),
        ("interpolate", "digits:0", "digits:1"),
        ("manipulate", "digits:0", "--label-from", "1", "--label-to", "2"),
    ):
        argv = [command, ckpt, *args, "--device", "cpu", "--out", str(out)]
        line = _one_line_error(capsys, argv, 2, [f"fastflow {command}: error: {ckpt!r}", message.format(command)])
        assert line.endswith(message.format(command)), line
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pt"]


def test_a_bad_checkpoint_or_image_creates_no_output_folder(digits_run, tmp_path, capsys):
    """``--out new/sub/x.png`` made ``new/sub/`` before the checkpoint was read."""
    out = str(tmp_path / "new" / "sub" / "x.png")
    _one_line_error(capsys, ["sample", str(tmp_path / "missing.pt"), "--out", out], 2, ["missing.pt"])
    ckpt = str(digits_run / "checkpoint.pt")
    _one_line_error(capsys, ["interpolate", ckpt, "digits:0", "digits:x", "--out", out], 2, ["digits:x"])
    argv = ["manipulate", ckpt, "digits:0", "--attribute-dir", str(tmp_path / "none"), "--without-dir", "x"]
    _one_line_error(capsys, [*argv, "--out", out], 2, ["none"])
    assert list(tmp_path.iterdir()) == []
    assert main(["sample", ckpt, "--n", "2", "--out", out]) == 0  # the folders are made when the image is written
    assert (tmp_path / "new" / "sub" / "x.png").exists()


@pytest.mark.parametrize(
    ("first", "then", "tile_size", "tile_memory_mb"),
    [
        (["--tile-size", "2"], ["--tile-memory-mb", "1"], None, 1.0),
        (["--tile-memory-mb", "1"], ["--tile-size", "2"], 2, 1024.0),
    ],
)
def test_resume_replaces_one_tiling_by_the_other(tmp_path, monkeypatch, first, then, tile_size, tile_memory_mb):
    """``--tile-memory-mb`` on --resume of a ``--tile-size`` run was ignored (both set: the tile size won)."""
    from fastflow.models import FlowModel

    calls = []
    real = FlowModel.set_tiling

    def spy(self, tile_size=None, memory_budget_mb=None):
        calls.append((tile_size, memory_budget_mb))
        real(self, tile_size, memory_budget_mb)

    monkeypatch.setattr(FlowModel, "set_tiling", spy)
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--iterations", "1", "--reversible", *first, "--out", out, "--quiet"]) == 0
    resume = ["train", "--out", out, "--resume", "--iterations", "2", "--device", "cpu", "--quiet"]
    assert main([*resume, *then]) == 0
    assert calls[-1] == (tile_size, tile_memory_mb)
    cli = load_checkpoint(tmp_path / "run" / "checkpoint.pt")[1]["extra"]["cli"]
    assert (cli["tile_size"], cli["tile_memory_mb"]) == (tile_size, tile_memory_mb)
