"""Training data as integer pixel levels: scikit-learn's 8x8 digits (17 grey levels), random crops of the two
photos bundled with scikit-learn, and the step-seeded batches the training loop draws from them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from fastflow.image_folder import load_image
from fastflow.models import dequantize
from fastflow.ops._checks import int_at_least

__all__ = [
    "DIGITS_N_BINS",
    "HELDOUT_FRACTION",
    "ImageSource",
    "PhotoCrops",
    "TensorImages",
    "batch_at_step",
    "digits_of_class",
    "load_digits",
    "load_image_spec",
    "load_photo_crops",
    "load_photos",
    "quantize",
    "split_heldout",
]

DIGITS_N_BINS = 17
HELDOUT_FRACTION = 0.15  # of the digits and of an image folder, held out at random (seed 0) to measure bits/dim
PHOTO_HELDOUT_FRACTION = 1 / 6  # right-hand strip of each photo, never cropped for training
QUANTIZE_CHUNK = 1 << 20  # pixels quantized at a time: the int32 temporaries stay a few MiB for any data size


class ImageSource(Protocol):
    """Integer pixel levels in ``[0, n_bins)`` of shape ``(C, H, W)``, drawn ``n`` at a time."""

    image_shape: tuple[int, int, int]

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(levels (n, C, H, W) integer (uint8 for the loaders here), labels (n,) or None)`` drawn with
        ``generator``."""
        ...


