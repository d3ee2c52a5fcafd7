"""Embedded default data: scikit-learn's bundled 8x8 handwritten digits (17 grey levels per pixel)."""

from __future__ import annotations

import torch

__all__ = ["DIGITS_N_BINS", "load_digits"]

DIGITS_N_BINS = 17


def load_digits(
    test_fraction: float = 0.15, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train_levels, train_labels, test_levels, test_labels)``: integer pixel levels in ``[0, 17)`` of
    shape ``(N, 1, 8, 8)`` and digit labels, split at random (fixed ``seed``) with ``test_fraction`` held out."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the embedded digits data needs scikit-learn: pip install 'fastflow[data]'") from err
    bunch = sk_load_digits()
    levels = torch.as_tensor(bunch.images, dtype=torch.int64).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(levels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(levels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return levels[train], labels[train], levels[test], labels[test]
