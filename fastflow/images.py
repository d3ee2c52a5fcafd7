"""Writing image grids as PNG or JPEG files (the format follows the extension)."""

from __future__ import annotations

import errno
import math
import os
import tempfile

import torch

from fastflow.atomic_file import atomic_file
from fastflow.ops._checks import int_at_least

__all__ = ["IMAGE_FORMATS", "check_writable_folder", "save_grid"]

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # file extension -> PIL format
JPEG_QUALITY = 95


def check_writable_folder(folder: str, what: str = "--out", create: bool = True) -> None:
    """Create ``folder`` and write a scratch file in it, so an unwritable output fails before the work:
    ``ValueError`` naming it as ``what``. Without ``create`` the same check leaves nothing behind: the folders it
    had to make are removed again (a run that fails before its first save leaves no empty folder; a path that
    cannot be made, under a dangling link or with too long a name, is refused now, not at the first save)."""
    made: list[str] = []  # the missing folders, deepest first, as the OS will walk the path (no lexical "..")
    path = os.path.join(os.getcwd(), folder)
    while not os.path.lexists(path):
        if os.path.basename(path) not in (os.curdir, os.pardir):
            made.append(path)
        path = os.path.dirname(path)
    try:
        if made or create:
            os.makedirs(folder, exist_ok=True)
        if not os.path.isdir(folder):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ValueError(f"{what} {folder!r} is not a writable folder: {err.strerror or err}") from err
    finally:
        if not create:
            _remove_made(made)


def _remove_made(made: list[str]) -> None:
    """Remove the folders of ``made`` (deepest first) that exist and are empty, up to the first that is not."""
    for path in made:
        try:
            os.rmdir(path)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):  # something was put there meanwhile
                break  # it and the folders above it stay
            # else it was never made (makedirs failed above it, or the name cannot be made): the folders above
            # it may have been, so go on


def _display_levels(images: torch.Tensor, n_bins: int | None) -> torch.Tensor:
    """``images`` in ``[-0.5, 0.5]`` as display intensities in ``[0, 1]``: with ``n_bins``, each pixel's level
    ``k = floor((x + 0.5) n_bins)`` (the bin a dequantized ``(k + u) / n_bins - 0.5`` falls in, clamped to
    ``[0, n_bins - 1]``) shown as ``k / (n_bins - 1)``, so level 0 is black and the top level white; without,
    ``x + 0.5`` clamped."""
    pixels = images.detach().float().cpu() + 0.5
    if n_bins is None:
        return pixels.clamp(0.0, 1.0)
    return (pixels * n_bins).floor().clamp(0, n_bins - 1) / (n_bins - 1)


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike[str],
    nrow: int | None = None,
    scale: int = 1,
    n_bins: int | None = None,
) -> None:
    """Write ``images`` (``(N, C, H, W)`` in ``[-0.5, 0.5]``, C = 1 or 3) as one grid, each image enlarged
    ``scale`` times with nearest-neighbour upsampling; the file is written atomically, as PNG or JPEG
    (quality 95) by the extension of ``path`` (``ValueError`` for another extension), making missing folders.
    A failed write leaves no temporary file and raises ``OSError`` naming ``path``. ``n_bins``: the images are
    a model's with that many levels per pixel, each drawn as its level (0 black, ``n_bins - 1`` white; a
    level's bin centre ``(k + 0.5) / n_bins - 0.5`` would otherwise never reach either end); None: drawn as
    ``x + 0.5``."""
    from PIL import Image

    image_format = IMAGE_FORMATS.get(os.path.splitext(os.fspath(path))[1].lower())
    if image_format is None:
        raise ValueError(f"cannot write {os.fspath(path)!r}: the file name must end in one of {sorted(IMAGE_FORMATS)}")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(
            f"images must be a floating-point tensor in [-0.5, 0.5], got {getattr(images, 'dtype', images)}"
        )
    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must have shape (N, 1 or 3, H, W) with N >= 1, got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):  # NaN would be written black and Inf white
        raise ValueError("images hold NaN/Inf values: nothing to draw for them")
    if nrow is not None:
        int_at_least("nrow", nrow, 1)
    int_at_least("scale", scale, 1)
    if n_bins is not None:
        int_at_least("n_bins", n_bins, 2)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    pad = 1
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    pixels = _display_levels(images, n_bins)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[
            :,
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + col * (w + pad) : pad + col * (w + pad) + w,
        ] = pixels[i]
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(array[:, :, 0] if c == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_file(path) as tmp:  # a unique temporary name next to path, removed if the write or rename fails
        img.save(tmp, format=image_format, **({"quality": JPEG_QUALITY} if image_format == "JPEG" else {}))
