"""Two-dimensional toy densities: scikit-learn's two moons and a ring of eight Gaussians."""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TOY_DATASETS", "eight_gaussians", "toy_dataset", "two_moons"]

TOY_DATASETS = ("moons", "gaussians")


def two_moons(n: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """``n`` points ``(n, 2)`` float32 of ``sklearn.datasets.make_moons`` (two interleaved half circles)."""
    try:
        from sklearn.datasets import make_moons
    except ImportError as e:
        raise ImportError("the two-moons data needs scikit-learn: pip install 'fastflow[data]'") from e
    points, _ = make_moons(n, noise=noise, random_state=seed)
    return torch.from_numpy(points).float()


def eight_gaussians(n: int, seed: int, radius: float = 2.0, std: float = 0.2) -> torch.Tensor:
    """``n`` points ``(n, 2)`` float32 from an equal mixture of eight isotropic Gaussians (standard deviation
    ``std``) centred on a circle of ``radius``, at angles ``k * pi / 4``."""
    rng = np.random.default_rng(seed)
    angles = rng.integers(0, 8, size=n) * (math.pi / 4)
    centres = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return torch.from_numpy(centres + std * rng.standard_normal((n, 2))).float()


def toy_dataset(name: str, n: int, seed: int) -> torch.Tensor:
    """``n`` points ``(n, 2)`` of the toy set ``name`` (one of :data:`TOY_DATASETS`), drawn with ``seed``."""
    if name == "moons":
        return two_moons(n, seed)
    if name == "gaussians":
        return eight_gaussians(n, seed)
    raise ValueError(f"name must be one of {TOY_DATASETS}, got {name!r}")
