"""Jet's couplings on tokens ``(B, N, F)``: a fixed split of the features (channel coupling) or of the tokens
(spatial coupling), a ViT conditioner and the ``2 * sigmoid`` affine transform."""

from __future__ import annotations

from typing import Any, Literal

import torch

from fastflow.nn.base import FlowLayer, check_network_dtype
from fastflow.nn.module_walk import trainable_parameters
from fastflow.nn.nested_backward import nested_backward
from fastflow.nn.permutation import loaded_permutation_error
from fastflow.nn.recompute_state import running_statistics_kept
from fastflow.nn.state_upgrade import drop_inverse_order
from fastflow.nn.vit import ViTConditioner
from fastflow.ops._checks import int_at_least
from fastflow.ops.coupling import affine_coupling, affine_coupling_backward_from_output_, affine_coupling_inverse

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
    transform in ``x``'s. ``backward_from_handed`` serves reversible backprop (:mod:`fastflow.nn.reversible`);
    ``backward_from_output`` is the same with ``y`` and ``grad_y`` passed as arguments.
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
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)
        ):
            raise ValueError(f"grid must be two ints >= 1 (token rows, columns), got {grid!r}")
        int_at_least("features", features, 1)
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
        check_network_dtype(name, x, self.net)
        return x

    def _check_context(self, context: object, x: torch.Tensor) -> torch.Tensor | None:
        """The context in ``x``'s dtype, or None for a coupling that uses none (a given one is ignored)."""
        if not self.uses_context:
            return None
        if context is None:
            raise ValueError(f"context is required: the coupling conditions on {self.context_features} features")
        if not isinstance(context, torch.Tensor) or not context.is_floating_point():
            raise TypeError(f"context must be a floating-point torch.Tensor, got {getattr(context, 'dtype', context)}")
        shape_ok = context.dim() in (2, 3) and context.shape[0] == x.shape[0]
        shape_ok = shape_ok and context.shape[-1] == self.context_features
        if not shape_ok or (context.dim() == 3 and context.shape[1] == 0):
            raise ValueError(
                f"context must have shape ({x.shape[0]}, {self.context_features}) or ({x.shape[0]}, M, "
                f"{self.context_features}) with M >= 1, got {tuple(context.shape)}"
            )
        return context.to(x.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Loads state dicts that still hold the earlier ``inverse_order`` buffer (dropped); refuses (through
        ``load_state_dict``'s error list) an ``order`` that is not a permutation of the split dimension."""
        drop_inverse_order(state_dict, prefix)
        error = loaded_permutation_error(state_dict, prefix + "order", len(self.order))
        super()._load_from_state_dict(state_dict, prefix, *args)
        if error is not None:
            args[-1].append(error)  # error_msgs: load_state_dict raises with it

    def _halves(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioning and transformed parts of ``t`` ``(B, N, F)``, gathered by the fixed permutation (two
        half-size copies: no permuted copy of the whole)."""
        return (
            t.index_select(self.dim, self.order[: self.conditioning]),
            t.index_select(self.dim, self.order[self.conditioning :]),
        )

    def _net(self, x_a: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The conditioner's output ``(shift | raw)`` on the conditioning part ``x_a``, in ``x_a``'s dtype."""
        return self.net(x_a, context).to(x_a.dtype)

    def _op_view(self, t: torch.Tensor) -> torch.Tensor:
        """``(B, N, F)`` as the op's ``(B, C, ...)`` with the split dim as dim 1 (a view)."""
        return t.transpose(1, 2) if self.dim == 2 else t

    def _couple(
        self, x: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_tokens("y" if inverse else "x", x)
        context = self._check_context(context, x)
        x_a, x_b = self._halves(x)
        shift, raw = (self._op_view(t) for t in self._net(x_a, context).chunk(2, dim=-1))
        op = affine_coupling_inverse if inverse else affine_coupling
        y_b, logdet = op(self._op_view(x_b), shift, raw, _SCALE)
        return self._joined(x_a, self._op_view(y_b)), logdet

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
        where it requires grad (a leaf), go to their ``.grad``. :meth:`backward_from_handed` with ``y`` and
        ``grad_y`` handed in."""
        return self.backward_from_handed([y, grad_y], grad_logdet, context)

    def backward_from_handed(
        self, handed: list[torch.Tensor], grad_logdet: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`backward_from_output` of ``handed = [y, grad_y]``, which it empties: once their halves are
        gathered the whole ``y`` and ``grad_y`` are dropped (freed where the caller kept no reference, as in the
        reversible walk), and ``x`` and ``grad_x`` are assembled from halves last.

        ``y_a = x_a``, so the ViT runs once with a graph on it. The fused reversible backward
        (:func:`~fastflow.ops.coupling.affine_coupling_backward_from_output`) rebuilds ``x_b`` from ``y_b`` and
        gives the gradients w.r.t. ``x_b`` and ``(t, r)``, written over its inputs
        (:func:`~fastflow.ops.coupling.affine_coupling_backward_from_output_`: ``x_b`` over the gathered ``y_b``,
        ``grad_x_b`` over ``grad_y_b``, the gradient of ``(t, r)`` over the conditioner's output, whose values its
        backward does not read: a linear head saves its input, not its output; a node that saved it would fail
        autograd's version check, not compute a wrong gradient). The ViT's gradient w.r.t. ``x_a`` accumulates
        onto ``grad_y_a``, which is then ``grad_x_a``.
        """
        y, grad_y = handed
        handed.clear()
        y = self._check_tokens("y", y)
        if grad_y.shape != y.shape:
            raise ValueError(f"grad_y must have y's shape {tuple(y.shape)}, got {tuple(grad_y.shape)}")
        shaped = self._check_context(context, y)
        inputs = trainable_parameters(self)
        if shaped is not None and context.requires_grad:
            inputs.append(context)
        y_a, y_b = self._halves(y.detach())  # no graph through y: the halves are written over in place
        grad_y_a, grad_y_b = self._halves(grad_y.detach())
        del y, grad_y
        with running_statistics_kept(self.net):  # put back after the backward, which reads the saved ones
            with torch.enable_grad():
                a = y_a.detach().requires_grad_(True)  # y_a = x_a: a new leaf
                ctx = None if shaped is None else context.to(a.dtype)  # in the graph: its gradient reaches context
                out = self._net(a, ctx)
            grad_out = out.detach()
            with torch.no_grad():
                shift, raw = (self._op_view(t) for t in grad_out.chunk(2, dim=-1))
                affine_coupling_backward_from_output_(
                    self._op_view(y_b), shift, raw, self._op_view(grad_y_b), grad_logdet, _SCALE
                )
            del shift, raw
            a.grad = grad_y_a  # accumulated into, in place
            nested_backward([out], [grad_out], inputs=[a, *inputs])
            del grad_out, out
        x = self._joined(a.detach(), y_b)
        del y_b
        grad_x_a = a.grad
        del a
        return x, self._joined(grad_x_a, grad_y_b)

    def _joined(self, part_a: torch.Tensor, part_b: torch.Tensor) -> torch.Tensor:
        """The whole ``(B, N, F)`` tensor of the conditioning and transformed parts (laid out as :meth:`_halves`
        gives them)."""
        shape = list(part_a.shape)
        shape[self.dim] += part_b.shape[self.dim]
        whole = part_a.new_empty(shape)
        whole.index_copy_(self.dim, self.order[: self.conditioning], part_a)
        return whole.index_copy_(self.dim, self.order[self.conditioning :], part_b)
