"""The ``fastflow`` command line on tiny runs: train (digits, photo crops, image folders, resume), sample,
interpolate, manipulate, and bad input that exits with status 2 naming the file and writing nothing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastflow.checkpoint import load_checkpoint
from fastflow.cli import main

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
    args = ["--data", str(data), "--n-bits", "3", "--out", str(root / "run")]
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
    assert Image.open(tmp_path / "i.png").size == ((5 * 9 + 1) * SCALE, 10 * SCALE)
    out = tmp_path / "sub" / "m.png"
    assert main(["manipulate", ckpt, "digits:2", "--label-from", "1", "--label-to", "7", "--out", str(out)]) == 0
    assert Image.open(out).size == ((5 * 9 + 1) * SCALE, 10 * SCALE)


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
    assert not out.exists()


def test_bad_input_for_a_checkpoint_exits_2_and_keeps_the_output(rgb_run, digits_run, tmp_path, capsys):
    ckpt = str(rgb_run / "run" / "checkpoint.pt")
    previous = tmp_path / "m.png"
    previous.write_bytes(b"previous output")
    grey = _folder(tmp_path / "grey", [(8, 8)], mode="L")
    rgb = str(rgb_run / "data" / "img0.png")
    out = ["--out", str(previous)]
    argv = ["manipulate", ckpt, rgb, "--attribute-dir", str(grey), "--without-dir", str(rgb_run / "data"), *out]
    assert "1 channel(s), expected 3" in _expect_error(capsys, argv, "img0.png", untouched=previous)
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
        with pytest.raises(SystemExit) as exit_info:
            main(["manipulate", ckpt, "digits:0", *extra])
        assert exit_info.value.code == 2
    assert "either --attribute-dir and --without-dir, or --label-from and --label-to" in capsys.readouterr().err


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
