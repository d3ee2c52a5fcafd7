"""The flow-layer contract shared by every invertible module, and the input checks at its boundary."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from fastflow.ops._checks import logdet_dtype

__all__ = [
    "FlowLayer",
    "as_pixels",
    "check_features",
    "check_image",
    "check_network_dtype",
    "first_floating_parameter",
    "group_indices",
    "run_layer",
    "runs_as_written",
    "zero_logdet",
]


def _check_floating(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _check_count(name: str, x: torch.Tensor, count: int | None) -> None:
    if count is not None and x.shape[1] != count:
        what = "features" if x.dim() == 2 else "channels"
        raise ValueError(f"{name} has {x.shape[1]} {what} but the layer was built for {count} ({what[:-1]} mismatch)")


def check_image(name: str, x: object, channels: int | None = None) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a floating ``(B, C, H, W)`` tensor with ``channels`` channels."""
    x = _check_floating(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got rank {x.dim()} shape {tuple(x.shape)}")
    _check_count(name, x, channels)
    return x


def check_features(name: str, x: object, features: int | None = None) -> torch.Tensor:
    """Raise a clear error unless ``x`` is a floating vector batch ``(B, D)`` with ``D = features`` or an image
    batch ``(B, C, H, W)`` with ``C = features``: dim 1 is what layers mix, normalise and split."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() in (2, 4):  # the common case, one call
        if features is None or x.shape[1] == features:
            return x
    x = _check_floating(name, x)
    if x.dim() not in (2, 4):
        raise ValueError(f"{name} must have shape (B, D) or (B, C, H, W), got rank {x.dim()} shape {tuple(x.shape)}")
    _check_count(name, x, features)
    return x


def first_floating_parameter(module: nn.Module) -> nn.Parameter | None:
    """The first floating-point parameter of ``module.parameters()``, or None: for a module that does not override
    ``parameters()``, a walk of the module tree's dicts in its order (the module's own parameters, then its
    submodules' depth first, each module once), where ``parameters()`` builds a generator over every submodule and
    a memo set, a cost each layer call would pay for one dtype."""
    if type(module).parameters is not nn.Module.parameters:  # the module says itself which are its parameters
        return next((p for p in module.parameters() if p.is_floating_point()), None)
    return _first_floating(module, set())


def _first_floating(module: nn.Module, seen: set[int]) -> nn.Parameter | None:
    seen.add(id(module))
    for parameter in module._parameters.values():
        if parameter is not None and parameter.is_floating_point():
            return parameter
    for child in module._modules.values():
        found = None if child is None or id(child) in seen else _first_floating(child, seen)
        if found is not None:
            return found
    return None


def check_network_dtype(name: str, x: torch.Tensor, net: nn.Module) -> None:
    """``TypeError`` naming ``name`` unless ``x`` has the dtype of ``net``'s (a conditioner's) floating parameters:
    a float16 batch into a float32 network fails deep in a matrix product otherwise, or, under autocast, would run
    the flow in float16 (autocast lowers the networks' precision, never the flow's). Not checked while
    ``torch.compile`` traces."""
    if torch.compiler.is_compiling():
        return
    reference = first_floating_parameter(net)
    if reference is not None and x.dtype != reference.dtype:
        raise TypeError(
            f"{name} is {x.dtype} but the layer's network is {reference.dtype}: convert one, e.g. "
            f"{name}.to({reference.dtype}) or layer.to({x.dtype})"
        )


def as_pixels(x: torch.Tensor) -> torch.Tensor:
    """``x`` as an image batch: a vector batch ``(B, D)`` is viewed as ``(B, D, 1, 1)`` (no copy), so per-channel
    ops serve vectors unchanged (their ``H * W`` factor is 1); an image batch is returned as is."""
    return x[:, :, None, None] if x.dim() == 2 else x


def run_layer(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, context: torch.Tensor | None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x, context, **kwargs)`` (a layer's forward or inverse), or ``fn(x, **kwargs)`` without a context: a
    layer written before contexts existed, ``forward(x)``, still runs in an unconditional chain."""
    return fn(x, **kwargs) if context is None else fn(x, context, **kwargs)


def group_indices(keys: Sequence[Hashable | None], x: object, inverse: bool) -> list[list[int]]:
    """The positions of ``keys`` grouped by equal key, in first-seen order, None keys left out: how a container's
    units that batch their weights (``batched_weights(units, x, inverse)``) split into the groups computed together.
    ``TypeError`` unless ``x``, the container's input (``inverse``: its output), is a tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{'y' if inverse else 'x'} must be a torch.Tensor, got {type(x).__name__}")
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        if key not in groups:  # no setdefault: torch < 2.5's Dynamo cannot trace it
            groups[key] = []
        groups[key].append(i)
    return list(groups.values())


def runs_as_written(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``kind`` that computes ``kind``'s own forward and inverse and has no hooks: then a
    container may compute its parameter-only work for it (a batched weight, a fused neighbour) instead of calling it
    as it would be called alone, and nothing changes."""
    hooks = (module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks, module._backward_hooks)
    own = type(module).forward is kind.forward and type(module).inverse is kind.inverse  # type: ignore[attr-defined]
    return isinstance(module, kind) and own and not any(hooks)


def zero_logdet(x: torch.Tensor) -> torch.Tensor:
    """A zero log-det of shape ``(B,)`` in :func:`~fastflow.ops._checks.logdet_dtype` of ``x``."""
    return x.new_zeros(x.shape[0], dtype=logdet_dtype(x.dtype))


class FlowLayer(nn.Module):
    """An invertible layer: ``forward(x, context=None) -> (y, logdet)`` and ``inverse(y, context=None) -> (x,
    logdet)``.

    ``x`` is ``(B, D)`` or ``(B, C, H, W)``; ``logdet`` has shape ``(B,)``, is float32 for half inputs, and the
    inverse's log-det is the negative of the forward's at the matching point. A container given a ``context``
    (``(B, ...)``) passes it to every layer as the second argument: the layers that condition on it
    (:attr:`uses_context`) read it, the others ignore it. (A layer written as ``forward(x)`` runs only in a chain
    called without a context.)
    """

    @property
    def uses_context(self) -> bool:
        """Whether the layer conditions on ``context`` (and so needs one)."""
        return False

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(
        self, y: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
