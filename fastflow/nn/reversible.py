"""Memory-saving reversible backprop over a chain of flow layers.

Forward runs the layers without recording a graph and keeps only the chain's input and output. Backward
walks the layers from the last: it rebuilds each layer's input from its output with the exact inverse,
recomputes that one layer with a graph, and backpropagates through it, so activation memory does not grow
with depth. A layer may provide ``backward_from_output(y, grad_y, grad_logdet)`` to rebuild its input and
compute its gradients in one fused pass (the couplings do); others use ``inverse`` then recompute.
Parameter gradients are accumulated into ``.grad`` by nested backward calls, as reentrant checkpointing does:
``loss.backward()`` (and DDP) see them, ``torch.autograd.grad(loss, params)`` does not.

Drift guard: after the walk, the rebuilt chain input is compared with the saved one; a relative drift above
``max_drift`` raises :class:`ReconstructionError` instead of returning gradients computed at wrong points,
and the chain's parameters keep the ``.grad`` they had before the backward: the walk accumulates into fresh
gradients that are added to existing ones (in place) only after the check passes. With ``None`` gradients
(``zero_grad()``'s default) that costs nothing; accumulated gradients need one chain's worth of parameter
gradients more while its backward runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_MAX_DRIFT",
    "TF32_MAX_DRIFT",
    "ReconstructionError",
    "default_max_drift",
    "chain_backward_from_output",
    "check_max_drift",
    "recompute_backward",
    "reversible_chain",
]

# Relative drift max|x_rebuilt - x| / max|x| tolerated per chain, by dtype of the chain input.
DEFAULT_MAX_DRIFT = {torch.float64: 1e-8, torch.float32: 1e-3, torch.bfloat16: 1e-1, torch.float16: 5e-2}
TF32_MAX_DRIFT = 5e-2
"""Default for float32 chains on CUDA while ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's default):
the coupling networks' convolutions then compute with TF32's 10-bit mantissa, float16's, so rebuilding a
coupling's input from an output that carries float32 rounding re-evaluates its network on operands that may
round to neighbouring TF32 values. Measured on an H100 (``tests/test_gpu.py``): 1.1e-3 through 32 Glow
steps of perturbed weights, over the 1e-3 float32 default. The invertible mixes themselves stay IEEE."""


class ReconstructionError(RuntimeError):
    """The input rebuilt by the inverse drifted from the true input beyond the tolerance."""


def recompute_backward(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    inverse: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    params: list[nn.Parameter],
    y: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, grad_x)`` of the map ``forward`` from its output: rebuild ``x = inverse(y)``, recompute
    ``forward(x)`` with a graph and backpropagate. Parameter gradients are accumulated into ``.grad`` by the
    nested backward (through the parameters' AccumulateGrad nodes, so DDP hooks fire)."""
    with torch.no_grad():
        x, _ = inverse(y)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y_again, logdet = forward(x)
        outputs, grads = [y_again], [grad_y]
        if logdet.requires_grad:
            outputs.append(logdet)
            grads.append(grad_logdet.to(logdet.dtype))
        torch.autograd.backward(outputs, grads, inputs=[x, *(p for p in params if p.requires_grad)])
    return x.detach(), x.grad


def _layer_backward(
    layer: nn.Module, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, grad_x)`` for one layer from its output ``y``: its fused ``backward_from_output`` where it has
    one, else :func:`recompute_backward`."""
    fused = getattr(layer, "backward_from_output", None)
    if fused is not None:
        return fused(y, grad_y, grad_logdet)
    return recompute_backward(layer, layer.inverse, list(layer.parameters()), y, grad_y, grad_logdet)


def chain_backward_from_output(
    layers: nn.ModuleList, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, grad_x)`` of a chain of layers from its output, one layer at a time from the last."""
    for layer in reversed(layers):
        y, grad_y = _layer_backward(layer, y, grad_y, grad_logdet)
    return y, grad_y


