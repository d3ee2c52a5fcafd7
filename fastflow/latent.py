"""Latent-space applications of a trained flow: interpolation between two images and attribute manipulation.

A model's latents are a list (one per split, then the top latent); here they are flattened and concatenated
to one vector of ``D = C * H * W`` numbers per image, edited linearly, then split back and decoded. Images
are encoded at the centres of their pixel bins, ``(k + 0.5) / n_bins - 0.5``, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastflow.models import FlowModel

__all__ = ["attribute_direction", "decode_flat", "encode_flat", "interpolate", "manipulate"]


def _check_levels(name: str, levels: torch.Tensor, model: FlowModel) -> None:
    if levels.is_floating_point() or levels.dim() != 4 or tuple(levels.shape[1:]) != tuple(model.image_shape):
        raise ValueError(
            f"{name} must be integer pixel levels of shape (N, {', '.join(map(str, model.image_shape))}), "
            f"got {levels.dtype} {tuple(levels.shape)}"
        )


@torch.no_grad()
def encode_flat(model: FlowModel, levels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, list[torch.Size]]:
    """``(z (N, D) float32, shapes)``: the latents of integer ``levels`` ``(N, C, H, W)`` concatenated per
    image, and the per-image shape of each latent for :func:`decode_flat`."""
    _check_levels("levels", levels, model)
    model.eval()
    device = next(model.parameters()).device
    flat, shapes = [], []
    for start in range(0, len(levels), batch):
        x = (levels[start : start + batch].float() + 0.5) / model.n_bins - 0.5
        latents = model.encode(x.to(device))
        shapes = [z.shape[1:] for z in latents]
        flat.append(torch.cat([z.flatten(1) for z in latents], dim=1))
    return torch.cat(flat), shapes


@torch.no_grad()
def decode_flat(model: FlowModel, z: torch.Tensor, shapes: Sequence[torch.Size]) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in about ``[-0.5, 0.5]`` from flat latents ``z`` ``(N, D)`` (see
    :func:`encode_flat`)."""
    model.eval()
    sizes = [s.numel() for s in shapes]
    if z.dim() != 2 or z.shape[1] != sum(sizes):
        raise ValueError(f"z must have shape (N, {sum(sizes)}), got {tuple(z.shape)}")
    parts = z.split(sizes, dim=1)
    return model.decode([p.reshape(len(z), *s) for p, s in zip(parts, shapes)])


def interpolate(model: FlowModel, a: torch.Tensor, b: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """``steps`` images ``(steps, C, H, W)`` decoded from ``(1 - t) z_a + t z_b`` for ``t`` evenly spaced in
    ``[0, 1]``, where ``z_a``, ``z_b`` are the flat latents of the single images ``a``, ``b`` (``(1, C, H, W)``
    integer levels): the first and last images are the reconstructions of ``a`` and ``b``."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    for name, image in (("a", a), ("b", b)):
        if len(image) != 1:
            raise ValueError(f"{name} must hold one image, got {len(image)}")
    z, shapes = encode_flat(model, torch.cat([a, b]))
    t = torch.linspace(0.0, 1.0, steps, device=z.device)[:, None]
    return decode_flat(model, (1 - t) * z[0] + t * z[1], shapes)


def attribute_direction(model: FlowModel, with_attribute: torch.Tensor, without: torch.Tensor) -> torch.Tensor:
    """Flat latent direction ``(D,)``: mean latent of the images ``with_attribute`` minus the mean latent of
    the images ``without`` (integer levels ``(N, C, H, W)`` each)."""
    return encode_flat(model, with_attribute)[0].mean(0) - encode_flat(model, without)[0].mean(0)


def manipulate(
    model: FlowModel, image: torch.Tensor, direction: torch.Tensor, strengths: Sequence[float]
) -> torch.Tensor:
    """Images ``(len(strengths), C, H, W)`` decoded from ``z + s * direction`` for each strength ``s``, where
    ``z`` is the flat latent of the single image ``image`` (``(1, C, H, W)`` integer levels)."""
    if len(image) != 1:
        raise ValueError(f"image must hold one image, got {len(image)}")
    if not strengths:
        raise ValueError("strengths must not be empty")
    z, shapes = encode_flat(model, image)
    if direction.shape != (z.shape[1],):
        raise ValueError(f"direction must have shape ({z.shape[1]},), got {tuple(direction.shape)}")
    s = torch.tensor(list(strengths), dtype=z.dtype, device=z.device)[:, None]
    return decode_flat(model, z + s * direction.to(z.device), shapes)