@dataclass
class TensorImages:
    """A fixed set of images ``levels`` ``(N, C, H, W)`` (integer) with optional ``labels`` ``(N,)``;
    :meth:`draw` samples with replacement."""

    levels: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        integer = not (self.levels.is_floating_point() or self.levels.is_complex() or self.levels.dtype == torch.bool)
        if not integer or self.levels.dim() != 4 or len(self.levels) == 0:
            raise ValueError(
                f"levels must be a non-empty integer tensor (N, C, H, W), got {self.levels.dtype} "
                f"{tuple(self.levels.shape)}"
            )
        if self.labels is not None:
            if self.labels.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"labels must be integer class labels, got {self.labels.dtype}")
            if self.labels.shape != (len(self.levels),):
                raise ValueError(f"labels must have shape ({len(self.levels)},), got {tuple(self.labels.shape)}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.levels.shape[1:])  # type: ignore[return-value]

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` images drawn uniformly with replacement."""
        idx = torch.randint(0, len(self.levels), (n,), generator=generator)
        return self.levels[idx], None if self.labels is None else self.labels[idx]


@dataclass
class PhotoCrops:
    """Random ``resolution`` x ``resolution`` crops of ``photos`` (a list of integer ``(C, H, W)`` tensors)."""

    photos: list[torch.Tensor]
    resolution: int

    def __post_init__(self) -> None:
        for i, photo in enumerate(self.photos):
            if min(photo.shape[1:]) < self.resolution:
                raise ValueError(f"photos[{i}] of shape {tuple(photo.shape)} is smaller than {self.resolution}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, resolution, resolution)``."""
        return (self.photos[0].shape[0], self.resolution, self.resolution)

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, None]:
        """``n`` crops: a photo, then a top-left corner, uniformly at random."""
        which = torch.randint(0, len(self.photos), (n,), generator=generator).tolist()
        crops = []
        for i in which:
            _, h, w = self.photos[i].shape
            top = int(torch.randint(0, h - self.resolution + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - self.resolution + 1, (1,), generator=generator))
            crops.append(self.photos[i][:, top : top + self.resolution, left : left + self.resolution])
        return torch.stack(crops), None


def quantize(pixels: torch.Tensor, n_bins: int) -> torch.Tensor:
    """8-bit ``pixels`` (uint8) to ``n_bins`` integer levels ``floor(p * n_bins / 256)`` as uint8, same shape
    (levels lie below ``n_bins <= 256``); for ``n_bins = 2**n_bits`` this keeps the top ``n_bits`` bits.
    Computed about ``QUANTIZE_CHUNK`` pixels at a time (whole images, in the input's own layout, which the result
    keeps): beyond the result, memory stays small for any size."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    int_at_least("n_bins", n_bins, 2)  # an int: a float gave float levels
    if n_bins > 256:
        raise ValueError(f"n_bins must be in [2, 256], got {n_bins}")
    levels = torch.empty_like(pixels)
    source, target = (pixels, levels) if pixels.dim() else (pixels[None], levels[None])
    step = max(QUANTIZE_CHUNK // max(source[0].numel(), 1), 1) if len(source) else 1
    for start in range(0, len(source), step):
        chunk = source[start : start + step].to(torch.int32)  # p * n_bins reaches 65280, past int16
        target[start : start + step] = (chunk * n_bins) >> 8
    return levels


def load_digits(
    test_fraction: float = HELDOUT_FRACTION, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_levels, train_labels, test_levels, test_labels)``: uint8 pixel levels in ``[0, 17)`` of
    shape ``(N, 1, 8, 8)`` and int64 digit labels, split at random (fixed ``seed``) with ``test_fraction`` held out."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded digits data needs scikit-learn: pip install 'fastflow[data]'") from err
    bunch = sk_load_digits()
    levels = torch.as_tensor(bunch.images, dtype=torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    train, test = split_heldout(len(levels), test_fraction, seed)
    return levels[train], labels[train], levels[test], labels[test]


def split_heldout(n: int, test_fraction: float = HELDOUT_FRACTION, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_indices, test_indices)``: a fixed-``seed`` random split of ``range(n)`` with
    ``round(n * test_fraction)`` (at least one) held out and at least one kept for training."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"need at least 2 images to hold some out, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(max(1, round(n * test_fraction)), n - 1)
    return order[n_test:], order[:n_test]


def load_photos() -> list[torch.Tensor]:
    """scikit-learn's two bundled photos (china.jpg, flower.jpg) as uint8 ``(3, 427, 640)`` tensors."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded photos need scikit-learn and pillow: pip install 'fastflow[data]'") from err
    return [torch.tensor(image).permute(2, 0, 1).contiguous() for image in load_sample_images().images]


def load_photo_crops(
    resolution: int, n_bins: int, heldout_crops: int = 64, seed: int = 0
) -> tuple[PhotoCrops, TensorImages]:
    """``(train, heldout)`` from the bundled photos quantized to ``n_bins`` levels: training crops come from
    the left part of each photo, ``heldout_crops`` times the number of photos fixed crops (``seed``; each from a
    photo drawn at random) from the right-hand strips (a sixth of the width, at least ``resolution``), so
    held-out pixels are never trained on."""
    photos = [quantize(photo, n_bins) for photo in load_photos()]
    width = photos[0].shape[2]
    strip = max(resolution, round(width * PHOTO_HELDOUT_FRACTION))
    largest = min(photos[0].shape[1], width // 2)  # the held-out strip and the training part both fit a crop
    if resolution < 1 or resolution > largest:
        raise ValueError(f"resolution must be in [1, {largest}] for the embedded photos, got {resolution}")
    train = PhotoCrops([p[:, :, : width - strip] for p in photos], resolution)
    heldout = PhotoCrops([p[:, :, width - strip :] for p in photos], resolution)
    levels, _ = heldout.draw(heldout_crops * len(photos), torch.Generator().manual_seed(seed))
    return train, TensorImages(levels)


def batch_at_step(
    source: ImageSource, step: int, batch: int, n_bins: int, seed: int = 0, *, check_range: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dequantized training batch ``(x (batch, C, H, W) float32 on the source's device, labels or None)`` of
    ``step``; ``check_range=False`` skips the levels' range check (a host read) for a source checked once, whole
    (see :func:`~fastflow.models.dequantize`).

    Images and dequantization noise are a function of ``(seed, step)`` only, never of the global RNG: a run
    resumed at ``step`` sees the batches of an uninterrupted run, and every rank of a distributed run draws
    the same global batch (then keeps its shard, :func:`fastflow.distributed.shard`)."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be >= 0, got seed={seed}, step={step}")
    # torch's CPU generator keeps 32 bits of a seed: mix (seed, step) into them with numpy's SeedSequence.
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    levels, labels = source.draw(batch, generator)
    return dequantize(levels, n_bins, generator, check_range=check_range), labels  # no global RNG reseeded


def _check_embedded(spec: str, image_shape: tuple[int, ...], n_bins: int, shape: tuple[int, ...], bins: int) -> None:
    if tuple(image_shape) != shape or n_bins != bins:
        raise ValueError(
            f"{spec} is a {'x'.join(map(str, shape))} image with {bins} levels, but the model takes "
            f"{'x'.join(map(str, image_shape))} images with {n_bins} levels"
        )


def load_image_spec(spec: str, image_shape: tuple[int, int, int], n_bins: int) -> torch.Tensor:
    """One image as uint8 levels ``(1, C, H, W)`` for a model of ``image_shape`` and ``n_bins``: ``digits:N``
    (the N-th held-out digit), ``photos:N`` (the N-th held-out photo crop) or the path of a PNG/JPEG file
    (resized and center-cropped, see :mod:`fastflow.image_folder`). ``ValueError`` naming ``spec`` if it does
    not fit the model."""
    kind, _, index = spec.partition(":")
    if kind in ("digits", "photos") and not index.isdigit() and not os.path.exists(spec):
        raise ValueError(f"{spec}: the index after '{kind}:' must be an integer >= 0")
    if kind in ("digits", "photos") and index.isdigit():
        if kind == "digits":
            _check_embedded(spec, image_shape, n_bins, (1, 8, 8), DIGITS_N_BINS)
            levels = load_digits()[2]
        else:
            _check_embedded(spec, image_shape, n_bins, (3, image_shape[1], image_shape[1]), n_bins)
            try:
                levels = load_photo_crops(image_shape[1], n_bins)[1].levels
            except ValueError as err:  # the model's image size, not a flag of the caller's
                raise ValueError(f"{spec}: the model's images are {image_shape[1]} pixels wide: {err}") from err
        if int(index) >= len(levels):
            raise ValueError(f"{spec}: there are {len(levels)} held-out {kind} (0 to {len(levels) - 1})")
        return levels[int(index)].unsqueeze(0)
    if image_shape[1] != image_shape[2]:
        raise ValueError(f"{spec}: an image file is cropped square, but the model's images are {image_shape[1:]}")
    return quantize(load_image(spec, image_shape[1], image_shape[0]), n_bins).unsqueeze(0)


def digits_of_class(label: int) -> torch.Tensor:
    """The training digits of class ``label`` (0 to 9) as uint8 levels ``(N, 1, 8, 8)``."""
    if isinstance(label, bool) or not isinstance(label, int):
        raise TypeError(f"digit label must be an int, got {type(label).__name__} {label!r}")
    if not 0 <= label <= 9:
        raise ValueError(f"digit label must be in [0, 9], got {label}")
    levels, labels, _, _ = load_digits()
    return levels[labels == label]
