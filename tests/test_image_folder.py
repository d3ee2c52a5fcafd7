"""Image folders: resize + center-crop policy, channel counts, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.image_folder import list_images, load_image, load_image_folder


def _save(path, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array.astype(np.uint8), mode).save(path)


def test_wide_image_is_center_cropped_without_resizing_when_its_height_fits(tmp_path):
    array = np.zeros((8, 16), dtype=np.uint8)
    array[:, 4:12] = 200  # only the centre 8 columns are bright
    _save(tmp_path / "wide.png", array)
    image = load_image(tmp_path / "wide.png", 8)
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8
    assert torch.all(image == 200)


def test_mixed_sizes_are_resized_to_the_resolution(tmp_path):
    rng = np.random.default_rng(0)
    _save(tmp_path / "a.png", rng.integers(0, 256, (20, 30, 3)))
    _save(tmp_path / "b.jpg", rng.integers(0, 256, (17, 17, 3)))
    _save(tmp_path / "c.png", np.full((32, 16, 3), 90))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    pixels = load_image_folder(tmp_path, 16)
    assert pixels.shape == (3, 3, 16, 16) and pixels.dtype == torch.uint8
    assert torch.all(pixels[2] == 90), "a flat image stays flat through resize and crop"


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("LA", 1), ("RGB", 3), ("RGBA", 3), ("P", 3)])
def test_channel_count_follows_the_image_mode(tmp_path, mode, channels):
    Image.new(mode, (8, 8)).save(tmp_path / "x.png")
    assert load_image(tmp_path / "x.png", 8).shape == (channels, 8, 8)


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path, 8)


def test_image_smaller_than_the_resolution_names_the_file(tmp_path):
    _save(tmp_path / "big.png", np.zeros((16, 16)))
    _save(tmp_path / "small.png", np.zeros((16, 7)))
    with pytest.raises(ValueError, match=r"small.png.*7x16, smaller than the resolution 8"):
        load_image_folder(tmp_path, 8)


def test_mixed_channel_counts_name_the_odd_file(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3)))
    _save(tmp_path / "b.png", np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"b.png.*1 channel\(s\), expected 3"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(ValueError, match=r"a.png.*3 channel\(s\), expected 1"):
        load_image_folder(tmp_path, 8, channels=1)


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="holds no"):
        list_images(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        list_images(tmp_path / "missing")
