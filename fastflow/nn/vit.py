"""ViT conditioner of Jet's couplings: tokens in, per-token ``(shift, raw scale)`` out, optionally attending to a
context by cross-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.nn.gelu_mlp import gelu_mlp
from fastflow.ops._checks import int_at_least

__all__ = ["ViTConditioner", "ViTBlock"]


class _Attention(nn.Module):
    """Multi-head attention of queries ``(B, N, E)`` over keys/values ``(B, M, E)`` with
    :func:`torch.nn.functional.scaled_dot_product_attention` (no mask: every token sees every token)."""

    def __init__(self, width: int, heads: int, zero_out: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)
        if zero_out:  # a new path that starts switched off: the block is the identity on it at init
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, e = t.shape
        return t.reshape(b, n, self.heads, e // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q(x))
        k, v = (self._heads(t) for t in self.kv(source).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out(out.transpose(1, 2).reshape(x.shape))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x += SelfAttn(LN(x))``, then ``x += CrossAttn(LN(x), context)`` when
    ``cross`` (zero-initialised output), then ``x += MLP(LN(x))`` (``E -> mlp_ratio * E -> E``, GELU; run by
    :func:`~fastflow.nn.gelu_mlp.gelu_mlp` on ``mlp``'s two linears, which keeps one hidden-size tensor for
    backward, not two: ``mlp`` stays an ``nn.Sequential`` for its ``state_dict`` keys, but its modules' own
    ``forward`` and hooks are not called)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, cross: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads, zero_out=False)
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.cross = _Attention(width, heads, zero_out=True) if cross else None
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, N, E)``; ``context`` ``(B, M, E)`` (already projected to the width), needed with ``cross``."""
        h = self.norm1(x)
        x = x + self.attn(h, h)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context)
        return x + gelu_mlp(self.norm2(x), self.mlp[0], self.mlp[2])


class ViTConditioner(nn.Module):
    """``(B, N, in_features) -> (B, N, out_features)``: a linear projection to ``width`` plus a learned position
    embedding of the ``tokens`` positions, ``depth`` :class:`ViTBlock` s, a final LayerNorm and a zero-initialised
    linear head (so a coupling built on it starts at ``shift = 0, raw = 0``).

    With ``context_features > 0`` every block cross-attends to the context: ``(B, context_features)`` (one
    context token) or ``(B, M, context_features)`` (``M`` tokens), projected to ``width``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        tokens: int,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        context_features: int = 0,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("in_features", in_features, 1), ("out_features", out_features, 1), ("tokens", tokens, 1),
            ("width", width, 1), ("depth", depth, 0), ("heads", heads, 1), ("context_features", context_features, 0),
            ("mlp_ratio", mlp_ratio, 1),
        ):  # fmt: skip
            int_at_least(name, value, low)
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        if context_features and not depth:
            raise ValueError(
                f"context_features = {context_features} needs depth >= 1: the context reaches the tokens only "
                "through the blocks' cross-attention"
            )
        self.tokens = tokens
        self.context_features = context_features
        self.embed = nn.Linear(in_features, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.context_embed = nn.Linear(context_features, width) if context_features else None
        cross = context_features > 0
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp_ratio, cross) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_features)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, tokens, in_features)``; ``context`` as in the class docstring (checked by the caller)."""
        h = self.embed(x) + self.pos
        c = None
        if self.context_embed is not None:
            c = self.context_embed(context if context.dim() == 3 else context[:, None])
        for block in self.blocks:
            h = block(h, c)
        return self.head(self.norm(h))
