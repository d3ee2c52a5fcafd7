"""Tests for fastflow/ops/overlap.py: whether two tensors share memory, never a false "no"."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from fastflow.ops.overlap import share_elements


def test_exact_for_slices_and_halves_of_one_tensor() -> None:
    """Interleaved halves (the Jet walk's shift and raw, chunks of one output) and disjoint slices share nothing;
    partly overlapping slices, a tensor and itself, and a view and its base do."""
    base = torch.randn(3, 8, 6)
    first, second = base.chunk(2, dim=-1)
    assert not share_elements(first, second)
    assert not share_elements(base[:, :4], base[:, 4:])
    assert not share_elements(base[:, 0::2], base[:, 1::2])
    assert not share_elements(base, torch.randn(3, 8, 6))
    assert share_elements(base[:, 0:4], base[:, 2:6])
    assert share_elements(base[:, 0::2], base[:, 2::2])
    assert share_elements(first, first)
    assert share_elements(base, first)  # other shapes: the ranges meet
    assert not share_elements(base[:0], base)


def test_never_says_no_for_views_that_share_an_element() -> None:
    """Every pair of strided views of a small storage against the exact intersection of their element offsets:
    no false "no" (a false "yes" is allowed only where shapes or strides differ)."""
    storage = torch.zeros(24)
    views = [
        storage.as_strided(size, stride, offset)
        for size, stride in (((2, 3), (6, 1)), ((2, 3), (12, 2)), ((3, 2), (1, 3)), ((2, 2, 2), (8, 2, 1)))
        for offset in range(0, 5)
    ]

    def offsets(t: torch.Tensor) -> set[int]:
        ranges = [range(n) for n in t.shape]
        return {t.storage_offset() + sum(i * s for i, s in zip(idx, t.stride())) for idx in itertools.product(*ranges)}

    for a, b in itertools.product(views, views):
        exact = bool(offsets(a) & offsets(b))
        if exact:
            assert share_elements(a, b), (a.shape, a.stride(), a.storage_offset(), b.stride(), b.storage_offset())
        elif a.shape == b.shape and a.stride() == b.stride():
            assert not share_elements(a, b)


def test_tensors_of_two_storages_over_the_same_memory() -> None:
    """Two storages can cover the same memory (``torch.from_numpy`` of overlapping numpy views, ``frombuffer``):
    compared by address, not by storage."""
    array = np.zeros(16, dtype=np.float32)
    a, b = torch.from_numpy(array[0:8]), torch.from_numpy(array[4:12])
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert share_elements(a, b)
    assert not share_elements(torch.from_numpy(array[0:4]), torch.from_numpy(array[4:8]))
