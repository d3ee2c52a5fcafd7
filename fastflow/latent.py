"""Latent-space applications of a trained flow: interpolation between two images and attribute manipulation.

A model's latents are a list (one per split, then the top latent); here they are flattened and concatenated
to one vector of ``D = C * H * W`` numbers per image, edited linearly, then split back and decoded. Images
are encoded at the centres of their pixel bins, ``(k + 0.5) / n_bins - 0.5``, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastflow.models import FlowModel
from fastflow.models.base import check_levels, eval_mode
from fastflow.models.priors import check_labels_as
from fastflow.ops._checks import int_at_least

__all__ = ["attribute_direction", "decode_flat", "encode_flat", "interpolate", "manipulate"]


def _check_quantized(model: FlowModel) -> None:
    if model.n_bins is None:
        raise ValueError(
            f"the latent API edits images of quantized levels: {type(model).__name__} has no n_bins (vector data)"
        )


def _rows(context: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if context is None else context[start:stop]


def _bin_centres(levels: torch.Tensor, n_bins: int, dtype: torch.dtype) -> torch.Tensor:
    """``(k + 0.5) / n_bins - 0.5`` of integer ``levels`` in ``dtype``, computed in at least float32 and rounded
    once: ``k + 0.5`` is not exact in bfloat16 or float16 for large ``k`` (bfloat16 rounds 255.5 to 256, level 255
    to 0.5, outside ``[-0.5, 0.5)``)."""
    return ((levels.to(torch.promote_types(dtype, torch.float32)) + 0.5) / n_bins - 0.5).to(dtype)


def _check_context_rows(name: str, context: object, rows: int) -> torch.Tensor | None:
    """``context`` (None, or a tensor of one row per image: ``rows`` of them), or a clear error naming ``name``."""
    if context is None:
        return None
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(context).__name__}")
    if context.dim() == 0 or len(context) != rows:
        raise ValueError(f"{name} must have one row per image ({rows}), got shape {tuple(context.shape)}")
    return context


@torch.no_grad()
def encode_flat(
    model: FlowModel,
    levels: torch.Tensor,
    batch: int = 256,
    name: str = "levels",
    context: torch.Tensor | None = None,
    context_name: str = "context",
) -> tuple[torch.Tensor, list[torch.Size]]:
    """``(z (N, D), shapes)``: the latents of integer ``levels`` ``(N, C, H, W)`` (``N >= 1``, in ``[0, n_bins)``;
    ``name`` is what errors call them) concatenated per image, in the model's dtype, and the per-image shape of
    each latent for :func:`decode_flat`. ``context``: one row per image for a conditional model (class labels
    ``(N,)`` for a class-conditional one; ``context_name`` is what errors call it). Runs the model in eval mode
    and leaves its mode as it was."""
    _check_quantized(model)
    check_levels(name, levels, model.image_shape, model.n_bins)
    int_at_least("batch", batch, 1)
    context = _check_context_rows(context_name, context, len(levels))
    if context is None and model.conditional:
        raise ValueError(f"{context_name} is required: {type(model).__name__} is conditional (one row per image)")
    if model.prior.conditional:  # here, so that the message names the argument
        check_labels_as(model.prior, context, f"{context_name} (class labels)")
    parameter = model.floating_parameter()
    flat, shapes = [], []
    with eval_mode(model):
        for start in range(0, len(levels), batch):
            x = _bin_centres(levels[start : start + batch], model.n_bins, parameter.dtype)
            latents = model.encode(x.to(parameter.device), _rows(context, start, start + batch))
            shapes = [z.shape[1:] for z in latents]
            flat.append(torch.cat([z.flatten(1) for z in latents], dim=1))
    return torch.cat(flat), shapes


@torch.no_grad()
def decode_flat(
    model: FlowModel, z: torch.Tensor, shapes: Sequence[torch.Size], context: torch.Tensor | None = None
) -> torch.Tensor:
    """Images ``(N, C, H, W)`` in about ``[-0.5, 0.5]`` from flat latents ``z`` ``(N, D)`` (see
    :func:`encode_flat`; ``context`` one row per image), decoded in eval mode (the model's mode is left as it
    was)."""
    try:
        shapes = [torch.Size(s) for s in shapes]  # encode_flat's, or sequences of ints (read back from JSON)
    except (TypeError, ValueError) as err:
        raise TypeError(f"shapes must be a sequence of shapes (sequences of ints), got {shapes!r}") from err
    sizes = [s.numel() for s in shapes]
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != sum(sizes):
        raise ValueError(f"z must have shape (N, {sum(sizes)}), got {tuple(getattr(z, 'shape', ()))}")
    dtype = model.floating_parameter().dtype
    if z.dtype != dtype:
        raise TypeError(f"z is {z.dtype} but the model is {dtype}: convert one, e.g. z.to({dtype})")
    context = _check_context_rows("context", context, len(z))
    parts = z.split(sizes, dim=1)
    with eval_mode(model):
        return model.decode([p.reshape(len(z), *s) for p, s in zip(parts, shapes)], context)


def _repeated(context: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if context is None else context.expand(rows, *context.shape[1:])


def _one_image(name: str, model: FlowModel, image: object) -> torch.Tensor:
    image = check_levels(name, image, model.image_shape, model.n_bins)
    if len(image) != 1:
        raise ValueError(f"{name} must hold one image, got {len(image)}")
    return image


def interpolate(
    model: FlowModel, a: torch.Tensor, b: torch.Tensor, steps: int = 8, context: torch.Tensor | None = None
) -> torch.Tensor:
    """``steps`` images ``(steps, C, H, W)`` decoded from ``(1 - t) z_a + t z_b`` for ``t`` evenly spaced in
    ``[0, 1]``, where ``z_a``, ``z_b`` are the flat latents of the single images ``a``, ``b`` (``(1, C, H, W)``
    integer levels): the first and last images are the reconstructions of ``a`` and ``b``. A conditional model
    interpolates at one ``context`` (one row: a class label ``(1,)`` for a class-conditional model), which
    encodes both images and decodes every step."""
    _check_quantized(model)
    int_at_least("steps", steps, 2)
    images = torch.cat([_one_image("a", model, a), _one_image("b", model, b)])
    context = _check_context_rows("context", context, 1)
    z, shapes = encode_flat(model, images, context=_repeated(context, 2))
    t = torch.linspace(0.0, 1.0, steps, device=z.device, dtype=z.dtype)[:, None]
    return decode_flat(model, (1 - t) * z[0] + t * z[1], shapes, _repeated(context, steps))


def attribute_direction(
    model: FlowModel,
    with_attribute: torch.Tensor,
    without: torch.Tensor,
    context_with: torch.Tensor | None = None,
    context_without: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat latent direction ``(D,)``: mean latent of the images ``with_attribute`` minus the mean latent of
    the images ``without`` (integer levels ``(N, C, H, W)`` each; a conditional model's contexts one row per
    image of each)."""
    z_with, _ = encode_flat(
        model, with_attribute, name="with_attribute", context=context_with, context_name="context_with"
    )
    z_without, _ = encode_flat(model, without, name="without", context=context_without, context_name="context_without")
    return z_with.mean(0) - z_without.mean(0)


