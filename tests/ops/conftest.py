"""Fixtures of the op tests: where the Triton kernels run here."""

from __future__ import annotations

import pytest
import torch

from fastflow.backend import interpreter_enabled, triton_available


def kernel_target() -> tuple[str, str] | None:
    """``(backend, device)`` that runs the Triton kernels here: the interpreter on CPU tensors under
    ``TRITON_INTERPRET=1``, compiled kernels on a CUDA device, or None."""
    if not triton_available():
        return None
    if interpreter_enabled():
        return "interpret", "cpu"
    if torch.cuda.is_available():
        return "triton", "cuda"
    return None


@pytest.fixture
def target() -> tuple[str, str]:
    """``(backend, device)`` that runs the Triton kernels here (:func:`kernel_target`); skips without one."""
    found = kernel_target()
    if found is None:
        pytest.skip("needs triton with TRITON_INTERPRET=1, or a CUDA device")
    return found
