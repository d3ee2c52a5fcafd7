"""Host-side launch arithmetic shared by the launchers, in plain Python ints.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from host code each pays a
wrapper that unwraps its arguments, a few microseconds per call on a path that runs per launch."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["cached_on_sizes", "cdiv", "launch_device", "next_power_of_2"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _concrete(value: Any) -> Any:
    if isinstance(value, torch.SymInt):
        return int(value)
    if isinstance(value, tuple):
        items = [_concrete(v) for v in value]
        return type(value)._make(items) if hasattr(value, "_make") else tuple(items)  # NamedTuples stay such
    return value


def cached_on_sizes(fn: _F) -> _F:
    """``functools.lru_cache`` for launch geometry, a pure function of sizes and strides (plain ints and tuples).
    Under ``torch.compile`` with dynamic shapes they arrive as ``SymInt``s, which the cache cannot hash and Triton's
    launch geometry cannot use: such a call makes them concrete first (``int()``, a guard: the compiled graph is
    specialised to these sizes, and a new size recompiles). The cached path pays nothing for it."""
    cached = functools.lru_cache(maxsize=1024)(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return cached(*args, **kwargs)
        except TypeError:  # unhashable: a SymInt among the sizes
            return cached(*map(_concrete, args), **{k: _concrete(v) for k, v in kwargs.items()})

    return call  # type: ignore[return-value]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two ``>= n`` for ``n >= 1`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    """A context making ``t``'s CUDA device current for a launch: Triton launches on the current device and its
    current stream, not on the tensors' (from ``cuda:1`` while ``cuda:0`` is current a launch fails with "cannot be
    accessed from Triton", or, with peer access, runs on the other device's stream, unordered with ``t``'s work).
    Entered only where ``t``'s device is not current already; off CUDA nothing."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
