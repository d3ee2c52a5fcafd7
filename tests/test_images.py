"""The image grid writer (fastflow/images.py): what it refuses instead of drawing; the output folder check."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.images import check_writable_folder, save_grid


def test_a_grid_is_written_with_the_images_in_rows(tmp_path):
    images = torch.linspace(-0.5, 0.5, 6).view(6, 1, 1, 1).expand(6, 1, 2, 2)
    save_grid(images, tmp_path / "grid.png", nrow=3)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 3 + 1, 2 * 3 + 1)  # 3 columns and 2 rows of 2x2 images, 1-pixel borders
    assert grid.getpixel((1, 1)) == 0 and grid.getpixel((7, 4)) == 255


@pytest.mark.parametrize("n_bins", [2, 17, 32, 256])
def test_a_models_levels_are_drawn_from_black_to_white(tmp_path, n_bins):
    # what the latent API decodes: each level's bin centre, (k + 0.5) / n_bins - 0.5, plus float noise around it
    levels = torch.arange(n_bins)
    centres = (levels + 0.5) / n_bins - 0.5
    images = torch.stack([centres - 1e-4 / n_bins, centres, centres + 1e-4 / n_bins]).view(3, 1, 1, n_bins)
    save_grid(images, tmp_path / "grid.png", nrow=1, n_bins=n_bins)
    grid = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png")))
    expected = (levels * 255 / (n_bins - 1)).round().to(torch.uint8)
    for row in (1, 3, 5):  # level 0 was drawn as round(127.5 / n_bins), the top level as 255 minus that
        assert torch.equal(grid[row, 1:-1], expected)


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "match"),
    [
        (torch.full((2, 1, 2, 2), float("nan")), {}, ValueError, "NaN/Inf"),  # was drawn black
        (torch.full((2, 1, 2, 2), float("inf")), {}, ValueError, "NaN/Inf"),  # was drawn white
        (torch.full((2, 1, 2, 2), 100, dtype=torch.uint8), {}, TypeError, "floating-point"),  # was drawn white
        (torch.zeros(0, 1, 2, 2), {}, ValueError, "N >= 1"),  # was a ZeroDivisionError
        (torch.zeros(2, 1, 2, 2), {"nrow": -1}, ValueError, "nrow must be >= 1"),
        (torch.zeros(2, 1, 2, 2), {"scale": 0}, ValueError, "scale must be >= 1"),
        (torch.zeros(2, 1, 2, 2), {"n_bins": 1}, ValueError, "n_bins must be >= 2"),
    ],
)
def test_what_cannot_be_drawn_is_refused_and_nothing_is_written(tmp_path, images, kwargs, error, match):
    with pytest.raises(error, match=match):
        save_grid(images, tmp_path / "grid.png", **kwargs)
    assert not (tmp_path / "grid.png").exists()


def _write_half_then_fail(image, fp, *args, **kwargs):
    with open(fp, "wb") as f:
        f.write(b"\x89PNG half an image")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failure", ["directory at the path", "write"])
def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    """The grid was written to ``<path>.tmp``, left behind when the write or the rename failed."""
    target = tmp_path / "grid.png"
    if failure == "write":
        monkeypatch.setattr(Image.Image, "save", _write_half_then_fail)
    else:
        target.mkdir()  # the rename over it fails
    with pytest.raises(OSError, match="grid.png"):
        save_grid(torch.zeros(2, 1, 2, 2), target)
    assert [p.name for p in tmp_path.iterdir()] == (["grid.png"] if failure != "write" else [])


def test_save_image_grid_takes_nrow_third(tmp_path):
    """n_bins had been put third: a call save_image_grid(images, path, 4) meaning nrow=4 drew 4 levels instead."""
    from fastflow.train import save_image_grid

    images = torch.linspace(-0.5, 0.5, 8).view(8, 1, 1, 1).expand(8, 1, 64, 64)
    save_image_grid(images, tmp_path / "grid.png", 4)
    assert Image.open(tmp_path / "grid.png").size == (4 * 65 + 1, 2 * 65 + 1)
    assert len(np.unique(np.array(Image.open(tmp_path / "grid.png")))) == 8  # 8 shades (the last white, as the border)


def test_checking_a_folder_without_create_leaves_nothing_and_refuses_what_cannot_be_made(tmp_path):
    """Without create the check wrote to the nearest existing folder only: a path under a dangling link or with too
    long a name passed, and the run failed at its first save, after the training."""
    check_writable_folder(str(tmp_path / "new" / "deeper"), create=False)
    assert list(tmp_path.iterdir()) == []  # made for the check, removed again
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    for bad in ("dangling", "dangling/sub", "file", "file/sub", "x" * 300 + "/sub"):
        with pytest.raises(ValueError, match="is not a writable folder"):
            check_writable_folder(str(tmp_path / bad), "--out", create=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"]
    check_writable_folder(str(tmp_path / "made"))  # create: made and kept
    assert (tmp_path / "made").is_dir()


def test_the_folder_check_removes_what_it_made_when_the_path_fails_below_it(tmp_path, monkeypatch):
    """A name too long at the end of the path, a full disk below a folder already made, and ".." (which the OS
    walks through a folder it makes): each left a made folder behind."""
    with pytest.raises(ValueError, match="is not a writable folder"):
        check_writable_folder(str(tmp_path / "new" / ("y" * 300)), create=False)
    check_writable_folder(str(tmp_path / "a" / ".." / "b"), create=False)
    assert list(tmp_path.iterdir()) == []

    def full_disk(path, exist_ok=False):
        os.mkdir(os.path.dirname(path))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr("fastflow.images.os.makedirs", full_disk)
    with pytest.raises(ValueError, match="No space left"):
        check_writable_folder(str(tmp_path / "new" / "sub"), create=False)
    assert list(tmp_path.iterdir()) == []
