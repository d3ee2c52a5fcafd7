"""A cap on the memory that building a model from an untrusted config may allocate."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["AllocationBudget", "construction_budget", "construction_ops"]

CONSTRUCTION_FACTOR = 4
"""Building a model allocates about its ``state_dict``'s bytes (1.0-1.4x for every model class, measured on
2026-11-27: initialisation temporaries are small); a loader lets it allocate this many times the bytes of the
weights it is about to load, plus :data:`CONSTRUCTION_SLACK`."""

CONSTRUCTION_SLACK = 64 * 2**20

CONSTRUCTION_OPS_PER_TENSOR = 16
"""Building a model runs 2-5 tensor operations per tensor of its ``state_dict`` (every model class, measured on
2026-11-28); a loader lets it run this many per tensor it is about to load, plus :data:`CONSTRUCTION_OPS_SLACK`:
a config declaring a billion layers of one-element weights allocates few bytes per layer, but each costs time
and Python objects the byte count does not see."""

CONSTRUCTION_OPS_SLACK = 1024


def construction_budget(weight_bytes: int) -> int:
    """The bytes a model built to hold ``weight_bytes`` of weights may allocate while it is constructed."""
    return CONSTRUCTION_FACTOR * weight_bytes + CONSTRUCTION_SLACK


def construction_ops(weight_tensors: int) -> int:
    """The tensor operations constructing a model of ``weight_tensors`` tensors may run."""
    return CONSTRUCTION_OPS_PER_TENSOR * weight_tensors + CONSTRUCTION_OPS_SLACK


def _requested_bytes(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """What a factory op (``empty``, ``zeros``, ``randn``, ...: a size as its first argument) will allocate, before
    it does; None for other ops."""
    size = args[0] if args else None
    if not isinstance(size, (list, tuple)) or not all(isinstance(n, int) for n in size):
        return None
    dtype = kwargs.get("dtype") or torch.get_default_dtype()
    return math.prod(size) * dtype.itemsize


class AllocationBudget(TorchDispatchMode):
    """Within the block, ``ValueError`` (saying ``what`` is being built) once the tensors that ops create add up to
    more than ``limit`` bytes, or more than ``max_ops`` ops run: bytes checked before a factory op allocates (so
    one huge tensor is never made) and after any other op (views and in-place results are not counted). A config of
    a hundred bytes could otherwise declare a model of many gigabytes, exhausting the memory before its weights are
    compared with it, or of a billion tiny layers, building for hours."""

    def __init__(self, limit: int, max_ops: int | None, what: str) -> None:
        super().__init__()
        self.limit = limit
        self.max_ops = max_ops
        self.what = what
        self.allocated = 0
        self.ops = 0

    def _add(self, nbytes: int) -> None:
        self.allocated += nbytes
        if self.allocated > self.limit:
            raise ValueError(
                f"building {self.what} would allocate more than {self.limit / 2**20:.0f} MiB, far more than its "
                "weights take: its config does not describe them"
            )

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.ops += 1
        if self.max_ops is not None and self.ops > self.max_ops:
            raise ValueError(
                f"building {self.what} would run more than {self.max_ops} tensor operations, far more than the "
                "weights it is built for need: its config does not describe them"
            )
        requested = _requested_bytes(args, kwargs)
        if requested is not None:
            self._add(requested)
        out = func(*args, **kwargs)
        if requested is None and not func._schema.is_mutable:
            self._add(sum(t.numel() * t.element_size() for t in tree_leaves(out) if _new_tensor(t)))
        return out


def _new_tensor(t: object) -> bool:
    return isinstance(t, torch.Tensor) and not t._is_view()
