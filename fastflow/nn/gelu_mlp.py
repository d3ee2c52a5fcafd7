"""A transformer's MLP, ``fc2(GELU(fc1(x)))``, that keeps one hidden-size tensor for backward instead of two.

Autograd keeps both ``h = fc1(x)`` (for GELU's backward) and ``GELU(h)`` (for ``fc2``'s weight gradient): at
``mlp_ratio = 4`` these are the two largest activations of a ViT block. :func:`gelu_mlp` saves ``x`` and ``h``
only and recomputes ``a = GELU(h)`` in backward, an elementwise pass, into the one hidden-size buffer that then
takes ``g a W2`` and, in place, ``dL/dh = (g W2) * GELU'(h)``:

    ``dW2 = g^T a``, ``db2 = sum g``, ``dW1 = (dL/dh)^T x``, ``db1 = sum dL/dh``, ``dL/dx = (dL/dh) W1``.

Under autocast the products run in the dtype autocast gave ``h`` (``x`` is saved in it, as autograd saves the
low-precision copy a linear reads; float64 tensors stay float64, as autocast leaves them); weight gradients come
back in the weights' dtype and the input's gradient in the input's. The backward is not differentiable again
(``create_graph=True`` raises, never a silent zero); under functorch transforms (``torch.func.grad``, ``vmap``) the
plain composition runs instead, and a backward batched by ``vmap`` (``torch.autograd.grad(...,
is_grads_batched=True)``, ``jacobian(..., vectorize=True)``) computes ``dL/dh`` out of place.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.backend import functorch_transforms_active, legacy_batched

__all__ = ["gelu_mlp"]


def _batched(grad: torch.Tensor) -> bool:
    """Whether the backward runs under vmap: a functorch transform, or autograd's own batched gradients
    (``is_grads_batched=True``, ``jacobian(..., vectorize=True)``), whose batching rules have no out= products.
    Never while ``torch.compile`` traces (it traces the backward unbatched)."""
    if torch.compiler.is_compiling():
        return False
    return functorch_transforms_active() or legacy_batched(grad)


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> torch.Tensor:
        ctx.dtypes = x.dtype, b1.dtype, b2.dtype
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        # under autocast its casts are made by hand, with autocast off: torch < 2.7 cached its casts of the weights
        # made here (grad off), and later ops on the same weights in the region then had no gradient. Autocast's
        # rule: float64 tensors are not cast
        low = torch.get_autocast_dtype(device) if autocast else None
        with torch.autocast(device, enabled=False) if autocast else nullcontext():
            xc, w1c, b1c, w2c, b2c = (
                t if low is None or t.dtype == torch.float64 else t.to(low) for t in (x, w1, b1, w2, b2)
            )
            h = F.linear(xc, w1c, b1c)
            ctx.save_for_backward(xc.to(h.dtype), h, w1, w2)
            return F.linear(F.gelu(h), w2c, b2c)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: its in-place products record no graph
            raise RuntimeError(
                "gelu_mlp (the ViT's MLP) has no double backward (create_graph=True); run the plain "
                "fc2(GELU(fc1(x))) where second derivatives are needed"
            )
        x, h, w1, w2 = ctx.saved_tensors
        x_dtype, b1_dtype, b2_dtype = ctx.dtypes
        need_x, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        dtype, width = h.dtype, h.shape[-1]
        h2, g2, x2 = h.reshape(-1, width), grad.to(dtype).reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1])
        hidden = F.gelu(h2)  # a = GELU(h), recomputed
        grad_w2 = (g2.T @ hidden).to(w2.dtype) if need_w2 else None
        grad_b2 = g2.sum(0).to(b2_dtype) if need_b2 else None
        if _batched(grad):  # a backward vmap runs batched: no out= products
            hidden = torch.ops.aten.gelu_backward(g2 @ w2.to(dtype), h2)
        else:
            torch.mm(g2, w2.to(dtype), out=hidden)  # the buffer now holds dL/da
            torch.ops.aten.gelu_backward.grad_input(hidden, h2, grad_input=hidden)  # and now dL/dh, in place
        grad_w1 = (hidden.T @ x2).to(w1.dtype) if need_w1 else None
        grad_b1 = hidden.sum(0).to(b1_dtype) if need_b1 else None
        grad_x = (hidden @ w1.to(dtype)).reshape(x.shape).to(x_dtype) if need_x else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(GELU(fc1(x)))`` (exact, erf GELU) for ``x`` ``(..., fc1.in_features)``, saving ``x`` and ``fc1(x)``
    for backward but not ``GELU(fc1(x))`` (module docstring); both linears need biases. The linears' own
    ``forward`` (and their hooks) are not called: their parameters are."""
    if fc1.bias is None or fc2.bias is None:
        raise ValueError("gelu_mlp needs linears with biases")
    if functorch_transforms_active():
        return fc2(F.gelu(fc1(x)))
    return _GeluMLP.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
