"""How the ops that launch Triton kernels register with ``torch.library``: decided once, here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from fastflow.backend import interpreter_enabled, triton_available

__all__ = ["TRACEABLE", "kernel_function", "kernels_traceable", "registration"]


def kernels_traceable() -> bool:
    """Whether the ops register as ``torch.library.triton_op``, launching through ``torch.library.wrap_triton``:
    ``torch.compile`` then traces into them and Inductor schedules their kernels among the neighbouring ops.
    That needs torch >= 2.6, Triton, compiled kernels (under ``TRITON_INTERPRET`` a kernel is Python that
    neither Inductor nor fake tensors can run) and a torch built with CUDA (a CPU build never runs a compiled
    kernel, and registering a triton op imports Inductor: seconds at ``import fastflow``). Otherwise they are
    opaque ``torch.library.custom_op`` ops with fake kernels, which ``torch.compile(fullgraph=True)`` traces
    too."""
    return (
        hasattr(torch.library, "triton_op")
        and hasattr(torch.library, "wrap_triton")
        and triton_available()
        and not interpreter_enabled()
        and torch.backends.cuda.is_built()
    )


TRACEABLE = kernels_traceable()
""":func:`kernels_traceable` for this process, decided at import: the ops register once."""


def registration(traceable: bool) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``(define, launch)``: ``define(name, mutates_args=())`` decorates an op function to register it
    (``triton_op``, whose fake kernel is the function itself run on fake tensors, when ``traceable``, else
    ``custom_op``, which needs a fake kernel registered), and ``launch`` holds the keyword arguments its body
    passes to the kernel launchers (``wrap_triton`` for a triton op; none for a custom op, which launches its
    kernels directly)."""
    if traceable:
        return torch.library.triton_op, {"wrap_triton": torch.library.wrap_triton}
    return torch.library.custom_op, {}


def kernel_function(module: str, name: str) -> Callable[..., Any]:
    """``fastflow.kernels.<module>.<name>``, imported at its first call: Triton is optional."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(f"fastflow.kernels.{module}"), name)(*args, **kwargs)

    return call
