"""Folders of PNG/JPEG images as uint8 tensors, resized and center-cropped to a square resolution.

Policy: every image is resized so that its shorter side is ``resolution`` (Lanczos), then center-cropped to
``resolution`` x ``resolution``, so mixed sizes and aspect ratios are fine; an image smaller than
``resolution`` on either side is an error (it would have to be enlarged). Greyscale images (PIL modes 1, L,
LA, I, I;16, F) have 1 channel, all others are converted to RGB (3 channels; alpha is dropped); a folder
whose images disagree, or that disagrees with the channels asked for, is an error naming the first file
that differs. Files with other suffixes are ignored; sub-folders are not searched.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The PNG/JPEG files directly in ``folder``, sorted by name; ``ValueError`` if there are none."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{os.fspath(folder)!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{os.fspath(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def load_image(path: str | os.PathLike[str], resolution: int, channels: int | None = None) -> torch.Tensor:
    """The image at ``path`` as a uint8 ``(C, resolution, resolution)`` tensor (see the module policy);
    ``ValueError`` naming the file if it cannot be read, is too small, or has not ``channels`` channels."""
    from PIL import Image, UnidentifiedImageError

    name = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            grey = image.mode in GREY_MODES
            image = image.convert("L" if grey else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
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
    images = []
    for path in list_images(folder):
        images.append(load_image(path, resolution, channels))
        channels = images[0].shape[0]
    return torch.stack(images)
