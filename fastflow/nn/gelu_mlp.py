"""A transformer's MLP, ``fc2(GELU(fc1(x)))``, that keeps one hidden-size tensor for backward instead of two.

Autograd keeps both ``h = fc1(x)`` (for GELU's backward) and ``GELU(h)`` (for ``fc2``'s weight gradient): at
``mlp_ratio = 4`` these are the two largest activations of a ViT block. :func:`gelu_mlp` saves ``x`` and ``h``
only and recomputes ``a = GELU(h)`` in backward, an elementwise pass, into the one hidden-size buffer that then
takes ``g a W2`` and, in place, ``dL/dh = (g W2) * GELU'(h)``:

    ``dW2 = g^T a``, ``db2 = sum g``, ``dW1 = (dL/dh)^T x``, ``db1 = sum dL/dh``, ``dL/dx = (dL/dh) W1``.

Under autocast the products run in the dtype autocast gave ``h``; weight gradients come back in the weights'
dtype and the input's gradient in the input's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gelu_mlp"]


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
    ) -> torch.Tensor:
        h = F.linear(x, w1, b1)
        ctx.save_for_backward(x, h, w1, w2)
        ctx.bias_dtypes = b1.dtype, b2.dtype
        return F.linear(F.gelu(h), w2, b2)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, h, w1, w2 = ctx.saved_tensors
        dtype = h.dtype
        rows = h.numel() // h.shape[-1]
        h2, g2, x2 = h.reshape(rows, -1), grad.to(dtype).reshape(rows, -1), x.to(dtype).reshape(rows, -1)
        w1c, w2c = w1.to(dtype), w2.to(dtype)
        hidden = F.gelu(h2)  # a = GELU(h), recomputed
        grad_w2 = g2.T @ hidden
        torch.mm(g2, w2c, out=hidden)  # the buffer now holds dL/da
        torch.ops.aten.gelu_backward.grad_input(hidden, h2, grad_input=hidden)  # and now dL/dh, in place
        grad_w1 = hidden.T @ x2
        grad_x = (hidden @ w1c).reshape(x.shape).to(x.dtype)
        b1_dtype, b2_dtype = ctx.bias_dtypes
        return (
            grad_x, grad_w1.to(w1.dtype), hidden.sum(0).to(b1_dtype), grad_w2.to(w2.dtype), g2.sum(0).to(b2_dtype)
        )  # fmt: skip


def gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """``fc2(GELU(fc1(x)))`` (exact, erf GELU) for ``x`` ``(..., fc1.in_features)``, saving ``x`` and ``fc1(x)``
    for backward but not ``GELU(fc1(x))`` (module docstring); both linears need biases."""
    if fc1.bias is None or fc2.bias is None:
        raise ValueError("gelu_mlp needs linears with biases")
    return _GeluMLP.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
