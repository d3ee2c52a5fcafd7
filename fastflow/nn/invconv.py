"""Invertible 1x1 convolution, plain or LU-parameterised (Glow), and its vector twin, the invertible linear map."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from fastflow.nn.base import FlowLayer, as_pixels, check_features, group_indices, runs_as_written
from fastflow.nn.permutation import loaded_permutation_error
from fastflow.nn.state_upgrade import pack_lu_factors
from fastflow.ops._checks import check_bool, int_at_least, logdet_dtype
from fastflow.ops.channel_mix import channel_mix
from fastflow.ops.invconv import dense_inverse_weight, dense_logdet, lu_inverse_weight, lu_weight_and_logdet

__all__ = [
    "INVCONV_INITS",
    "InvConv1x1",
    "InvConvInit",
    "InvConvWeights",
    "InvertibleLinear",
    "assembles_as_written",
    "exact_dtype",
    "stack_tensors",
    "stacked_weights",
    "unstack_tensor",
]


_AS_IS = contextlib.nullcontext()  # stateless, so one serves every call


def exact_dtype(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off: the mix must run in the input's dtype to stay invertible to its rounding. Where autocast is
    off already, a null context (entering ``torch.autocast`` costs host time every layer would pay)."""
    if not torch.is_autocast_enabled(x.device.type):
        return _AS_IS
    return torch.autocast(device_type=x.device.type, enabled=False)


InvConvInit = Literal["rotation", "identity", "reverse"]
INVCONV_INITS: tuple[InvConvInit, ...] = ("rotation", "identity", "reverse")


def _initial_weight(num_channels: int, init: str) -> torch.Tensor:
    """A random rotation (Glow's), the identity, or the permutation that reverses the channel order."""
    if init == "rotation":
        q, _ = torch.linalg.qr(torch.randn(num_channels, num_channels))
        return q
    eye = torch.eye(num_channels)
    return eye if init == "identity" else eye.flip(0)


class InvConvWeights(NamedTuple):
    """A convolution's weights in one direction: ``weight`` is ``W`` (forward) or ``W^-1`` (inverse),
    ``weight_logdet`` is ``log|det W|`` (a scalar) in both."""

    weight: torch.Tensor
    weight_logdet: torch.Tensor


