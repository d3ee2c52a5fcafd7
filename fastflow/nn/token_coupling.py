"""Jet's couplings on tokens ``(B, N, F)``: a fixed split of the features (channel coupling) or of the tokens
(spatial coupling), a ViT conditioner and the ``2 * sigmoid`` affine transform."""

from __future__ import annotations

from typing import Literal

import torch

from fastflow.nn.base import FlowLayer
from fastflow.nn.vit import ViTConditioner
from fastflow.ops.coupling import affine_coupling, affine_coupling_backward_from_output, affine_coupling_inverse

__all__ = ["TokenCoupling", "TokenSplit", "SpatialPattern", "SPATIAL_PATTERNS"]

TokenSplit = Literal["channel", "spatial"]
SpatialPattern = Literal["checkerboard", "horizontal", "vertical"]
SPATIAL_PATTERNS: tuple[SpatialPattern, ...] = ("checkerboard", "horizontal", "vertical")
_SCALE = "sigmoid2"


def _spatial_order(grid: tuple[int, int], pattern: str, parity: int) -> tuple[torch.Tensor, int]:
    """Token indices with the conditioning tokens first, and their count: token ``(i, j)`` of the grid conditions
    where ``(i + j) % 2`` (checkerboard), ``i % 2`` (horizontal stripes) or ``j % 2`` (vertical stripes) equals
    ``parity``."""
    i = torch.arange(grid[0]).view(-1, 1).expand(grid)
    j = torch.arange(grid[1]).view(1, -1).expand(grid)
    value = {"checkerboard": i + j, "horizontal": i, "vertical": j}[pattern].reshape(-1) % 2
    conditioning = value == parity
    order = torch.cat([conditioning.nonzero().view(-1), (~conditioning).nonzero().view(-1)])
    return order, int(conditioning.sum())


