"""Patchify: images ``(B, C, H, W)`` to tokens ``(B, N, p * p * C)`` of non-overlapping ``p x p`` patches, and back;
a reshape, log-det 0."""

from __future__ import annotations

import torch

from fastflow.nn.base import FlowLayer, check_image, zero_logdet
from fastflow.ops._checks import int_at_least

__all__ = ["Patchify", "Unpatchify", "patchify", "unpatchify"]


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, (H/p)(W/p), p * p * C)``: token ``i * (W/p) + j`` is patch ``(i, j)`` (row-major) and
    its feature ``(u * p + v) * C + c`` is pixel ``(i p + u, j p + v)`` of channel ``c``."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Exact inverse of :func:`patchify` for images of shape ``image_shape = (C, H, W)``."""
    c, h, w = image_shape
    p = patch_size
    x = tokens.reshape(tokens.shape[0], h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(tokens.shape[0], c, h, w)


class Patchify(FlowLayer):
    """Images ``(B, C, H, W)`` to tokens ``(B, N, F)``, ``N = (H/p)(W/p)``, ``F = p * p * C`` (:func:`patchify`);
    volume preserving. ``inverse`` maps tokens back to images."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], patch_size: int) -> None:
        super().__init__()
        int_at_least("in_channels", in_channels, 1)
        sizes_ok = isinstance(image_size, (tuple, list)) and len(image_size) == 2
        if not sizes_ok or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in image_size):
            raise ValueError(f"image_size must be (H, W), two ints >= 1, got {image_size!r}")
        h, w = image_size
        int_at_least("patch_size", patch_size, 1)
        if h % patch_size or w % patch_size:
            raise ValueError(f"image_size {(h, w)} must be divisible by patch_size = {patch_size}")
        self.image_shape = (in_channels, h, w)
        self.patch_size = patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.tokens = self.grid[0] * self.grid[1]
        self.features = patch_size * patch_size * in_channels

    def _to_tokens(self, x: object, name: str) -> torch.Tensor:
        x = check_image(name, x, self.image_shape[0])
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{name} must have shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}"
            )
        return patchify(x, self.patch_size)

    def _to_image(self, tokens: object, name: str) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or not tokens.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(tokens, 'dtype', tokens)}")
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.tokens, self.features):
            raise ValueError(f"{name} must have shape (B, {self.tokens}, {self.features}), got {tuple(tokens.shape)}")
        return unpatchify(tokens, self.patch_size, self.image_shape)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patchify(x), 0)``; ``context`` is ignored."""
        return self._to_tokens(x, "x"), zero_logdet(x)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unpatchify(y), 0)``."""
        return self._to_image(y, "y"), zero_logdet(y)


class Unpatchify(Patchify):
    """Tokens ``(B, N, F)`` back to images ``(B, C, H, W)``: :class:`Patchify` run backwards (the last layer of a
    token flow, so that its latents are image-shaped)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unpatchify(x), 0)``; ``context`` is ignored."""
        return self._to_image(x, "x"), zero_logdet(x)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patchify(y), 0)``."""
        return self._to_tokens(y, "y"), zero_logdet(y)
