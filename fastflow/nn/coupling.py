"""Affine (Glow / RealNVP) and additive (NICE) coupling layers on vectors or images, with channel or
checkerboard masks, any conditioner network and an optional conditioning context."""

from __future__ import annotations

from typing import Literal

import torch

from fastflow.backend import functorch_transforms_active
from fastflow.nn.base import FlowLayer, check_features, check_network_dtype
from fastflow.nn.context import shape_context
from fastflow.nn.coupling_network import Subnet, build_subnet, conv_subnet, mlp_subnet
from fastflow.nn.module_walk import trainable_parameters
from fastflow.nn.nested_backward import nested_backward
from fastflow.nn.recompute_state import running_statistics_kept
from fastflow.nn.tiling import Tile, Tiling, check_tileable, check_tiles_are_exact, tiles
from fastflow.ops._checks import cast, int_at_least
from fastflow.ops.coupling import (
    SCALE_KINDS,
    ScaleKind,
    additive_coupling,
    additive_coupling_backward_from_output,
    additive_coupling_inverse,
    affine_coupling,
    affine_coupling_backward_from_output,
    affine_coupling_inverse,
)

__all__ = ["AffineCoupling", "AdditiveCoupling", "MaskKind"]

MaskKind = Literal["channel", "checkerboard"]


