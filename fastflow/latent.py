"""Latent-space applications of a trained flow: interpolation between two images and attribute manipulation.

A model's latents are a list (one per split, then the top latent); here they are flattened and concatenated
to one vector of ``D = C * H * W`` numbers per image, edited linearly, then split back and decoded. Images
are encoded at the centres of their pixel bins, ``(k + 0.5) / n_bins - 0.5``, so the result is deterministic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from fastflow.models import FlowModel
from fastflow.models.base import check_levels

__all__ = ["attribute_direction", "decode_flat", "encode_flat", "interpolate", "manipulate"]


@torch.no_grad()
def encode_flat(
    model: FlowModel, levels: torch.Tensor, batch: int = 256, name: str = "levels"
) -> tuple[torch.Tensor, list[torch.Size]]:
    """``(z (N, D), shapes)``: the latents of integer ``levels`` ``(N, C, H, W)`` (``N >= 1``, in ``[0, n_bins)``;
    ``name`` is what errors call them) concatenated per image, in the model's dtype, and the per-image shape of
    each latent for :func:`decode_flat`. Runs the model in eval mode and leaves its mode as it was."""
    check_levels(name, levels, model.image_shape, model.n_bins)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    parameter = model.floating_parameter()
    flat, shapes = [], []
    with _eval_mode(model):
        for start in range(0, len(levels), batch):
            x = (levels[start : start + batch].to(parameter.dtype) + 0.5) / model.n_bins - 0.5
            latents = model.encode(x.to(parameter.device))
            shapes = [z.shape[1:] for z in latents]
            flat.append(torch.cat([z.flatten(1) for z in latents], dim=1))
    return torch.cat(flat), shapes


@torch.no_grad()
def decode_flat(model: FlowModel, z: torch.Tensor, shapes: Sequence[torch.Size]) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in about ``[-0.5, 0.5]`` from flat latents ``z`` ``(N, D)`` (see
    :func:`encode_flat`), decoded in eval mode (the model's mode is left as it was)."""
    sizes = [s.numel() for s in shapes]
    if z.dim() != 2 or z.shape[1] != sum(sizes):
        raise ValueError(f"z must have shape (N, {sum(sizes)}), got {tuple(z.shape)}")
    parts = z.split(sizes, dim=1)
    with _eval_mode(model):
        return model.decode([p.reshape(len(z), *s) for p, s in zip(parts, shapes)])


@contextlib.contextmanager
def _eval_mode(model: FlowModel) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def interpolate(model: FlowModel, a: torch.Tensor, b: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """``steps`` images ``(steps, C, H, W)`` decoded from ``(1 - t) z_a + t z_b`` for ``t`` evenly spaced in
    ``[0, 1]``, where ``z_a``, ``z_b`` are the flat latents of the single images ``a``, ``b`` (``(1, C, H, W)``
    integer levels): the first and last images are the reconstructions of ``a`` and ``b``."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    for name, image in (("a", a), ("b", b)):
        if len(check_levels(name, image, model.image_shape, model.n_bins)) != 1:
            raise ValueError(f"{name} must hold one image, got {len(image)}")
    z, shapes = encode_flat(model, torch.cat([a, b]))
    t = torch.linspace(0.0, 1.0, steps, device=z.device)[:, None]
    return decode_flat(model, (1 - t) * z[0] + t * z[1], shapes)


def attribute_direction(model: FlowModel, with_attribute: torch.Tensor, without: torch.Tensor) -> torch.Tensor:
    """Flat latent direction ``(D,)``: mean latent of the images ``with_attribute`` minus the mean latent of
    the images ``without`` (integer levels ``(N, C, H, W)`` each)."""
    z_with = encode_flat(model, with_attribute, name="with_attribute")[0]
    return z_with.mean(0) - encode_flat(model, without, name="without")[0].mean(0)


def manipulate(
    model: FlowModel, image: torch.Tensor, direction: torch.Tensor, strengths: Sequence[float]
) -> torch.Tensor:
    """Images ``(len(strengths), C, H, W)`` decoded from ``z + s * direction`` for each strength ``s``, where
    ``z`` is the flat latent of the single image ``image`` (``(1, C, H, W)`` integer levels)."""
    if len(image) != 1:
        raise ValueError(f"image must hold one image, got {len(image)}")
    z, shapes = encode_flat(model, image, name="image")
    if direction.shape != (z.shape[1],):
        raise ValueError(f"direction must have shape ({z.shape[1]},), got {tuple(direction.shape)}")
    s = torch.as_tensor(strengths, dtype=z.dtype).to(z.device).reshape(-1, 1)  # a list or a tensor of strengths
    if len(s) == 0:
        raise ValueError("strengths must not be empty")
    return decode_flat(model, z + s * direction.to(z.device), shapes)