def manipulate(
    model: FlowModel,
    image: torch.Tensor,
    direction: torch.Tensor,
    strengths: Sequence[float],
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Images ``(len(strengths), C, H, W)`` decoded from ``z + s * direction`` for each strength ``s``, where
    ``z`` is the flat latent of the single image ``image`` (``(1, C, H, W)`` integer levels); a conditional
    model's ``context`` (one row) encodes the image and decodes every result."""
    _check_quantized(model)
    image = _one_image("image", model, image)
    context = _check_context_rows("context", context, 1)
    z, shapes = encode_flat(model, image, name="image", context=context)
    if not isinstance(direction, torch.Tensor) or not direction.is_floating_point():
        found = getattr(direction, "dtype", type(direction).__name__)
        raise TypeError(f"direction must be a floating-point torch.Tensor, got {found}")
    if direction.shape != (z.shape[1],):
        raise ValueError(f"direction must have shape ({z.shape[1]},), got {tuple(direction.shape)}")
    if not bool(torch.isfinite(direction).all()):  # decoded, it failed as non-finite samples, naming the latents
        raise ValueError("direction holds NaN/Inf values")
    try:
        s = torch.as_tensor(strengths, dtype=z.dtype).to(z.device)  # a list or a tensor of strengths
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"strengths must be a sequence of numbers, got {strengths!r}") from err
    if s.dim() > 1 or s.numel() == 0 or not torch.isfinite(s).all():
        raise ValueError(f"strengths must be a non-empty 1-D sequence of finite numbers, got {strengths!r}")
    s = s.reshape(-1, 1)
    return decode_flat(model, z + s * direction.to(z.device, z.dtype), shapes, _repeated(context, len(s)))