class _ReversibleChain(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, layers: nn.ModuleList, max_drift: float | None, *params: nn.Parameter
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.layers = layers
        ctx.num_params = len(params)
        ctx.max_drift = max_drift
        ctx.device_type = x.device.type
        ctx.autocast, ctx.autocast_dtype = _autocast_state(x.device.type)
        total = None
        with torch.no_grad():
            y = x
            for layer in layers:
                y, logdet = layer(y)
                total = logdet if total is None else total + logdet
        ctx.save_for_backward(x, y)
        return y, total

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, grad_logdet: torch.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        x_in, y = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        if grad_logdet is None:
            grad_logdet = y.new_zeros(y.shape[0], dtype=torch.float32)
        params = _params(ctx.layers)
        grads_before = [p.grad for p in params]
        for p in params:  # the walk accumulates into fresh gradients, committed only once the drift check passes
            p.grad = None
        try:
            # the weight cache off: with it, autocast's low-precision copy of every weight of the chain would
            # stay alive until the whole chain's backward ends, memory that grows with depth
            autocast = torch.autocast(
                ctx.device_type, dtype=ctx.autocast_dtype, enabled=ctx.autocast, cache_enabled=False
            )
            with autocast:
                y, grad_y = chain_backward_from_output(ctx.layers, y, grad_y, grad_logdet)
            _check_drift(y, x_in, ctx.max_drift)
        except BaseException:
            for p, before in zip(params, grads_before):  # no gradients computed at wrong points reach .grad
                p.grad = before
            raise
        for p, before in zip(params, grads_before):
            if before is not None:
                p.grad = before if p.grad is None else before.add_(p.grad)
        return (grad_y, None, None) + (None,) * ctx.num_params


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    """Whether autocast is on for ``device_type`` and its dtype, to replay the forward's mode in backward."""
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, (torch.get_autocast_dtype(device_type) if enabled else None)


def _params(layers: nn.ModuleList) -> list[nn.Parameter]:
    return [p for p in layers.parameters() if p.requires_grad]


def default_max_drift(x: torch.Tensor) -> float:
    """The drift tolerated for a chain whose input is ``x``: :data:`DEFAULT_MAX_DRIFT` by dtype, or
    :data:`TF32_MAX_DRIFT` for float32 on CUDA with cuDNN's TF32 on."""
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        return TF32_MAX_DRIFT
    return DEFAULT_MAX_DRIFT.get(x.dtype, 1e-3)


def check_max_drift(max_drift: float | None) -> float | None:
    """Validate a ``max_drift`` argument: ``None`` (the default by dtype), a number > 0, or ``math.inf`` to
    turn the guard off. ``0`` is refused rather than read as "off": no rebuilt input is exact."""
    if max_drift is None:
        return None
    if isinstance(max_drift, bool) or not isinstance(max_drift, (int, float)):
        raise TypeError(f"max_drift must be a number or None, got {max_drift!r}")
    if math.isnan(max_drift) or max_drift <= 0:
        raise ValueError(f"max_drift must be > 0 (math.inf turns the drift guard off), got {max_drift}")
    return float(max_drift)


def _check_drift(rebuilt: torch.Tensor, original: torch.Tensor, max_drift: float | None) -> None:
    tol = default_max_drift(original) if max_drift is None else max_drift
    if tol == math.inf:
        return
    scale = original.detach().abs().max().float().clamp_min(1e-12)
    drift = float((rebuilt.float() - original.detach().float()).abs().max() / scale)
    if not drift <= tol:
        raise ReconstructionError(
            f"reversible backward rebuilt the chain input with relative drift {drift:.3g} > max_drift {tol:.3g}; "
            "the gradients would be computed at wrong points. Causes: near-zero coupling scales, low precision; "
            "train this part without reversible=True or raise max_drift."
        )


def reversible_chain(
    layers: nn.ModuleList, x: torch.Tensor, max_drift: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layers`` on ``x`` with memory-saving reversible backprop; returns ``(y, summed logdet)``."""
    max_drift = check_max_drift(max_drift)
    params = _params(layers)
    return _ReversibleChain.apply(x, layers, max_drift, *params)
