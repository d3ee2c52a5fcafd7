"""Where a warning points: the user's line that called into fastflow, not the library's own frames."""

from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["warn_at_caller"]

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep for module in (sys.modules["fastflow"], torch)
)
_EXAMPLES_DIR = os.path.join(_LIBRARY_DIRS[0], "examples") + os.sep  # user code shipped in the package


def _library_frame(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_LIBRARY_DIRS) and not path.startswith(_EXAMPLES_DIR)


@torch.compiler.disable  # run as Python under torch.compile (Dynamo would warn that it cannot trace the frame walk)
def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside fastflow and torch (a module's
    ``__call__`` is torch's; fastflow's examples are user code): the user's call. Given as that frame's file and
    line (``warn_explicit``), not as a ``stacklevel``, which counts frames differently under ``torch.compile``
    (Dynamo's resumed frames)."""
    frame = sys._getframe(1)
    while frame.f_back is not None and _library_frame(frame.f_code.co_filename):
        frame = frame.f_back
    warnings.warn_explicit(
        message,
        category,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__"),
        registry=frame.f_globals.setdefault("__warningregistry__", {}),
    )  # no module_globals: under `python -c`, `python -` or a REPL, __main__'s loader raises ImportError for source
