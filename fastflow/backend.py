"""Backend choice: the one place that decides whether an op runs its Triton kernel or its eager twin.

Backends:
- ``"eager"``: pure PyTorch reference (the CPU fallback and the benchmark baseline).
- ``"triton"``: compiled Triton kernels on CUDA tensors.
- ``"interpret"``: the same Triton kernels run by Triton's interpreter on CPU tensors (tests only; needs
  ``TRITON_INTERPRET=1`` in the environment before ``fastflow`` is imported).
- ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton imports, ``"eager"`` otherwise.

``with fastflow.backend("eager"): ...`` overrides the choice in a block; the environment variable
``FASTFLOW_BACKEND`` sets the default. The environment is read once, at import, so that
:func:`resolve_backend` reads only module globals and ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from typing import Literal

import torch

__all__ = ["BackendName", "backend", "interpreter_enabled", "legacy_batched", "resolve_backend", "triton_available"]

BackendName = Literal["auto", "eager", "triton", "interpret"]
_NAMES = ("auto", "eager", "triton", "interpret")
_overrides: list[str] = []


def _check_name(name: str) -> str:
    if name not in _NAMES:
        raise ValueError(f"backend must be one of {_NAMES}, got {name!r}")
    return name


MIN_TRITON = (3, 2)
"""The oldest Triton the kernels are built and checked for (``make aot-old-tritons``)."""


def _triton_imports() -> bool:
    """Whether Triton (>= :data:`MIN_TRITON`) is installed and imports. An older one, or one that fails to import
    (a broken install, a missing driver library), warns once and counts as absent: fastflow then runs its eager
    ops, where the kernels' first launch would fail (or, where the ops register as triton ops, ``import fastflow``
    itself)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # torch's own probes import it too: no extra import time
    except Exception as err:
        warnings.warn(
            f"triton is installed but does not import ({type(err).__name__}: {err}): fastflow runs its eager "
            "(pure PyTorch) ops; repair or uninstall triton for the fused kernels",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    version = str(getattr(triton, "__version__", "0"))
    if torch.torch_version.TorchVersion(version) < MIN_TRITON:  # e.g. the 3.0 / 3.1 torch 2.4 / 2.5 pin
        warnings.warn(
            f"fastflow's kernels need triton >= {'.'.join(map(str, MIN_TRITON))}, found {version}: fastflow runs "
            "its eager (pure PyTorch) ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


_TRITON_AVAILABLE = _triton_imports()
_INTERPRETER_ENABLED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DEFAULT = _check_name(os.environ.get("FASTFLOW_BACKEND", "auto"))


def triton_available() -> bool:
    """True when ``triton`` is installed on this machine and imports."""
    return _TRITON_AVAILABLE


def interpreter_enabled() -> bool:
    """True when Triton kernels are decorated for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETER_ENABLED


_DYNAMO_TRACES_FUNCTORCH_QUERY = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def functorch_transforms_active() -> bool:
    """Whether a functorch transform (``vmap``, ``torch.func.grad`` / ``jacrev`` / ``jvp``) is active. While
    ``torch.compile`` traces on torch < 2.5, whose Dynamo cannot trace that query (every caller broke the graph,
    ``fullgraph=True`` failed), False: no transform is active inside a region those versions compile."""
    if not _DYNAMO_TRACES_FUNCTORCH_QUERY and torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active()


def legacy_batched(t: object) -> bool:
    """Whether ``t`` is a gradient autograd batches itself (``autograd.grad(..., is_grads_batched=True)``,
    ``jacobian(..., vectorize=True)``): a tensor whose storage a kernel launch cannot read. Never while
    compiling: Dynamo traces no such tensor, and cannot trace the query (a graph break at every call)."""
    if torch.compiler.is_compiling():
        return False
    legacy = getattr(torch._C._functorch, "is_legacy_batchedtensor", None)
    return isinstance(t, torch.Tensor) and legacy is not None and legacy(t)


def resolve_backend(x: torch.Tensor) -> Literal["eager", "triton", "interpret"]:
    """The backend an op runs for input ``x`` under the current override; ``"eager"`` under functorch transforms
    (``vmap``, ``torch.func.grad`` / ``jacrev`` / ``jvp``), whatever the override: they batch and differentiate the
    eager twins natively, while a fused op's autograd wrapper refuses their grad transforms."""
    if not _overrides and _DEFAULT == "auto" and not x.is_cuda:  # eager either way: the query is not needed
        return "eager"
    if functorch_transforms_active():
        return "eager"
    name = _overrides[-1] if _overrides else _DEFAULT
    if name == "auto":
        if x.is_cuda and _TRITON_AVAILABLE and not _INTERPRETER_ENABLED:
            return "triton"
        return "eager"
    if name == "triton":
        if not x.is_cuda:
            raise ValueError(f"backend 'triton' needs CUDA tensors, got a tensor on {x.device}")
        if not _TRITON_AVAILABLE:
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        return "triton"
    if name == "interpret":
        if x.is_cuda:
            raise ValueError("backend 'interpret' runs Triton kernels on CPU tensors, got a CUDA tensor")
        if not (_TRITON_AVAILABLE and _INTERPRETER_ENABLED):
            raise RuntimeError("backend 'interpret' needs triton and TRITON_INTERPRET=1 set before import")
        return "interpret"
    return "eager"


@contextlib.contextmanager
def backend(name: BackendName) -> Iterator[None]:
    """Context manager that forces ``name`` as the backend of every fastflow op inside the block. The override is
    process-wide (ops on other threads see it while the block runs): a plain list that ``torch.compile`` traces
    and guards on, where a context variable would break the graph."""
    _overrides.append(_check_name(name))
    try:
        yield
    finally:
        _overrides.pop()
