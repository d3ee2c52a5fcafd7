"""Rational-quadratic spline coupling (Durkan et al., 2019, "Neural Spline Flows") on vectors or images, with a
channel split, any conditioner network and an optional conditioning context."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from fastflow.nn.coupling import MaskKind, _Coupling
from fastflow.nn.coupling_network import Subnet
from fastflow.ops.spline import check_layer_bins, rq_spline, rq_spline_backward_from_output, rq_spline_inverse

__all__ = ["SplineCoupling", "identity_derivative_raw", "start_at_identity"]

_MIN_DERIVATIVE = 1e-3  # the op's default minimums, which the layer keeps


def identity_derivative_raw(min_derivative: float = _MIN_DERIVATIVE) -> float:
    """The raw derivative ``r`` with ``min_derivative + softplus(r) = 1``: ``log(expm1(1 - min_derivative))``.

    With equal raw widths and heights (slope ``s = 1`` in every bin) and every knot derivative 1, the spline is
    the identity: ``y = yl + H (u^2 + t) / 1 = yl + H u = x`` and ``dy/dx = u^2 + 2t + (1 - u)^2 = 1``."""
    return math.log(math.expm1(1.0 - min_derivative))


def _output_layer(net: nn.Module) -> nn.Linear | nn.Conv2d | None:
    """The conditioner's last ``nn.Linear`` / ``nn.Conv2d`` (module order), or None."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1] if layers else None


@torch.no_grad()
def start_at_identity(net: nn.Module, features: int, bins: int, parameter_major: bool) -> bool:
    """Set the biases of ``net``'s zero-initialised output layer so that a spline fed by it starts as the identity
    map: 0 for the raw widths and heights, :func:`identity_derivative_raw` for the derivatives; returns whether it
    did.

    The output layer is ``net``'s last ``nn.Linear`` / ``nn.Conv2d``; it qualifies when its weights exist (not
    lazy) and are all zero
    (as :class:`~fastflow.nn.MLPNetwork`'s and :class:`~fastflow.nn.ConvNetwork`'s are) and it has a bias of
    ``features * (3 bins - 1)`` entries, laid out parameter-major (``(3K - 1, features)``, images) or
    element-major (``(features, 3K - 1)``, vectors). A zero output with any other net gives derivatives
    ``softplus(0) + 1e-3 = 0.69`` at the interior knots: near, not at, the identity."""
    layer = _output_layer(net)
    params = 3 * bins - 1
    if layer is None or layer.bias is None or any(is_lazy(p) for p in (layer.weight, layer.bias)):
        return False  # a lazy layer (nn.LazyLinear) has no weights before its first forward: nothing to set
    if layer.bias.numel() != features * params or layer.weight.any():
        return False
    bias = layer.bias.view(params, features).t() if parameter_major else layer.bias.view(features, params)
    bias.zero_()
    bias[:, 2 * bins :] = identity_derivative_raw()
    return True


