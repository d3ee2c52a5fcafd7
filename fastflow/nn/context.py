"""The conditioning ``context`` of a layer: its checks, and its shape as an extra input of a conditioner.

For vectors ``x`` ``(B, D)`` the context ``(B, ...)`` is flattened to ``(B, F)`` and concatenated to the
conditioner's input; for images ``x`` ``(B, C, H, W)`` a context ``(B, F)`` is broadcast over the pixels, and a
``(B, F, H, W)`` one taken per pixel, as ``F`` extra input channels. It is cast to ``x``'s dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["context_features_of", "shape_context"]


def context_features_of(context: torch.Tensor, x: torch.Tensor) -> int:
    """How many features ``context`` gives a conditioner on ``x`` (module docstring)."""
    if x.dim() == 2 or context.dim() == 2:
        return math.prod(context.shape[1:])
    return context.shape[1]


def shape_context(context: object, x: torch.Tensor, features: int) -> torch.Tensor:
    """``context`` as the conditioner's extra input next to ``x``: ``(B, features)`` for vectors, a
    ``(B, features, H, W)`` view for images (module docstring). ``ValueError`` naming ``context`` when it is
    missing, on another device or its batch or feature count does not match; ``TypeError`` when it is not a floating
    tensor."""
    if context is None:
        raise ValueError(f"context is required: the layer conditions on {features} context features")
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
    if not context.is_floating_point():
        raise TypeError(f"context must be a floating-point tensor, got {context.dtype}")
    if context.dim() < 2 or context.shape[0] != x.shape[0]:
        raise ValueError(
            f"context must have shape (B, ...) with the batch B = {x.shape[0]} of the input, got {tuple(context.shape)}"
        )
    if context.device != x.device:
        raise ValueError(
            f"context is on {context.device} but the input is on {x.device}: move it, e.g. context.to('{x.device}')"
        )
    if context_features_of(context, x) != features:
        raise ValueError(
            f"context has {context_features_of(context, x)} features (shape {tuple(context.shape)}) but the layer "
            f"was built for {features} (context mismatch)"
        )
    context = context.to(x.dtype)
    if x.dim() == 2:
        return context.reshape(x.shape[0], features)
    if context.dim() == 2:
        return context[:, :, None, None].expand(-1, -1, *x.shape[2:])
    if context.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"a per-pixel context must have the input's spatial size {tuple(x.shape[2:])}, got {tuple(context.shape)}"
        )
    return context