class _Coupling(FlowLayer):
    """Shared masking and conditioning: which part the conditioner sees (``a``) and which is transformed (``b``).

    ``mask="channel"``: ``a`` is ``C // 2`` channels (features for vectors; the first ones for ``parity=0``, the
    last ones for ``parity=1``) and ``b`` the rest. ``mask="checkerboard"`` (images): the network sees ``x * m``
    with ``m[h, w] = (h + w + parity) % 2 == 0`` and the transform acts where ``m == 0`` (the network's outputs
    are multiplied by ``1 - m``, so positions under the mask pass through with log-scale 0).

    The conditioner is ``subnet(in_features, out_features)`` (FrEIA's convention) or a ready module; by default
    Glow's :class:`~fastflow.nn.coupling_network.ConvNetwork` for images and an
    :class:`~fastflow.nn.coupling_network.MLPNetwork` for ``vectors=True``, of width ``hidden``. With
    ``context_features > 0`` it also sees the ``context`` (:mod:`fastflow.nn.context`): ``in_features`` counts
    those features too, and ``forward`` / ``inverse`` need it.
    """

    outputs_per_channel: int

    def __init__(
        self,
        num_channels: int,
        hidden: int,
        mask: MaskKind,
        parity: int,
        subnet: Subnet | None,
        context_features: int,
        vectors: bool,
    ) -> None:
        super().__init__()
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"mask must be 'channel' or 'checkerboard', got {mask!r}")
        if mask == "checkerboard" and vectors:
            raise ValueError("mask='checkerboard' needs images: vectors=True takes mask='channel'")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        int_at_least("num_channels", num_channels, 1)
        if mask == "channel" and num_channels < 2:
            raise ValueError(f"a channel-mask coupling needs num_channels >= 2, got {num_channels}")
        int_at_least("hidden", hidden, 1)
        if isinstance(context_features, bool) or not isinstance(context_features, int) or context_features < 0:
            raise ValueError(f"context_features must be an int >= 0, got {context_features!r}")
        self.num_channels = num_channels
        self.mask = mask
        self.parity = parity
        self.vectors = vectors
        self.context_features = context_features
        self.cond_channels = num_channels // 2 if mask == "channel" else num_channels
        self.out_channels = num_channels - num_channels // 2 if mask == "channel" else num_channels
        self.hidden = hidden
        if subnet is None:
            subnet = mlp_subnet(hidden) if vectors else conv_subnet(hidden)
        out_features = self.outputs_per_channel * self.out_channels
        self.net = build_subnet(subnet, self.cond_channels + context_features, out_features)
        self.tiling = None

    @property
    def uses_context(self) -> bool:
        """Whether the conditioner sees a context (``context_features > 0``)."""
        return self.context_features > 0

    @property
    def tiling(self) -> Tiling | None:
        """Spatial tiling of the conditioner when it runs without a graph (:mod:`fastflow.nn.tiling`), or None.
        Setting one is refused (``ValueError``) for a conditioner that declares no receptive-field halo."""
        return self._tiling

    @tiling.setter
    def tiling(self, tiling: Tiling | None) -> None:
        if tiling is not None and not isinstance(tiling, Tiling):
            raise TypeError(f"tiling must be a fastflow.nn.tiling.Tiling or None, got {type(tiling).__name__}")
        if tiling is not None:
            check_tileable(self.net, tiling)
        self._tiling = tiling

    @property
    def b_start(self) -> int:
        """First of the channels the transform acts on (channel mask): the rest of the channels pass through."""
        return self.cond_channels if self.parity == 0 else 0

    def _check_input(self, name: str, x: object) -> torch.Tensor:
        x = check_features(name, x, self.num_channels)
        if self.vectors != (x.dim() == 2):
            expected = "vectors (B, D)" if self.vectors else "images (B, C, H, W)"
            raise ValueError(
                f"{name} must be {expected} for this coupling (vectors={self.vectors}), got shape {tuple(x.shape)}"
            )
        check_network_dtype(name, x, self.net)
        return x

    def _context(self, context: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """The context shaped for the conditioner (None for a coupling that uses none: it is ignored)."""
        return shape_context(context, x, self.context_features) if self.uses_context else None

    def _conditioning(self, x: torch.Tensor) -> torch.Tensor:
        """The channels the network sees (channel mask), a view of ``x``."""
        start = 0 if self.parity == 0 else self.num_channels - self.cond_channels
        return x.narrow(1, start, self.cond_channels)

    def _checkerboard(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.arange(x.shape[2], device=x.device).view(-1, 1)
        w = torch.arange(x.shape[3], device=x.device).view(1, -1)
        return cast((h + w + self.parity) % 2 == 0, x.dtype).view(1, 1, x.shape[2], x.shape[3])

    def _network_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """``(a, mask, b_start)``: what the network sees of ``x``, the checkerboard (None for the channel mask)
        and the op's ``b_start`` (None for the checkerboard)."""
        if self.mask == "channel":
            return self._conditioning(x), None, self.b_start
        mask = self._checkerboard(x)
        return x * mask, mask, None

    def _net_output(self, a: torch.Tensor, context: torch.Tensor | None, a_is_input: bool) -> torch.Tensor:
        """The network's output on ``a`` (and the context), in ``a``'s dtype; ``ValueError`` naming ``subnet``
        unless it is ``(B, outputs_per_channel * out_channels, ...)`` with ``a``'s batch and spatial size (a
        wider one would transform the conditioning channels too: no inverse, a wrong log-det), ``TypeError`` unless
        it is floating-point, and ``ValueError`` if the network changed ``a`` in place where ``a_is_input`` (a view of
        the layer's input, the channel mask's conditioning half, which it reads when no context is joined)."""
        # the context joins the network input; without one no torch.cat (a is a view of the coupling input)
        features = a if context is None else torch.cat([a, context], dim=1)
        # version counters: not while compiling, under functorch transforms or for inference tensors (none kept)
        watch = (
            a_is_input
            and context is None
            and not (torch.compiler.is_compiling() or functorch_transforms_active() or a.is_inference())
        )
        version = a._version if watch else 0
        try:
            out = self.net(features)
        except RuntimeError as error:  # e.g. a ready module built for another width: a bare matmul error
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(
                    f"(the coupling's subnet was given an input of shape {tuple(features.shape)}: "
                    f"in_features = {self.cond_channels} kept channels + {self.context_features} context features)"
                )
            raise
        if watch and a._version != version:  # e.g. a first nn.ReLU(inplace=True): x_a is no longer x_a
            raise ValueError(
                "the coupling's subnet changed its input in place (it is a view of the layer's input, which changed "
                "too, and the transform is no longer invertible): make its first operations out of place, e.g. "
                "nn.ReLU(inplace=False)"
            )
        expected = (a.shape[0], self.outputs_per_channel * self.out_channels, *a.shape[2:])
        if isinstance(out, torch.Tensor) and not out.is_floating_point():
            raise TypeError(f"the coupling's subnet returned a {out.dtype} tensor: it must return floating-point ones")
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"the coupling's subnet returned {got} for an input of shape {tuple(a.shape)}; it must return shape "
                f"{expected}: subnet(in_features, out_features) must map in_features to out_features = "
                f"{self.outputs_per_channel} x {self.out_channels}"
            )
        # Under autocast the network may answer in another dtype; the transform runs in the input's dtype.
        return cast(out, a.dtype)

    def _split_outputs(self, out: torch.Tensor) -> list[torch.Tensor]:
        if self.outputs_per_channel == 1:
            return [out]  # chunk(1) would cost a copy in the backward (autograd joins chunks with torch.cat)
        return list(out.chunk(self.outputs_per_channel, dim=1))

    def _tiles(self, x: torch.Tensor) -> list[Tile]:
        """One tile for the whole image (or for vectors) without tiling, else the tiles of :attr:`tiling`."""
        if x.dim() == 2:
            return [Tile(0, 1, 0, 1, 0, 1, 0, 1)]
        height, width = x.shape[2], x.shape[3]
        if self.tiling is None:
            return [Tile(0, height, 0, width, 0, height, 0, width)]
        halo, hidden = check_tileable(self.net, self.tiling)
        side = self.tiling.side(x.shape[0], hidden or 0, x.element_size(), halo)
        parts = list(tiles(height, width, side, halo))
        if len(parts) > 1:
            check_tiles_are_exact(self.net)
        return parts

    def _net_outputs_no_grad(
        self, a: torch.Tensor, context: torch.Tensor | None, a_is_input: bool
    ) -> list[torch.Tensor]:
        """The network's outputs without a graph, tile by tile under :attr:`tiling` (exact; see tiling)."""
        parts = self._tiles(a)
        if len(parts) == 1:
            return self._split_outputs(self._net_output(a, context, a_is_input))
        out = a.new_empty(a.shape[0], self.outputs_per_channel * self.out_channels, *a.shape[2:])
        for tile in parts:
            window_context = None if context is None else context[(..., *tile.window)]
            window = self._net_output(a[(..., *tile.window)], window_context, a_is_input)
            out[(..., *tile.core)] = window[(..., *tile.core_in_window)]
        return self._split_outputs(out)

    def _couple(
        self, x: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._check_input("y" if inverse else "x", x)
        context = self._context(context, x)
        a, mask, b_start = self._network_input(x)
        if torch.is_grad_enabled():
            outs = self._split_outputs(self._net_output(a, context, mask is None))
        else:
            outs = self._net_outputs_no_grad(a, context, mask is None)
        if mask is not None:
            outs = self._masked_outputs(outs, mask)
        # channel mask: the op writes the whole output, the pass-through channels in the same pass as the transform
        return self._transform(x, outs, inverse, b_start)

    def _masked_outputs(self, outs: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """The network's outputs with the checkerboard's positions (``mask == 1``) set to the transform's
        identity: zero (shift and log-scale 0) here."""
        return [o * (1.0 - mask) for o in outs]

    def _transform(
        self, x: torch.Tensor, outs: list[torch.Tensor], inverse: bool, b_start: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """The coupling op on ``x``: whole, transformed on channels from ``b_start`` (or everywhere if None)."""
        raise NotImplementedError

    def _transform_backward_from_output(
        self,
        y: torch.Tensor,
        outs: list[torch.Tensor],
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        b_start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:  # pragma: no cover - abstract
        """``(x, grad_x, grads of outs)`` of the op's reversible backward; ``grad_x`` is a new tensor."""
        raise NotImplementedError

    def _tile_backward(
        self,
        tile: Tile | None,
        a_full: torch.Tensor,
        y: torch.Tensor,
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        mask: torch.Tensor | None,
        b_start: int | None,
        context: torch.Tensor | None,
        inputs: list[torch.Tensor],
        summed: list[torch.Tensor | None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, grad_x, grad of the network input a)`` on one tile (the last over the tile's halo window), or on
        the whole input where ``tile`` is None (no indexing); ``grad_x`` lacks the network input's part. Gradients
        of ``inputs`` (parameters, context) go to ``.grad`` or, given ``summed`` (one entry per input), are added
        into it: one of several tiles, whose caller hands the sums to autograd once (DistributedDataParallel marks
        each gradient ready once)."""
        with torch.enable_grad():
            a = (a_full if tile is None else a_full[(..., *tile.window)]).detach().requires_grad_(True)
            # shaped here, inside the graph, per tile: each tile's backward frees the graph it walks
            shaped = self._context(context, y)
            if shaped is not None and tile is not None:
                shaped = shaped[(..., *tile.window)]
            # a checkerboard's network reads x * mask, its own to change in place: given a copy, not the leaf a
            net_input = a if mask is None else a.clone()
            outs = self._split_outputs(self._net_output(net_input, shaped, mask is None))
            if tile is not None:
                core = (..., *tile.core)
                outs = [o[(..., *tile.core_in_window)] for o in outs]
                y, grad_y = y[core], grad_y[core]
                mask = None if mask is None else mask[core]
            if mask is not None:
                outs = self._masked_outputs(outs, mask)
        with torch.no_grad():
            x, grad_x, grad_outs = self._transform_backward_from_output(
                y, [o.detach() for o in outs], grad_y, grad_logdet, b_start
            )
        pairs = [(o, g) for o, g in zip(outs, grad_outs) if o.requires_grad]  # a subnet may ignore its input
        if not pairs:
            return x, grad_x, torch.zeros_like(a)
        outputs, grads = [o for o, _ in pairs], [g for _, g in pairs]
        if summed is None:
            nested_backward(outputs, grads, inputs=[a, *inputs])
            return x, grad_x, a.grad if a.grad is not None else torch.zeros_like(a)
        grad_a, *found = torch.autograd.grad(outputs, [a, *inputs], grads, allow_unused=True)
        for i, g in enumerate(found):
            if g is not None:
                summed[i] = g if summed[i] is None else summed[i] + g  # not add_: g may be an expanded view
        return x, grad_x, grad_a if grad_a is not None else torch.zeros_like(a)

    def backward_from_output(
        self,
        y: torch.Tensor,
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward from the output: ``(x, grad_x)``; the gradients of the parameters, and of
        ``context`` where it requires grad (a leaf), go to their ``.grad``.

        The conditioning part passes through unchanged, so the network runs once (with a graph) on it; one
        fused pass then rebuilds ``x`` from ``y`` (the whole of it: the pass-through channels are copied in the
        same pass) and gives the gradients w.r.t. ``x`` and the network outputs, which are backpropagated
        through the network; the network input's gradient is then added into ``grad_x`` in place. Under
        :attr:`tiling` this runs tile by tile, so the network's activations are those of one tile (plus halo),
        not of the whole image.
        """
        y = self._check_input("y", y)
        self._context(context, y)  # the checks, before any work
        a_full, mask, b_start = self._network_input(y)
        inputs = trainable_parameters(self)
        if self.uses_context and context.requires_grad:
            inputs.append(context)
        parts = self._tiles(y)
        # the network's batch norms keep the running statistics the forward left: put back after the tiles'
        # backwards (which read the saved ones)
        with running_statistics_kept(self.net):
            if len(parts) == 1:  # the whole input: no tile to cut out
                x, grad_x, grad_a = self._tile_backward(
                    None, a_full, y, grad_y, grad_logdet, mask, b_start, context, inputs, None
                )
            else:
                hooked = [t for t in inputs if t._backward_hooks]
                if hooked:  # each tile's autograd.grad runs them, then the one backward of the sums: wrong gradients
                    raise ValueError(
                        f"{len(hooked)} parameter(s) of the tiled coupling (or its context) have tensor hooks "
                        "(register_hook), which the tiled backward would run once per tile and once more on the "
                        "sum: remove them, use register_post_accumulate_grad_hook, or switch the tiling off"
                    )
                x, grad_x = torch.empty_like(y), torch.empty_like(y)
                grad_a = torch.zeros_like(a_full)
                summed: list[torch.Tensor | None] = [None] * len(inputs)
                for tile in parts:
                    core = (..., *tile.core)
                    x[core], grad_x[core], grad_window = self._tile_backward(
                        tile, a_full, y, grad_y, grad_logdet, mask, b_start, context, inputs, summed
                    )
                    grad_a[(..., *tile.window)] += grad_window
                used = [(t, g) for t, g in zip(inputs, summed) if g is not None]
                if used:  # into .grad through autograd: accumulation and hooks (DistributedDataParallel's) as usual
                    leaves = [t for t, _ in used]
                    nested_backward(leaves, [g for _, g in used], inputs=leaves)
        if mask is None:
            # grad_x is a new tensor (a shift gradient sharing its memory covers only the transformed channels):
            # the conditioning channels' second path goes in place, not through a torch.cat
            self._conditioning(grad_x).add_(grad_a)
            return x, grad_x
        return x, grad_x + grad_a * mask

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` for ``x`` of shape ``(B, C, H, W)`` (or ``(B, D)`` with ``vectors=True``)."""
        return self._couple(x, context, inverse=False)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, -logdet)`` for ``y`` shaped like :meth:`forward`'s ``x``, at the same ``context``."""
        return self._couple(y, context, inverse=True)


class AffineCoupling(_Coupling):
    """Affine coupling ``y_b = (x_b + t) * sigmoid(r + 2)`` (Glow) or ``x_b * exp(tanh(r)) + t`` (RealNVP).

    ``(t, r) = net(x_a[, context])`` (the conditioner's output channels: ``t`` then ``r``); log-det ``sum(log s)``
    per sample. The checkerboard mask needs ``scale="exp"`` (log-scale 0 off the mask). Conditioner, context and
    ``vectors`` as in the base class: ``subnet(in_features, out_features)`` gets ``out_features = 2 * C_b``.
    """

    outputs_per_channel = 2

    def __init__(
        self,
        num_channels: int,
        hidden: int = 512,
        scale: ScaleKind = "sigmoid",
        mask: MaskKind = "channel",
        parity: int = 0,
        *,
        subnet: Subnet | None = None,
        context_features: int = 0,
        vectors: bool = False,
    ) -> None:
        if scale not in SCALE_KINDS:
            raise ValueError(f"scale must be one of {SCALE_KINDS}, got {scale!r}")
        if mask == "checkerboard" and scale != "exp":
            raise ValueError("mask='checkerboard' needs scale='exp': sigmoid(0 + 2) != 1 off the mask")
        super().__init__(num_channels, hidden, mask, parity, subnet, context_features, vectors)
        self.scale = scale

    def _transform(
        self, x: torch.Tensor, outs: list[torch.Tensor], inverse: bool, b_start: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shift, raw = outs
        op = affine_coupling_inverse if inverse else affine_coupling
        return op(x, shift, raw, self.scale, b_start)

    def _transform_backward_from_output(
        self,
        y: torch.Tensor,
        outs: list[torch.Tensor],
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        b_start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        shift, raw = outs
        x, grad_x, grad_shift, grad_raw = affine_coupling_backward_from_output(
            y, shift, raw, grad_y, grad_logdet, self.scale, b_start
        )
        return x, grad_x, [grad_shift, grad_raw]


class AdditiveCoupling(_Coupling):
    """Additive (NICE) coupling ``y_b = x_b + t`` with ``t = net(x_a[, context])``; log-det 0. Conditioner,
    context and ``vectors`` as in :class:`AffineCoupling` (``out_features = C_b``)."""

    outputs_per_channel = 1

    def __init__(
        self,
        num_channels: int,
        hidden: int = 512,
        mask: MaskKind = "channel",
        parity: int = 0,
        *,
        subnet: Subnet | None = None,
        context_features: int = 0,
        vectors: bool = False,
    ) -> None:
        super().__init__(num_channels, hidden, mask, parity, subnet, context_features, vectors)

    def _transform(
        self, x: torch.Tensor, outs: list[torch.Tensor], inverse: bool, b_start: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        op = additive_coupling_inverse if inverse else additive_coupling
        return op(x, outs[0], b_start)

    def _transform_backward_from_output(
        self,
        y: torch.Tensor,
        outs: list[torch.Tensor],
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        b_start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x, grad_x, grad_shift = additive_coupling_backward_from_output(y, outs[0], grad_y, b_start)
        return x, grad_x, [grad_shift]
