"""Affine (Glow / RealNVP) and additive (NICE) coupling layers with channel or checkerboard masks."""

from __future__ import annotations

from typing import Literal

import torch

from fastflow.nn.base import FlowLayer, check_image
from fastflow.nn.coupling_network import coupling_network
from fastflow.nn.tiling import Tile, Tiling, tiles
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
    """Shared masking logic: which part conditions the network (``a``) and which is transformed (``b``).

    ``mask="channel"``: ``a`` is ``C // 2`` channels (the first ones for ``parity=0``, the last ones for
    ``parity=1``) and ``b`` the rest. ``mask="checkerboard"``: the network sees ``x * m`` with
    ``m[h, w] = (h + w + parity) % 2 == 0`` and the transform acts where ``m == 0`` (the network's outputs
    are multiplied by ``1 - m``, so positions under the mask pass through with log-scale 0).
    """

    outputs_per_channel: int

    def __init__(self, num_channels: int, hidden: int, mask: MaskKind, parity: int) -> None:
        super().__init__()
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"mask must be 'channel' or 'checkerboard', got {mask!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        if mask == "channel" and num_channels < 2:
            raise ValueError(f"a channel-mask coupling needs num_channels >= 2, got {num_channels}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.num_channels = num_channels
        self.mask = mask
        self.parity = parity
        self.cond_channels = num_channels // 2 if mask == "channel" else num_channels
        self.out_channels = num_channels - num_channels // 2 if mask == "channel" else num_channels
        self.hidden = hidden
        self.net = coupling_network(self.cond_channels, hidden, self.outputs_per_channel * self.out_channels)
        self.tiling: Tiling | None = None

    @property
    def b_start(self) -> int:
        """First of the channels the transform acts on (channel mask): the rest of the channels pass through."""
        return self.cond_channels if self.parity == 0 else 0

    def _conditioning(self, x: torch.Tensor) -> torch.Tensor:
        """The channels the network sees (channel mask), a view of ``x``."""
        start = 0 if self.parity == 0 else self.num_channels - self.cond_channels
        return x.narrow(1, start, self.cond_channels)

    def _checkerboard(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.arange(x.shape[2], device=x.device).view(-1, 1)
        w = torch.arange(x.shape[3], device=x.device).view(1, -1)
        return ((h + w + self.parity) % 2 == 0).to(x.dtype).view(1, 1, x.shape[2], x.shape[3])

    def _net_outputs(self, a: torch.Tensor) -> list[torch.Tensor]:
        # Under autocast the network may answer in another dtype; the transform runs in the input's dtype.
        out = self.net(a).to(a.dtype)
        if self.outputs_per_channel == 1:
            return [out]  # chunk(1) would cost a copy in the backward (autograd joins chunks with torch.cat)
        return list(out.chunk(self.outputs_per_channel, dim=1))

    def _tiles(self, x: torch.Tensor) -> list[Tile]:
        """One tile for the whole image without tiling, else the tiles of :attr:`tiling`."""
        height, width = x.shape[2], x.shape[3]
        if self.tiling is None:
            return [Tile(0, height, 0, width, 0, height, 0, width)]
        return list(tiles(height, width, self.tiling.side(x.shape[0], self.hidden, x.element_size())))

    def _net_outputs_no_grad(self, a: torch.Tensor) -> list[torch.Tensor]:
        """The network's outputs without a graph, tile by tile under :attr:`tiling` (exact; see tiling)."""
        parts = self._tiles(a)
        if len(parts) == 1:
            return self._net_outputs(a)
        out = a.new_empty(a.shape[0], self.outputs_per_channel * self.out_channels, *a.shape[2:])
        for tile in parts:
            window = self.net(a[(..., *tile.window)]).to(a.dtype)
            out[(..., *tile.core)] = window[(..., *tile.core_in_window)]
        return list(out.chunk(self.outputs_per_channel, dim=1))

    def _masked_outputs(self, net_in: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        outs = self._net_outputs(net_in) if torch.is_grad_enabled() else self._net_outputs_no_grad(net_in)
        return outs if mask is None else [o * (1.0 - mask) for o in outs]

    def _couple(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        check_image("y" if inverse else "x", x, self.num_channels)
        if self.mask == "channel":
            # the op writes the whole output: the pass-through channels in the same pass as the transform
            return self._transform(x, self._masked_outputs(self._conditioning(x), None), inverse, self.b_start)
        m = self._checkerboard(x)
        return self._transform(x, self._masked_outputs(x * m, m), inverse, None)

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
        tile: Tile,
        net_in_full: torch.Tensor,
        y: torch.Tensor,
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        mask: torch.Tensor | None,
        b_start: int | None,
        params: list[torch.nn.Parameter],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, grad_x, grad of the network input)`` on one tile (the last over the tile's halo window);
        ``grad_x`` lacks the network input's part."""
        core = (..., *tile.core)
        with torch.enable_grad():
            net_in = net_in_full[(..., *tile.window)].detach().requires_grad_(True)
            outs = [o[(..., *tile.core_in_window)] for o in self._net_outputs(net_in)]
            if mask is not None:
                outs = [o * (1.0 - mask[core]) for o in outs]
        with torch.no_grad():
            x, grad_x, grad_outs = self._transform_backward_from_output(
                y[core], [o.detach() for o in outs], grad_y[core], grad_logdet, b_start
            )
        torch.autograd.backward(outs, grad_outs, inputs=[net_in, *params])
        return x, grad_x, net_in.grad

    def backward_from_output(
        self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reversible backward from the output: ``(x, grad_x)``; parameter gradients go to ``.grad``.

        The conditioning part passes through unchanged, so the network runs once (with a graph) on it; one
        fused pass then rebuilds ``x`` from ``y`` (the whole of it: the pass-through channels are copied in the
        same pass) and gives the gradients w.r.t. ``x`` and the network outputs, which are backpropagated
        through the network; the network input's gradient is then added into ``grad_x`` in place. Under
        :attr:`tiling` this runs tile by tile, so the network's activations are those of one tile (plus halo),
        not of the whole image.
        """
        check_image("y", y, self.num_channels)
        if self.mask == "channel":
            net_in_full, mask, b_start = self._conditioning(y), None, self.b_start
        else:
            mask = self._checkerboard(y)
            net_in_full, b_start = y * mask, None
        params = [p for p in self.parameters() if p.requires_grad]
        parts = self._tiles(y)
        if len(parts) == 1:
            x, grad_x, grad_net_in = self._tile_backward(
                parts[0], net_in_full, y, grad_y, grad_logdet, mask, b_start, params
            )
        else:
            x, grad_x = torch.empty_like(y), torch.empty_like(y)
            grad_net_in = torch.zeros_like(net_in_full)
            for tile in parts:
                core = (..., *tile.core)
                x[core], grad_x[core], grad_window = self._tile_backward(
                    tile, net_in_full, y, grad_y, grad_logdet, mask, b_start, params
                )
                grad_net_in[(..., *tile.window)] += grad_window
        if mask is None:
            # grad_x is a new tensor (a shift gradient sharing its memory covers only the transformed channels):
            # the conditioning channels' second path goes in place, not through a torch.cat
            self._conditioning(grad_x).add_(grad_net_in)
            return x, grad_x
        return x, grad_x + grad_net_in * mask

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` for ``x`` of shape ``(B, C, H, W)``."""
        return self._couple(x, inverse=False)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, -logdet)`` for ``y`` of shape ``(B, C, H, W)``."""
        return self._couple(y, inverse=True)


class AffineCoupling(_Coupling):
    """Affine coupling ``y_b = (x_b + t) * sigmoid(r + 2)`` (Glow) or ``x_b * exp(tanh(r)) + t`` (RealNVP).

    ``(t, r) = net(x_a)`` where ``net`` is Glow's conv3x3-ReLU-conv1x1-ReLU-zero-init conv3x3; log-det is
    ``sum(log s)`` per sample. The checkerboard mask needs ``scale="exp"`` (log-scale 0 off the mask).
    """

    outputs_per_channel = 2

    def __init__(
        self,
        num_channels: int,
        hidden: int = 512,
        scale: ScaleKind = "sigmoid",
        mask: MaskKind = "channel",
        parity: int = 0,
    ) -> None:
        if scale not in SCALE_KINDS:
            raise ValueError(f"scale must be one of {SCALE_KINDS}, got {scale!r}")
        if mask == "checkerboard" and scale != "exp":
            raise ValueError("mask='checkerboard' needs scale='exp': sigmoid(0 + 2) != 1 off the mask")
        super().__init__(num_channels, hidden, mask, parity)
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
    """Additive (NICE) coupling ``y_b = x_b + t`` with ``t = net(x_a)``; log-det 0."""

    outputs_per_channel = 1

    def __init__(self, num_channels: int, hidden: int = 512, mask: MaskKind = "channel", parity: int = 0) -> None:
        super().__init__(num_channels, hidden, mask, parity)

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
