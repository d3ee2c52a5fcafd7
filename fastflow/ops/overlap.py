"""Whether two tensors share memory: what an op that writes over several of its inputs must rule out."""

from __future__ import annotations

import torch

__all__ = ["share_elements"]


def _span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last]`` element offsets of ``t`` in its storage (strides are never negative in torch)."""
    first = t.storage_offset()
    return first, first + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _nested(dims: list[tuple[int, int]]) -> bool:
    """Whether ``(stride, size)`` pairs, by decreasing stride, each step farther than all the smaller ones reach:
    then an offset has at most two candidate indices per dimension (floor and ceiling of its quotient)."""
    return all(stride > sum((size - 1) * s for s, size in dims[k + 1 :]) for k, (stride, _) in enumerate(dims))


def _reachable(offset: int, dims: list[tuple[int, int]]) -> bool:
    """Whether ``offset = sum_k d_k stride_k`` for some ``|d_k| <= size_k - 1`` (``dims`` nested)."""
    if not dims:
        return offset == 0
    (stride, size), rest = dims[0], dims[1:]
    return any(
        abs(d) <= size - 1 and _reachable(offset - d * stride, rest) for d in {offset // stride, -(-offset // stride)}
    )


def share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` have an element at the same memory, compared by address (two storages may cover the
    same memory: ``from_numpy`` of overlapping arrays, ``frombuffer``). Exact for tensors of one shape, strides and
    dtype whose starts lie a whole number of elements apart and whose strides nest (the halves or chunks of one
    tensor, interleaved or not, as every dense layout's and its slices'); otherwise True as soon as their memory
    ranges meet (conservative: never a false "no")."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    (a_first, a_last), (b_first, b_last) = _span(a), _span(b)
    a_start = a.data_ptr()
    b_start = b.data_ptr()
    a_end = a_start + (a_last - a_first + 1) * a.element_size()
    b_end = b_start + (b_last - b_first + 1) * b.element_size()
    if a_end <= b_start or b_end <= a_start:
        return False
    if a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype:
        return True
    apart, rest = divmod(b_start - a_start, a.element_size())
    dims = sorted(((stride, n) for n, stride in zip(a.shape, a.stride()) if n > 1), reverse=True)
    if rest or any(stride == 0 for stride, _ in dims) or not _nested(dims):
        return True
    return _reachable(apart, dims)
