"""Folders of PNG/JPEG images as uint8 tensors, resized and center-cropped to a square resolution.

Policy: every image is resized so that its shorter side is ``resolution`` (Lanczos), then center-cropped to
``resolution`` x ``resolution``, so mixed sizes and aspect ratios are fine; an image smaller than
``resolution`` on either side is an error (it would have to be enlarged). Greyscale images (PIL modes 1, L,
LA, I, I;16, F) have 1 channel, all others are converted to RGB (3 channels; alpha is dropped); a folder
whose images disagree, or that disagrees with the channels asked for, is an error naming the first file
that differs. 16-bit greyscale PNGs (PIL modes I;16 and I) are scaled from 0..65535 to 0..255, not clipped;
the EXIF orientation of a photo is applied. Files with other suffixes and hidden files (names starting with
``.``, such as macOS's ``._x.png``) are ignored.

A folder that holds no images itself but sub-folders of images is labelled data (torchvision's ImageFolder
convention): each non-hidden sub-folder is a class, classes are numbered in sorted name order, and
:func:`load_labelled_folder` returns the images with their class indices. Otherwise sub-folders are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastflow.ops._checks import int_at_least

__all__ = [
    "IMAGE_SUFFIXES",
    "image_size",
    "list_classes",
    "list_images",
    "list_labelled_images",
    "load_image",
    "load_image_folder",
    "load_labelled_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit greyscale PNGs open in one of these


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _visible(p) and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_classes(folder: str | os.PathLike[str]) -> list[str]:
    """The class names of a labelled ``folder`` (its non-hidden sub-folders, sorted), or ``[]`` if ``folder``
    holds images itself (or is no folder)."""
    path = Path(folder)
    if not path.is_dir() or _image_files(path):
        return []
    return sorted(p.name for p in path.iterdir() if _visible(p) and p.is_dir())


def list_labelled_images(folder: str | os.PathLike[str]) -> tuple[list[Path], list[int], list[str]]:
    """``(files, class index of each file, class names)`` of a labelled ``folder``; ``ValueError`` if it is not
    one or a class sub-folder holds no images."""
    classes = list_classes(folder)
    if not classes:
        raise ValueError(f"{os.fspath(folder)!r} is not a folder of class sub-folders")
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        found = _image_files(Path(folder) / name)
        if not found:
            where = os.fspath(Path(folder) / name)
            raise ValueError(f"class folder {where!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
        files += found
        labels += [index] * len(found)
    return files, labels, classes


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The PNG/JPEG files directly in ``folder`` sorted by name, or for a labelled folder those of every class
    in class order; ``ValueError`` if there are none."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{os.fspath(folder)!r} is not a folder")
    files = _image_files(path)
    if not files and list_classes(path):
        return list_labelled_images(path)[0]
    if not files:
        raise ValueError(f"{os.fspath(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def _to_8_bit(image: Any, grey: bool) -> Any:
    """``image`` as PIL mode L (``grey``) or RGB; 16-bit greyscale is scaled by 255/65535 rather than clipped."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image, dtype=np.float64).clip(0, 65535) * (255 / 65535)
        return Image.fromarray(levels.round().astype(np.uint8))
    return image.convert("L" if grey else "RGB")


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` after its EXIF orientation, read from the header only;
    ``ValueError`` naming the file if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)  # 5 to 8 turn the image by 90 degrees
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_image(path: str | os.PathLike[str], resolution: int, channels: int | None = None) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``(C, resolution, resolution)`` tensor (see the module policy);
    ``ValueError`` naming the file if it cannot be read, is too small, or has not ``channels`` channels."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    int_at_least("resolution", resolution, 1)
    name = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            grey = image.mode in GREY_MODES
            image = _to_8_bit(ImageOps.exif_transpose(image), grey)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot read image {name!r}: {err}") from err
    found = 1 if grey else 3
    if channels is not None and found != channels:
        raise ValueError(f"image {name!r} has {found} channel(s), expected {channels}")
    width, height = image.size
    if min(width, height) < resolution:
        raise ValueError(f"image {name!r} is {width}x{height}, smaller than the resolution {resolution}")
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(resolution, resolution, found).permute(2, 0, 1).contiguous()


def load_image_folder(folder: str | os.PathLike[str], resolution: int, channels: int | None = None) -> torch.Tensor:
    """Every image in ``folder`` as uint8 ``(N, C, resolution, resolution)``; ``channels`` defaults to that of
    the first image."""
    return _load_images(list_images(folder), resolution, channels)


def _load_images(files: list[Path], resolution: int, channels: int | None) -> torch.Tensor:
    """``files`` stacked as uint8 ``(N, C, resolution, resolution)``, all with the first one's channels
    unless ``channels`` is given."""
    images = []
    for path in files:
        images.append(load_image(path, resolution, channels))
        channels = images[0].shape[0]
    return torch.stack(images)


def load_labelled_folder(
    folder: str | os.PathLike[str], resolution: int, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 (N, C, resolution, resolution), labels int64 (N,), class names)`` of a labelled
    ``folder`` (see the module docstring); ``channels`` defaults to that of the first image."""
    files, labels, classes = list_labelled_images(folder)
    return _load_images(files, resolution, channels), torch.tensor(labels, dtype=torch.int64), classes
