"""Where a warning points: the user's line that called into fastflow, not the library's own frames."""

from __future__ import annotations

import os
import sys

import torch

__all__ = ["user_stacklevel"]

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep for module in (sys.modules["fastflow"], torch)
)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the function calling this one that names the first frame
    outside fastflow and torch (a module's ``__call__`` is torch's): the user's call."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level
