"""Writing image grids as PNG files."""

from __future__ import annotations

import math
import os

import torch

__all__ = ["save_grid"]


def save_grid(images: torch.Tensor, path: str | os.PathLike[str], nrow: int | None = None, scale: int = 1) -> None:
    """Write ``images`` (``(N, C, H, W)`` in ``[-0.5, 0.5]``, C = 1 or 3) as one PNG grid, each image
    enlarged ``scale`` times with nearest-neighbour upsampling; the file is written atomically."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    pad = 1
    grid = torch.ones(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    pixels = (images.detach().float().cpu() + 0.5).clamp(0.0, 1.0)
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
    tmp = f"{os.fspath(path)}.tmp"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
