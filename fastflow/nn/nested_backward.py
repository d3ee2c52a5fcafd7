"""The reversible walk's nested backward calls, without the per-call Python of ``torch.autograd.backward``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.overrides import has_torch_function

from fastflow.backend import functorch_transforms_active

__all__ = ["nested_backward"]

# torch >= 2.3: the function torch.autograd.backward ends in, after normalising its arguments
_ENGINE_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)


def nested_backward(
    outputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor] | None = None
) -> None:
    """``torch.autograd.backward(outputs, grads, inputs=inputs)`` (gradients accumulate into ``.grad``), for
    callers that hand each output a gradient of its own shape and dtype, as the reversible walk does.

    The autograd engine is called as ``torch.autograd.backward`` calls it, without the argument normalisation in
    between: its ``_make_grads`` compares every output's shape with its gradient's in Python, about 40 Python calls
    per tensor, which over a walk's thirty-odd calls per Glow step came to a few percent of a small step's host
    time. Here only the shapes are compared (a mismatch is an error, as there). The public function runs instead
    under ``torch.compile`` tracing and torch.func transforms (where it raises), for tensor subclasses and modes
    that override torch functions, and on a torch without the engine entry point.
    """
    outputs, grads = tuple(outputs), tuple(grads)
    inputs = () if inputs is None else tuple(inputs)
    if (
        _ENGINE_RUN_BACKWARD is None
        or torch.compiler.is_compiling()
        or functorch_transforms_active()
        or has_torch_function(outputs + inputs)
    ):
        torch.autograd.backward(outputs, grads, inputs=inputs or None)
        return
    if len(grads) != len(outputs):
        raise RuntimeError(f"nested_backward: {len(outputs)} outputs but {len(grads)} gradients")
    for i, (out, grad) in enumerate(zip(outputs, grads)):
        if out.shape != grad.shape:
            raise RuntimeError(
                f"nested_backward: gradient {i} has shape {tuple(grad.shape)}, its output {tuple(out.shape)}"
            )
    _ENGINE_RUN_BACKWARD(outputs, grads, False, False, inputs, allow_unreachable=True, accumulate_grad=True)
