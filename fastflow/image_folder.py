"""Folders of PNG/JPEG images as uint8 tensors, resized and center-cropped to a square resolution.

Policy: every image is resized so that its shorter side is ``resolution`` (Lanczos), then center-cropped to
``resolution`` x ``resolution``, so mixed sizes and aspect ratios are fine; an image smaller than
``resolution`` on either side is an error (it would have to be enlarged). Greyscale images (PIL modes 1, L,
LA, I, I;16, F, and 16-bit grey+alpha PNGs) have 1 channel, all others are converted to RGB (3 channels);
alpha is dropped. A folder whose images disagree in channels is an error naming the files that differ from
the majority (or from the channels asked for) and how to convert them. 16-bit PNGs (grey, grey+alpha or
colour) keep the high byte of every value (``v >> 8``, as Pillow decodes 16-bit colour), so they all agree
and the 256 levels are equally wide. The EXIF orientation of a photo is applied. Files with other suffixes
and hidden files (names starting with ``.``, such as macOS's ``._x.png``) are ignored.

A folder that holds no images itself but sub-folders of images is labelled data (torchvision's ImageFolder
convention): each non-hidden sub-folder is a class, classes are numbered in sorted name order, and
:func:`load_labelled_folder` returns the images with their class indices. Otherwise sub-folders are ignored.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastflow.ops._checks import int_at_least

__all__ = [
    "IMAGE_SUFFIXES",
    "image_channels",
    "image_size",
    "list_classes",
    "list_images",
    "list_labelled_images",
    "load_image",
    "load_image_folder",
    "load_images",
    "load_labelled_folder",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # 16-bit greyscale PNGs open in one of these
CHANNEL_KINDS = {1: ("grey", "L"), 3: ("RGB", "RGB")}  # channels -> (name, PIL mode to convert to)
NAMED_FILES = 3  # an error lists at most this many files, then a count


def _read_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot read: OSError (UnidentifiedImageError, truncated data),
    ValueError, SyntaxError (a broken PNG chunk stream), EOFError, struct and zlib errors (damaged headers and
    compressed data) and DecompressionBombError. Each is turned into a ValueError naming the file."""
    from PIL import Image

    return (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


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


def _is_grey(image: Any) -> bool:
    """Whether the opened ``image`` (before ``load()``, which clears its tile) has 1 channel: a greyscale mode,
    or a 16-bit grey+alpha PNG, which Pillow opens as RGBA from raw mode ``LA;16B``."""
    raw_mode = image.tile[0][3] if image.tile else None  # a PNG tile's decoder arguments are its raw mode
    return image.mode in GREY_MODES or (isinstance(raw_mode, str) and raw_mode.startswith("LA;16"))


def _to_8_bit(image: Any, grey: bool) -> Any:
    """``image`` as PIL mode L (``grey``) or RGB; 16-bit greyscale keeps the high byte of each value."""
    from PIL import Image

    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray((np.asarray(image).clip(0, 65535) >> 8).astype(np.uint8))
    if grey and image.mode == "RGBA":  # 16-bit grey+alpha: Pillow decoded R = G = B = the grey's high byte
        return image.getchannel("R")
    return image.convert("L" if grey else "RGB")


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` after its EXIF orientation, read from the header only (for a
    PNG the orientation of an ``eXIf`` chunk before the image data, where PNG writers put it: Pillow would decode
    the whole image to look for one after it); ``ValueError`` naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            header_only = image.format != "PNG" or "exif" in image.info
            orientation = image.getexif().get(0x0112, 1) if header_only else 1  # 5 to 8 turn it by 90 degrees
    except _read_errors() as err:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_channels_arg(channels: int | None) -> None:
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int)):
        raise TypeError(f"channels must be an int (1 or 3) or None, got {type(channels).__name__} {channels!r}")
    if channels is not None and channels not in CHANNEL_KINDS:
        raise ValueError(f"channels must be 1 (grey), 3 (RGB) or None, got {channels!r}")


def image_channels(path: str | os.PathLike[str]) -> int:
    """The channels (1 or 3, see the module policy) the image at ``path`` loads with, read from the header only;
    ``ValueError`` naming the file if it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return 1 if _is_grey(image) else 3
    except _read_errors() as err:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {err}") from err


def load_image(path: str | os.PathLike[str], resolution: int, channels: int | None = None) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``(C, resolution, resolution)`` tensor (see the module policy);
    ``ValueError`` naming the file if it cannot be read, is too small, or has not ``channels`` channels."""
    from PIL import Image, ImageOps

    int_at_least("resolution", resolution, 1)
    _check_channels_arg(channels)
    name = os.fspath(path)
    try:
        with Image.open(path) as image:
            grey = _is_grey(image)
            image.load()
            image = _to_8_bit(ImageOps.exif_transpose(image), grey)
    except _read_errors() as err:
        raise ValueError(f"cannot read image {name!r}: {err}") from err
    found = 1 if grey else 3
    if channels is not None and found != channels:
        mode = CHANNEL_KINDS[channels][1]
        raise ValueError(
            f"image {name!r} has {found} channel(s), expected {channels}: convert it (with Pillow: "
            f"Image.open(path).convert({mode!r}).save(path))"
        )
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
    """Every image in ``folder`` as uint8 ``(N, C, resolution, resolution)`` (see :func:`load_images`)."""
    return load_images(list_images(folder), resolution, channels)


def _check_channels(files: Sequence[str | os.PathLike[str]], channels: int | None) -> int:
    """The channels of every file in ``files`` (``channels``, else those of most files; on a tie the first
    file's), read from the headers; ``ValueError`` naming the files that differ and how to convert them."""
    found = [image_channels(path) for path in files]
    expected = channels if channels is not None else Counter(found).most_common(1)[0][0]  # ties: first seen
    odd = [(os.fspath(path), n) for path, n in zip(files, found) if n != expected]
    if odd:
        names = ", ".join(repr(name) for name, _ in odd[:NAMED_FILES])
        more = f" and {len(odd) - NAMED_FILES} more" if len(odd) > NAMED_FILES else ""
        kind, mode = CHANNEL_KINDS[expected]
        than = f"expected {expected}" if channels is not None else f"the other {len(files) - len(odd)} have {expected}"
        raise ValueError(
            f"{len(odd)} of {len(files)} images have {odd[0][1]} channel(s) ({CHANNEL_KINDS[odd[0][1]][0]}), "
            f"{than} ({kind}): {names}{more}; convert them to {kind} (with Pillow: "
            f"Image.open(path).convert({mode!r}).save(path)) or remove them"
        )
    return expected


def load_images(files: Sequence[str | os.PathLike[str]], resolution: int, channels: int | None = None) -> torch.Tensor:
    """The image ``files`` as uint8 ``(N, C, resolution, resolution)`` (``N >= 1``); ``channels`` defaults to
    that of most files. Channel counts are checked from the headers before any image is decoded
    (``ValueError`` naming the files that differ, see :func:`_check_channels`)."""
    int_at_least("resolution", resolution, 1)
    _check_channels_arg(channels)
    if not files:
        raise ValueError("files must name at least one image")
    channels = _check_channels(files, channels)
    images = torch.empty(len(files), channels, resolution, resolution, dtype=torch.uint8)
    for i, path in enumerate(files):
        images[i] = load_image(path, resolution, channels)
    return images


def load_labelled_folder(
    folder: str | os.PathLike[str], resolution: int, channels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(images uint8 (N, C, resolution, resolution), labels int64 (N,), class names)`` of a labelled
    ``folder`` (see the module docstring); ``channels`` defaults to that of most images."""
    files, labels, classes = list_labelled_images(folder)
    return load_images(files, resolution, channels), torch.tensor(labels, dtype=torch.int64), classes
