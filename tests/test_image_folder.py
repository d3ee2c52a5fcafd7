"""Image folders: resize + center-crop policy, channel counts, 16-bit and EXIF-rotated images, hidden files, class
sub-folders, and errors that name the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.image_folder import (
    image_size,
    list_classes,
    list_images,
    load_image,
    load_image_folder,
    load_labelled_folder,
)


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


def test_an_image_over_pil_s_pixel_limit_names_the_file(tmp_path, monkeypatch):
    """PIL's decompression-bomb refusal is not an OSError: it came through as PIL's own error, naming no file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the limit is PIL's, here lowered to a small image's
    Image.new("L", (30, 30)).save(tmp_path / "huge.png")
    for load in (lambda: load_image_folder(tmp_path, 8), lambda: image_size(tmp_path / "huge.png")):
        with pytest.raises(ValueError, match="cannot read image .*huge.png"):
            load()


@pytest.mark.parametrize(("resolution", "error"), [(0, ValueError), (True, TypeError), (8.5, TypeError)])
def test_a_bad_resolution_is_named(tmp_path, resolution, error):
    Image.new("L", (16, 16)).save(tmp_path / "a.png")
    with pytest.raises(error, match="resolution must be"):
        load_image_folder(tmp_path, resolution)


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


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode in ("I;16", "I")
    pixels = load_image(tmp_path / "ramp16.png", 64)
    assert pixels.shape == (1, 64, 64)
    expected = torch.from_numpy((ramp / 257).round().astype(np.uint8))
    assert (pixels[0].int() - expected.int()).abs().max() <= 1
    assert float((pixels == 255).float().mean()) < 0.01, "a 0..65535 ramp must not be clipped at 255"


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((8, 16, 3), dtype=np.uint8)  # stored 16 wide, 8 high; the left half white
    array[:, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(array).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    assert image_size(tmp_path / "turned.jpg") == (8, 16)
    image = load_image(tmp_path / "turned.jpg", 8)  # displayed 8 wide, 16 high: the white half is on top
    top, bottom = image[:, :4].float().mean(), image[:, 4:].float().mean()
    assert top > 200 and bottom < 50


def test_hidden_files_are_skipped(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8)))
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]
    assert load_image_folder(tmp_path, 8).shape == (1, 1, 8, 8)


def test_a_folder_of_class_folders_is_labelled_data(tmp_path):
    for name, count, value in (("dogs", 2, 200), ("cats", 3, 20)):
        (tmp_path / name).mkdir()
        for i in range(count):
            _save(tmp_path / name / f"{i}.png", np.full((8, 8, 3), value))
    (tmp_path / ".git").mkdir()  # hidden: not a class
    (tmp_path / "cats" / "._0.png").write_bytes(b"junk")
    assert list_classes(tmp_path) == ["cats", "dogs"]
    images, labels, classes = load_labelled_folder(tmp_path, 8)
    assert classes == ["cats", "dogs"] and labels.tolist() == [0, 0, 0, 1, 1]
    assert torch.all(images[labels == 0] == 20) and torch.all(images[labels == 1] == 200)
    assert load_image_folder(tmp_path, 8).shape == (5, 3, 8, 8), "training reads every class"
    assert list_classes(tmp_path / "cats") == [], "a folder of images is not labelled"
    (tmp_path / "birds").mkdir()
    with pytest.raises(ValueError, match="class folder .*birds' holds no"):
        load_labelled_folder(tmp_path, 8)
