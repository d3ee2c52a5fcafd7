"""Shared test helpers: brute-force Jacobian log-determinants and parameter perturbation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def brute_force_logdet(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``log|det J|`` of ``fn`` (applied to one sample at a time) from the full float64 Jacobian."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]

        def flat(v: torch.Tensor, shape: torch.Size = xi.shape) -> torch.Tensor:
            return fn(v.reshape(shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, xi.reshape(-1))
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@torch.no_grad()
def perturb_parameters(module: nn.Module, scale: float = 0.1) -> None:
    """Move every parameter away from its (often identity) initialisation so tests exercise real maps."""
    for p in module.parameters():
        p.add_(scale * torch.randn_like(p))


def loss_and_grads(
    model: nn.Module, x: torch.Tensor, backend: str = "eager", reversible: bool | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training step's bits/dim loss and every parameter gradient, on ``backend`` and, unless None,
    with ``model.reversible`` set to ``reversible``."""
    import fastflow

    if reversible is not None:
        model.reversible = reversible
    model.zero_grad(set_to_none=True)
    with fastflow.backend(backend):
        loss = model.bits_per_dim(x).mean()
        loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def tanh_mlp(in_features: int, out_features: int) -> nn.Module:
    """A custom vector conditioner (a ``subnet=`` factory): one tanh hidden layer of width 7."""
    return nn.Sequential(nn.Linear(in_features, 7), nn.Tanh(), nn.Linear(7, out_features))


class HaloConv(nn.Sequential):
    """A custom image conditioner of two 3x3 convolutions that declares its halo (2) and width."""

    halo = 2
    hidden = 6

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, out_channels, 3, padding=1))