class TokenCoupling(FlowLayer):
    """Jet's affine coupling on tokens ``x`` ``(B, N, F)``, ``N = grid[0] * grid[1]`` in row-major grid order.

    A fixed permutation (a buffer, log-det 0) splits ``x`` into a conditioning part ``x_a`` and a transformed part
    ``x_b`` of the same size, along the features (``split="channel"``: a random permutation drawn from
    ``generator``, ``x_a`` its first ``F // 2``) or along the tokens (``split="spatial"``: ``pattern``
    ``"checkerboard"``, ``"horizontal"`` or ``"vertical"`` stripes of the grid, ``x_a`` the tokens of ``parity``).
    ``(t, r) = ViT(x_a[, context])`` (:class:`~fastflow.nn.vit.ViTConditioner` of ``width``, ``depth``, ``heads``;
    zero-initialised head) and

        ``y_b = (x_b + t) * 2 sigmoid(r)``,  ``log|det| = sum(log sigmoid(r) + log 2)``,  ``y_a = x_a``

    (the op :func:`~fastflow.ops.coupling.affine_coupling` with ``scale="sigmoid2"``: the identity at init). The
    output keeps the input's token and feature order. ``context_features > 0``: the conditioner cross-attends to a
    ``context`` ``(B, context_features)`` or ``(B, M, context_features)``, which ``forward`` and ``inverse`` need.
    The conditioner's output is cast to ``x``'s dtype, so under autocast the ViT runs in low precision and the
    transform in ``x``'s. ``backward_from_output`` serves reversible backprop (:mod:`fastflow.nn.reversible`).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        features: int,
        split: TokenSplit = "channel",
        *,
        pattern: SpatialPattern = "checkerboard",
        parity: int = 0,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        context_features: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(f"grid must be two ints >= 1 (token rows, columns), got {grid!r}")
        if isinstance(features, bool) or not isinstance(features, int) or features < 1:
            raise ValueError(f"features must be an int >= 1, got {features!r}")
        if split not in ("channel", "spatial"):
            raise ValueError(f"split must be 'channel' or 'spatial', got {split!r}")
        if pattern not in SPATIAL_PATTERNS:
            raise ValueError(f"pattern must be one of {SPATIAL_PATTERNS}, got {pattern!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.grid = (grid[0], grid[1])
        self.tokens = grid[0] * grid[1]
        self.features = features
        self.split = split
        self.context_features = context_features
        if split == "channel":
            if features < 2:
                raise ValueError(f"a channel coupling splits the features: needs features >= 2, got {features}")
            order, conditioning = torch.randperm(features, generator=generator), features // 2
            net_in, net_out, net_tokens = conditioning, 2 * (features - conditioning), self.tokens
        else:
            order, conditioning = _spatial_order(self.grid, pattern, parity)
            if 2 * conditioning != self.tokens:
                raise ValueError(
                    f"a spatial coupling splits the tokens in two equal halves: the {pattern} pattern of a {grid} grid "
                    f"gives {conditioning} and {self.tokens - conditioning} tokens"
                )
            net_in, net_out, net_tokens = features, 2 * features, conditioning
        self.dim = 2 if split == "channel" else 1  # the dim of (B, N, F) that is split
        self.conditioning = conditioning
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))
        self.net = ViTConditioner(net_in, net_out, net_tokens, width, depth, heads, context_features)

    @property
    def uses_context(self) -> bool:
        """Whether the conditioner cross-attends to a context (``context_features > 0``)."""
        return self.context_features > 0

    def _check_tokens(self, name: str, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}"
            )
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.tokens, self.features):
            raise ValueError(f"{name} must have shape (B, {self.tokens}, {self.features}), got {tuple(x.shape)}")
        return x

    def _check_context(self, context: object, x: torch.Tensor) -> torch.Tensor | None:
        """The context in ``x``'s dtype, or None for a coupling that uses none (a given one is ignored)."""
        if not self.uses_context:
            return None
        if context is None:
            raise ValueError(f"context is required: the coupling conditions on {self.context_features} features")
        if not isinstance(context, torch.Tensor) or not context.is_floating_point():
            raise TypeError(f"context must be a floating-point torch.Tensor, got {getattr(context, 'dtype', context)}")
        if context.dim() not in (2, 3) or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_features:
            raise ValueError(
                f"context must have shape ({x.shape[0]}, {self.context_features}) or ({x.shape[0]}, M, "
                f"{self.context_features}), got {tuple(context.shape)}"
            )
        return context.to(x.dtype)

    def _net(self, xp: torch.Tensor, context: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(shift, raw)`` from the conditioning part of the permuted ``xp``, as the op's views (module math)."""
        out = self.net(xp.narrow(self.dim, 0, self.conditioning), context).to(xp.dtype)
        shift, raw = out.chunk(2, dim=-1)
        return self._op_view(shift), self._op_view(raw)

    def _op_view(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, F)`` as the op's ``(B, C, ...)`` with the split dim as dim 1 (a view)."""
        return t.transpose(1, 2) if self.dim == 2 else t

    def _couple(
        self, x: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_tokens("y" if inverse else "x", x)
        context = self._check_context(context, x)
        xp = x.index_select(self.dim, self.order)
        shift, raw = self._net(xp, context)
        op = affine_coupling_inverse if inverse else affine_coupling
        yp, logdet = op(self._op_view(xp), shift, raw, _SCALE, self.conditioning)
        return self._op_view(yp).index_select(self.dim, self.inverse_order), logdet

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` for tokens ``x`` ``(B, N, F)``."""
        return self._couple(x, context, inverse=False)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, -logdet)`` for tokens ``y`` ``(B, N, F)`` at the same ``context``."""
        return self._couple(y, context, inverse=True)

    def backward_from_output(
        self,
        y: torch.Tensor,
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward from the output: ``(x, grad_x)``; the gradients of the parameters, and of ``context``
        where it requires grad (a leaf), go to their ``.grad``.

        ``y_a = x_a``, so the ViT runs once with a graph on it; one fused pass rebuilds ``x`` from ``y`` and gives
        the gradients w.r.t. ``x`` and ``(t, r)``, which are backpropagated through the ViT; ``x_a``'s second path
        (through the ViT) is then added into ``grad_x`` in place.
        """
        y = self._check_tokens("y", y)
        shaped = self._check_context(context, y)
        yp = y.index_select(self.dim, self.order)
        inputs = [p for p in self.parameters() if p.requires_grad]
        if shaped is not None and context.requires_grad:
            inputs.append(context)
        with torch.enable_grad():
            a = yp.narrow(self.dim, 0, self.conditioning).detach().requires_grad_(True)
            ctx = None if shaped is None else context.to(y.dtype)  # in the graph: its gradient reaches context
            out = self.net(a, ctx).to(y.dtype)
            shift, raw = (self._op_view(t) for t in out.chunk(2, dim=-1))
        grad_yp = self._op_view(grad_y.index_select(self.dim, self.order))
        with torch.no_grad():
            xp, grad_xp, grad_shift, grad_raw = affine_coupling_backward_from_output(
                self._op_view(yp), shift.detach(), raw.detach(), grad_yp, grad_logdet, _SCALE, self.conditioning
            )
        torch.autograd.backward([shift, raw], [grad_shift, grad_raw], inputs=[a, *inputs])
        grad_xp = self._op_view(grad_xp)
        # grad_xp is a new tensor (grad_shift shares only its transformed part): the conditioning part in place
        grad_xp.narrow(self.dim, 0, self.conditioning).add_(a.grad)
        x = self._op_view(xp).index_select(self.dim, self.inverse_order)
        return x, grad_xp.index_select(self.dim, self.inverse_order)
