"""Host-side launch arithmetic shared by the launchers, in plain Python ints.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions: called from host code each pays a
wrapper that unwraps its arguments, a few microseconds per call on a path that runs per launch."""

from __future__ import annotations

__all__ = ["cdiv", "next_power_of_2"]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ``b > 0``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two ``>= n`` for ``n >= 1`` (0 for 0, as ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