class SplineCoupling(_Coupling):
    """Coupling ``y_b = RQS(x_b; raw)`` with ``raw = net(x_a[, context])``, ``y_a = x_a``; log-det
    ``sum log dy_b/dx_b`` per sample.

    The spline is :func:`~fastflow.ops.spline.rq_spline`: ``bins`` bins (2 to 500 without a warning, at most 1000,
    :data:`~fastflow.ops.spline.MAX_LAYER_BINS`) on ``[-bound, bound]`` (widths and heights by softmax, interior
    knot derivatives by softplus, all with minimums ``1e-3``), the identity outside. The
    channel split, ``parity``, conditioner (``subnet(in_features, out_features)`` or a module, by default an
    :class:`~fastflow.nn.MLPNetwork` for ``vectors=True`` and a :class:`~fastflow.nn.ConvNetwork` for images, of
    width ``hidden``) and ``context_features`` are :class:`~fastflow.nn.AffineCoupling`'s, with ``out_features =
    C_b (3 bins - 1)`` laid out so that the op reads the output in place: vectors ``(B, C_b (3K - 1))`` viewed
    ``(B, C_b, 3K - 1)`` (element-major); images parameter-major ``(B, (3K - 1) C_b, H, W)`` viewed ``(B, 3K - 1,
    C_b, H, W)`` and permuted to ``(B, C_b, H, W, 3K - 1)`` (a view). ``mask="checkerboard"`` (images, as in
    RealNVP): the network sees ``x * m`` and every element goes through the spline, the masked ones with the
    identity's raw parameters (:meth:`_masked_outputs`): they pass through to float rounding.

    Initialisation: a zero-initialised output layer (the default conditioners') starts with equal widths and
    heights and unit derivatives, the identity map (:func:`start_at_identity`; up to float rounding).
    ``backward_from_output`` is the fused reversible backward
    (:func:`~fastflow.ops.spline.rq_spline_backward_from_output`).
    """

    def __init__(
        self,
        num_channels: int,
        hidden: int = 512,
        bins: int = 8,
        bound: float = 3.0,
        parity: int = 0,
        *,
        mask: MaskKind = "channel",
        subnet: Subnet | None = None,
        context_features: int = 0,
        vectors: bool = False,
    ) -> None:
        check_layer_bins(bins)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)):
            raise TypeError(f"bound must be a float, got {type(bound).__name__}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be finite and > 0, got {bound}")
        self.outputs_per_channel = 3 * bins - 1
        super().__init__(num_channels, hidden, mask, parity, subnet, context_features, vectors)
        self.bins = bins
        self.bound = float(bound)
        start_at_identity(self.net, self.out_channels, bins, parameter_major=not vectors)
        if mask == "checkerboard":  # 1 at the derivatives' rows of the (image) network's parameter-major output
            rows = torch.zeros(self.outputs_per_channel, num_channels)
            rows[2 * bins :] = 1.0
            self.register_buffer("derivative_rows", rows.view(1, -1, 1, 1), persistent=False)

    def _masked_outputs(self, outs: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """The raw parameters with the checkerboard's positions set to the identity spline's (equal widths and
        heights, unit derivatives: :func:`identity_derivative_raw`, rounded once to the output's dtype), so those
        positions pass through to that dtype's rounding and add a log-det of that order."""
        identity = self.derivative_rows.to(outs[0].dtype) * identity_derivative_raw()
        return [o * (1.0 - mask) + identity * mask for o in outs]

    def _split_outputs(self, out: torch.Tensor) -> list[torch.Tensor]:
        # the raw parameters stay one tensor in the network's layout; _raw views them as the op reads them
        return [out]

    def _raw(self, out: torch.Tensor) -> torch.Tensor:
        """The network output ``out`` as the op's ``raw`` ``(*x_b.shape, 3K - 1)``: a view (class docstring)."""
        params, channels = self.outputs_per_channel, self.out_channels
        if out.dim() == 2:
            return out.unflatten(1, (channels, params))
        return out.unflatten(1, (params, channels)).permute(0, 2, 3, 4, 1)

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The whole tensor from the conditioning part ``a`` and the transformed part ``b`` (channel order)."""
        return torch.cat([a, b] if self.parity == 0 else [b, a], dim=1)

    def _transform(
        self, x: torch.Tensor, outs: list[torch.Tensor], inverse: bool, b_start: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        op = rq_spline_inverse if inverse else rq_spline
        if b_start is None:  # checkerboard: every element through the spline, the masked ones at the identity
            return op(x, self._raw(outs[0]), self.bins, self.bound)
        y_b, logdet = op(x.narrow(1, b_start, self.out_channels), self._raw(outs[0]), self.bins, self.bound)
        return self._join(self._conditioning(x), y_b), logdet

    def _transform_backward_from_output(
        self,
        y: torch.Tensor,
        outs: list[torch.Tensor],
        grad_y: torch.Tensor,
        grad_logdet: torch.Tensor,
        b_start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        out = outs[0]
        channels = self.out_channels
        whole = b_start is None  # checkerboard
        x_b, grad_x_b, grad_raw = rq_spline_backward_from_output(
            y if whole else y.narrow(1, b_start, channels), self._raw(out),
            grad_y if whole else grad_y.narrow(1, b_start, channels), grad_logdet, self.bins, self.bound,
        )  # fmt: skip
        if out.dim() == 2:
            grad_out = grad_raw.flatten(1)
        else:  # back to the network's parameter-major layout (the convolution's backward wants it contiguous)
            grad_out = grad_raw.permute(0, 4, 1, 2, 3).reshape(out.shape)
        if whole:
            return x_b, grad_x_b, [grad_out]
        x = self._join(self._conditioning(y), x_b)
        grad_x = self._join(self._conditioning(grad_y), grad_x_b)
        return x, grad_x, [grad_out]
