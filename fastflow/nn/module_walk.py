"""Walks of a module tree for the reversible backward, which takes them once per layer on every step."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["submodules", "trainable_parameters"]


def submodules(module: nn.Module) -> list[nn.Module]:
    """``list(module.modules())``: ``module`` and its submodules in the same order (depth first, each module once,
    at its first place), read off the tree as registered in ``_modules``. ``modules()`` nests a generator per level
    and builds every module's dotted name on the way, about ten Python-level calls per module; this walk makes
    one. Modules are told apart by identity (``modules()`` uses a set: the same for modules that keep the default
    ``__eq__`` and ``__hash__``); a ``module`` whose class overrides ``modules`` or ``named_modules`` gets its own."""
    kind = type(module)
    if kind.modules is not nn.Module.modules or kind.named_modules is not nn.Module.named_modules:
        return list(module.modules())
    found: list[nn.Module] = []
    seen: set[int] = set()

    def visit(m: nn.Module) -> None:
        seen.add(id(m))
        found.append(m)
        for child in m._modules.values():
            if child is not None and id(child) not in seen:
                visit(child)

    visit(module)
    return found


def trainable_parameters(module: nn.Module) -> list[torch.Tensor]:
    """``[p for p in module.parameters() if p.requires_grad]``: the same tensors in the same order (each once), read
    off :func:`submodules` and their ``_parameters``; a ``module`` whose class overrides ``parameters`` or
    ``named_parameters`` gets its own."""
    kind = type(module)
    if kind.parameters is not nn.Module.parameters or kind.named_parameters is not nn.Module.named_parameters:
        return [p for p in module.parameters() if p.requires_grad]
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for m in submodules(module):
        for p in m._parameters.values():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params
