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
    callers that hand each output a gradient tensor of its own shape, as the reversible walk does.

    The autograd engine is called as ``torch.autograd.backward`` calls it, without the argument normalisation in
    between (tuple conversions, the tensor-like filtering and torch-function check over outputs and inputs,
    ``_make_grads``' per-output checks): for two outputs and seven inputs about 50 Python-level calls on torch 2.4
    and 130 on torch 2.13, against about 17 here, over a walk's thirty-odd calls per Glow step. Here only the
    shapes are compared (a mismatch is an error, as there), and an empty ``inputs`` is refused as there. The public
    function runs instead under ``torch.compile`` tracing and torch.func transforms (where it raises), for tensor
    subclasses and modes that override torch functions, for a gradient that is not a tensor, and on a torch without
    the engine entry point.
    """
    outputs, grads = tuple(outputs), tuple(grads)
    if inputs is not None:
        inputs = tuple(inputs)
        if not inputs:
            raise RuntimeError("nested_backward: inputs, where given, must not be empty (as in autograd.backward)")
    if (
        _ENGINE_RUN_BACKWARD is None
        or torch.compiler.is_compiling()
        or functorch_transforms_active()
        or has_torch_function(outputs + (inputs or ()))
        or not all(isinstance(grad, torch.Tensor) for grad in grads)
    ):
        torch.autograd.backward(outputs, grads, inputs=inputs)
        return
    if len(grads) != len(outputs):
        raise RuntimeError(f"nested_backward: {len(outputs)} outputs but {len(grads)} gradients")
    for i, (out, grad) in enumerate(zip(outputs, grads)):
        if out.shape != grad.shape:
            raise RuntimeError(
                f"nested_backward: gradient {i} has shape {tuple(grad.shape)}, its output {tuple(out.shape)}"
            )
    _ENGINE_RUN_BACKWARD(outputs, grads, False, False, inputs or (), allow_unreachable=True, accumulate_grad=True)
