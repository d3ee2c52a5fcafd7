"""The models' constructor argument check: an int (not a bool) at least some bound."""

from __future__ import annotations

__all__ = ["int_at_least"]


def int_at_least(name: str, value: object, low: int) -> int:
    """``value``, or a ``TypeError`` (not an int, or a bool) / ``ValueError`` (below ``low``) naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value