class InvConv1x1(FlowLayer):
    """Per-pixel channel mix ``y = W x`` with an invertible ``C x C`` weight, on ``(B, C, H, W)``, or ``y = W x``
    on vectors ``(B, C)`` (the same op on ``(B, C, 1, 1)``, log-det ``log|det W|``).

    ``lu=True`` stores ``W = P @ L @ (U + diag(sign_s * exp(log_s)))``: fixed ``perm`` (P) and ``sign_s`` buffers
    and one parameter, ``lu_packed`` (``C x C``: L's strict lower part below the diagonal, U's strict upper part
    above it, ``log_s`` on the diagonal, as LAPACK packs an LU factorisation; :attr:`log_s` is a view of that
    diagonal); log-det ``H * W * sum(log_s)`` and the inverse from triangular solves. ``lu=False`` stores ``weight``
    and uses ``slogdet``/``inverse`` (the reference parameterisation). ``init``: both start from a random rotation
    (``"rotation"``, Glow's), the identity or the reversal of the channel order (``"reverse"``; in LU form ``perm``
    is then the reversal and ``L = U = I``). State dicts of the earlier forms (``lower`` and ``upper``, or
    ``lu_packed`` beside a separate ``log_s``) load into ``lu_packed``.
    """

    def __init__(self, num_channels: int, lu: bool = True, *, init: InvConvInit = "rotation") -> None:
        super().__init__()
        int_at_least("num_channels", num_channels, 1)
        check_bool("lu", lu)
        if init not in INVCONV_INITS:
            raise ValueError(f"init must be one of {INVCONV_INITS}, got {init!r}")
        self.num_channels = num_channels
        self.lu = lu
        w0 = _initial_weight(num_channels, init)
        if lu:
            p, lower, upper = torch.linalg.lu(w0)
            diag = torch.diagonal(upper)
            self.register_buffer("perm", p.argmax(dim=1))
            self.register_buffer("sign_s", torch.sign(diag))
            packed = torch.tril(lower, diagonal=-1) + torch.triu(upper, diagonal=1) + torch.diag(torch.log(diag.abs()))
            self.lu_packed = nn.Parameter(packed)
        else:
            self.weight = nn.Parameter(w0)

    @property
    def log_s(self) -> torch.Tensor:
        """``log|diag(U)|`` (``(C,)``): a view of the diagonal of ``lu_packed`` (LU form only)."""
        if not self.lu:
            raise AttributeError("log_s: a plain (lu=False) InvConv1x1 has no LU factors")
        return torch.diagonal(self.lu_packed)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Loads the earlier LU forms too (:func:`~fastflow.nn.state_upgrade.pack_lu_factors`). Refuses (through
        ``load_state_dict``'s error list) a ``perm`` that is not a permutation of the channels, or a ``sign_s``
        with an entry other than +1 or -1: either would give a finite but wrong log-density."""
        errors = []
        if self.lu:
            pack_lu_factors(state_dict, prefix)
            errors.append(loaded_permutation_error(state_dict, prefix + "perm", self.num_channels))
            sign_s = state_dict.get(prefix + "sign_s")
            if isinstance(sign_s, torch.Tensor) and not bool(((sign_s == 1) | (sign_s == -1)).all()):
                errors.append(f"{prefix}sign_s must be all +1 or -1 (the signs of U's diagonal), got {sign_s!r}")
        super()._load_from_state_dict(state_dict, prefix, *args)
        args[-1].extend(error for error in errors if error is not None)  # error_msgs: load_state_dict raises

    def weight_and_logdet(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W, log|det W|)``: the ``(C, C)`` weight and its log-det (a scalar, per pixel)."""
        if self.lu:
            return lu_weight_and_logdet(self.perm, self.lu_packed, self.lu_packed, self.sign_s, self.log_s)
        return self.weight, dense_logdet(self.weight)

    def weight_logdet(self) -> torch.Tensor:
        """``log|det W|`` (a scalar): ``sum(log_s)`` in LU form, ``slogdet`` otherwise."""
        return self.log_s.sum() if self.lu else dense_logdet(self.weight)

    def inverse_weight(self) -> torch.Tensor:
        """``W^-1``: by triangular solves in LU form, ``torch.linalg.inv`` otherwise (both in float64)."""
        if self.lu:
            return lu_inverse_weight(self.perm, self.lu_packed, self.lu_packed, self.sign_s, self.log_s)
        return dense_inverse_weight(self.weight)

    @staticmethod
    def _layer_logdet(weight_logdet: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        total = weight_logdet.to(logdet_dtype(pixels.dtype)) * (pixels.shape[2] * pixels.shape[3])
        return total.expand(pixels.shape[0])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, weights: InvConvWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W x, H * W * log|det W|)`` for ``x`` of shape ``(B, C, H, W)`` or ``(B, C)``; ``context`` is ignored.
        ``weights``: the convolution's share of its container's :meth:`batched_weights`, computed here when None."""
        pixels = as_pixels(check_features("x", x, self.num_channels))
        with exact_dtype(x):
            weight, weight_logdet = self.weight_and_logdet() if weights is None else weights
            return channel_mix(pixels, weight).view_as(x), self._layer_logdet(weight_logdet, pixels)

    def inverse(
        self, y: torch.Tensor, context: torch.Tensor | None = None, weights: InvConvWeights | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W^-1 y, -H * W * log|det W|)``; ``weights`` as in :meth:`forward`, inverse direction."""
        pixels = as_pixels(check_features("y", y, self.num_channels))
        with exact_dtype(y):
            weight, weight_logdet = (self.inverse_weight(), self.weight_logdet()) if weights is None else weights
            return channel_mix(pixels, weight).view_as(y), -self._layer_logdet(weight_logdet, pixels)

    @staticmethod
    def batched_weights(
        convs: Sequence[InvConv1x1], x: torch.Tensor, inverse: bool = False
    ) -> list[InvConvWeights | None]:
        """The :class:`InvConvWeights` of the convolutions ``convs`` of a container, computed together: those of one
        width, ``lu`` setting, dtype and device are stacked and assembled (``inverse``: inverted) in one batched
        computation (:func:`stacked_weights`: one launch per operation instead of one per convolution), and
        gradients reach each one's parameters as if it had computed its own. None (the convolution computes its
        own, as alone) for one that does not :func:`assemble as written <assembles_as_written>` and for a group of
        one, which has nothing to share. ``x`` is the container's input (``inverse``: its output)."""
        keys = [_batch_key(conv) if assembles_as_written(conv) else None for conv in convs]
        weights: list[InvConvWeights | None] = [None] * len(convs)
        for indices in group_indices(keys, x, inverse):
            if len(indices) == 1:
                continue
            with exact_dtype(x):
                weight, weight_logdet = stacked_weights([convs[i] for i in indices], inverse)
            for i, w, logdet in zip(indices, unstack_tensor(weight), unstack_tensor(weight_logdet)):
                weights[i] = InvConvWeights(w, logdet)
        return weights


class InvertibleLinear(InvConv1x1):
    """``y = W x`` on vectors ``(B, features)`` with an invertible ``features x features`` weight: the vector twin
    of :class:`InvConv1x1` (the same parameters, ``init`` options, op and O(D) log-det ``sum(log_s)`` in the LU
    form)."""

    def __init__(self, features: int, lu: bool = True, *, init: InvConvInit = "rotation") -> None:
        int_at_least("features", features, 1)
        super().__init__(features, lu=lu, init=init)


def _batch_key(conv: InvConv1x1) -> tuple:
    param = conv.lu_packed if conv.lu else conv.weight
    return (conv.num_channels, conv.lu, param.dtype, param.device)


def assembles_as_written(conv: nn.Module) -> bool:
    """Whether ``conv`` is an :class:`InvConv1x1` that runs as written (:func:`~fastflow.nn.base.runs_as_written`)
    and computes its weights with :class:`InvConv1x1`'s own methods and ``log_s``: then :func:`stacked_weights` of
    its parameters gives what it would compute itself."""
    kind = type(conv)
    return (
        runs_as_written(conv, InvConv1x1)
        and kind.weight_and_logdet is InvConv1x1.weight_and_logdet
        and kind.inverse_weight is InvConv1x1.inverse_weight
        and kind.weight_logdet is InvConv1x1.weight_logdet
        and kind.log_s is InvConv1x1.log_s
    )


def stack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(tensors)``; for one tensor a view with a leading dimension of 1 (no copy, no launch)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def unstack_tensor(stacked: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``stacked.unbind(0)``, whose backward stacks the gradients (one launch); for a leading dimension of 1
    a view whose backward is a view too."""
    return (stacked.squeeze(0),) if stacked.shape[0] == 1 else stacked.unbind(0)


def stacked_weights(convs: Sequence[InvConv1x1], inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, log|det W|)`` of ``K`` convolutions at once: ``(K, C, C)`` weights (``W^-1`` for ``inverse``)
    and ``(K,)`` log-dets (of ``W`` in both directions), from their stacked parameters in one batched
    computation (one launch per operation instead of one per convolution), equal to each one's
    :meth:`~InvConv1x1.weight_and_logdet` / :meth:`~InvConv1x1.inverse_weight`. Gradients reach every
    convolution's parameters. The convolutions must agree on ``num_channels`` and ``lu``.
    """
    if len({(conv.num_channels, conv.lu) for conv in convs}) != 1:
        raise ValueError("stacked_weights needs convolutions of one num_channels and lu setting")
    if convs[0].lu:
        names = ("perm", "lu_packed", "sign_s")
        perm, packed, sign_s = (stack_tensors([getattr(conv, name) for conv in convs]) for name in names)
        log_s = torch.diagonal(packed, dim1=-2, dim2=-1)
        if inverse:
            return lu_inverse_weight(perm, packed, packed, sign_s, log_s), log_s.sum(-1)
        return lu_weight_and_logdet(perm, packed, packed, sign_s, log_s)
    weight = stack_tensors([conv.weight for conv in convs])
    logdet = dense_logdet(weight)
    return (dense_inverse_weight(weight) if inverse else weight), logdet
