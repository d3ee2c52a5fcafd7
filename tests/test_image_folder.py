"""Image folders: resize + center-crop policy, channel counts, 16-bit and EXIF-rotated images, hidden files, class
sub-folders, and errors that name the file."""

from __future__ import annotations

import struct
import zlib

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
    load_images,
    load_labelled_folder,
)

PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2}  # channels -> PNG colour type: grey, grey+alpha, RGB


def _save(path, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array.astype(np.uint8), mode).save(path)


def _save_png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG of ``array`` (H, W, 1 grey / 2 grey+alpha / 3 RGB) written by hand: Pillow writes none but
    grey."""
    height, width, channels = array.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)  # filter 0 (none) before each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


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


def _broken_chunk_stream(path) -> None:
    """A PNG whose first IDAT length is 100 short: Pillow reads the chunk stream out of step and raises a
    SyntaxError (not an OSError)."""
    _save(path, np.random.default_rng(0).integers(0, 256, (16, 16)))  # noise: an IDAT of over 100 bytes
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT") - 4
    data[at : at + 4] = struct.pack(">I", struct.unpack(">I", data[at : at + 4])[0] - 100)
    path.write_bytes(bytes(data))


def test_a_broken_png_chunk_stream_names_the_file(tmp_path):
    _save(tmp_path / "fine.png", np.zeros((16, 16)))
    _broken_chunk_stream(tmp_path / "a.png")
    with pytest.raises(SyntaxError):  # what Pillow raises, which came through naming no file
        Image.open(tmp_path / "a.png").load()
    for load in (lambda: load_image_folder(tmp_path, 8), lambda: load_image(tmp_path / "a.png", 8)):
        with pytest.raises(ValueError, match="cannot read image .*a.png"):
            load()


def test_image_size_reads_a_png_s_header_only(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("L", (16, 8)).save(tmp_path / "plain.png")
    Image.new("L", (16, 8)).save(tmp_path / "turned.png", exif=exif)  # Pillow writes eXIf before the image data

    def no_decoding(self):
        raise AssertionError("image_size decoded the image")

    monkeypatch.setattr(Image.Image, "load", no_decoding)  # getexif() decoded a PNG without an early eXIf chunk
    from PIL import PngImagePlugin

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert image_size(tmp_path / "plain.png") == (16, 8)
    assert image_size(tmp_path / "turned.png") == (8, 16)


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
    with pytest.raises(ValueError, match=r"1 of 2 images have 1 channel\(s\) \(grey\), the other 1 have 3.*b.png"):
        load_image_folder(tmp_path, 8)  # a tie: the first file's channels are expected
    with pytest.raises(ValueError, match=r"1 of 2 images have 3 channel\(s\) \(RGB\), expected 1.*a.png"):
        load_image_folder(tmp_path, 8, channels=1)


def test_the_files_that_differ_from_most_of_the_folder_are_named(tmp_path):
    """One grey image first in sorted order among RGB ones: the error named an RGB file."""
    _save(tmp_path / "a_grey.png", np.zeros((8, 8)))
    for name in ("b", "c", "d"):
        _save(tmp_path / f"{name}.png", np.zeros((8, 8, 3)))
    with pytest.raises(ValueError) as caught:
        load_image_folder(tmp_path, 8)
    message = str(caught.value)
    assert "a_grey.png" in message and "b.png" not in message
    assert "1 of 4 images have 1 channel(s) (grey), the other 3 have 3 (RGB)" in message
    assert "convert them to RGB" in message and ".convert('RGB')" in message
    for name in ("e", "f", "g", "h"):
        _save(tmp_path / f"{name}_grey.png", np.zeros((8, 8)))
    with pytest.raises(ValueError, match=r"5 of 8 images have 1 channel.*expected 3.*and 2 more; convert them to RGB"):
        load_image_folder(tmp_path, 8, channels=3)  # at most three names, then a count
    with pytest.raises(ValueError, match=r"channels must be 1 \(grey\), 3 \(RGB\) or None, got 2"):
        load_images(list_images(tmp_path), 8, channels=2)
    for bad in (3.0, "3", True):
        with pytest.raises(TypeError, match="channels must be an int"):
            load_images(list_images(tmp_path), 8, channels=bad)


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="holds no"):
        list_images(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        list_images(tmp_path / "missing")


def test_sixteen_bit_pngs_keep_the_high_byte_whatever_their_colour_type(tmp_path):
    """Pillow keeps the high byte of 16-bit RGB and grey+alpha; 16-bit grey was rounded from v * 255 / 65535, so
    one ramp loaded to different values, and the end levels were half as wide as the others."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(ramp).save(tmp_path / "grey.png")
    assert Image.open(tmp_path / "grey.png").mode in ("I;16", "I")
    _save_png16(tmp_path / "rgb.png", np.stack([ramp] * 3, axis=-1))
    assert Image.open(tmp_path / "rgb.png").tile[0][3] == "RGB;16B"
    grey, rgb = load_image(tmp_path / "grey.png", 256), load_image(tmp_path / "rgb.png", 256)
    assert grey.shape == (1, 256, 256) and rgb.shape == (3, 256, 256)
    assert torch.equal(grey[0], rgb[0]), "16-bit grey and 16-bit RGB of one ramp load to the same 8-bit values"
    assert torch.equal(grey[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    assert torch.bincount(grey.flatten().long(), minlength=256).tolist() == [256] * 256, "every level equally wide"


def test_a_sixteen_bit_grey_alpha_png_is_grey(tmp_path):
    """Pillow opens 16-bit grey+alpha as RGBA (raw mode LA;16B): it loaded as RGB with the grey in every channel."""
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    alpha = np.random.default_rng(0).integers(0, 65536, ramp.shape)  # dropped, whatever it is
    _save_png16(tmp_path / "la.png", np.stack([ramp, alpha], axis=-1))
    with Image.open(tmp_path / "la.png") as image:
        assert image.mode == "RGBA" and image.tile[0][3] == "LA;16B"
    pixels = load_image(tmp_path / "la.png", 256)
    assert pixels.shape == (1, 256, 256), "alpha dropped, like 8-bit LA"
    assert torch.equal(pixels[0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    _save(tmp_path / "grey8.png", np.zeros((256, 256)))
    assert load_image_folder(tmp_path, 256).shape == (2, 1, 256, 256), "a folder with 8-bit grey agrees"


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
