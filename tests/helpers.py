"""Shared test helpers: brute-force Jacobian log-determinants, parameter perturbation, the losses and gradients
that the reversible and compiled tests compare, and small conditioners."""

from __future__ import annotations

import math
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


def assert_vector_log_prob_is_the_change_of_variables(
    model: nn.Module, x: torch.Tensor, context: torch.Tensor | None
) -> None:
    """``log_prob(x)`` of a vector flow with a standard normal prior equals ``log N(z) + log|det dz/dx|``, the
    log-det from the brute-force float64 Jacobian of ``encode`` per sample."""
    rows = [None if context is None else context[i : i + 1] for i in range(x.shape[0])]
    expected_logdet = torch.cat(
        [brute_force_logdet(lambda v, r=r: model.encode(v, r)[-1], x[i : i + 1]) for i, r in enumerate(rows)]
    )
    z = model.encode(x, context)[-1]
    log_normal = -0.5 * (z.square() + math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(model.log_prob(x, context), log_normal + expected_logdet, atol=1e-9, rtol=1e-9)


def nll_and_grads(
    model: nn.Module, x: torch.Tensor, context: torch.Tensor | None, reversible: bool
) -> list[torch.Tensor]:
    """The mean NLL of a vector flow, the context's gradient (with a context) and every parameter gradient,
    with ``model.reversible`` set to ``reversible``."""
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    leaf = None if context is None else context.clone().requires_grad_(True)
    loss = -model.log_prob(x, leaf).mean()
    loss.backward()
    return [loss.detach(), *([] if leaf is None else [leaf.grad]), *(p.grad.clone() for p in model.parameters())]


def chain_loss_and_grads(
    chain: nn.Module, x: torch.Tensor, context: torch.Tensor, reversible: bool, backend: str = "eager"
) -> list[torch.Tensor]:
    """``mean(|y|^2 - logdet)`` of a flow chain at a context, with the gradients of ``x``, the context and every
    parameter, on ``backend`` with ``chain.reversible`` set to ``reversible``."""
    import fastflow

    chain.reversible = reversible
    chain.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    context = context.clone().requires_grad_(True)
    with fastflow.backend(backend):
        y, logdet = chain(x, context)
        loss = (y.square().flatten(1).sum(1) - logdet).mean()
        loss.backward()
    return [loss.detach(), x.grad, context.grad, *(p.grad for p in chain.parameters())]


def assert_conditional_objective_compiles_whole(
    model: nn.Module,
    x: torch.Tensor,
    context: torch.Tensor,
    loss_tolerance: dict[str, float] | None = None,
    grad_tolerance: dict[str, float] | None = None,
) -> None:
    """``-log_prob(x, context).mean()`` traces as one graph without breaks, and ``torch.compile(fullgraph=True)``
    (``aot_eager``) gives eager's loss and parameter gradients (``assert_close`` keyword tolerances, its defaults
    where None)."""

    def objective(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return -model.log_prob(x, c).mean()

    explanation = torch._dynamo.explain(objective)(x, context)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    want = objective(x, context)
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got = torch.compile(objective, backend="aot_eager", fullgraph=True)(x, context)
    got.backward()
    torch.testing.assert_close(got, want, **(loss_tolerance or {}))
    for p, want_grad in zip(model.parameters(), want_grads):
        torch.testing.assert_close(p.grad, want_grad, **(grad_tolerance or {}))


def tanh_mlp(in_features: int, out_features: int) -> nn.Module:
    """A custom vector conditioner (a ``subnet=`` factory): one tanh hidden layer of width 7."""
    return nn.Sequential(nn.Linear(in_features, 7), nn.Tanh(), nn.Linear(7, out_features))


class HaloConv(nn.Sequential):
    """A custom image conditioner of two 3x3 convolutions that declares its halo (2) and width."""

    halo = 2
    hidden = 6

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, out_channels, 3, padding=1))


def assert_drawn_as_levels(path: object, n_bins: int) -> bool:
    """Assert that every pixel of the image file at ``path`` is one of a model's ``n_bins`` levels as the image
    writers draw them, ``round(k * 255 / (n_bins - 1))`` (a level's bin centre is none of them); returns True."""
    import numpy as np
    from PIL import Image

    values = set(np.unique(np.asarray(Image.open(path))).tolist())
    drawn = {round(k * 255 / (n_bins - 1)) for k in range(n_bins)}
    assert values <= drawn, f"{path}: values {sorted(values - drawn)[:8]} are no level of {n_bins}"
    return True


def edit_pretrained_config(directory: object, saved_with: bool, **changes: object) -> None:
    """Change ``config.json``'s config in a ``save_pretrained`` folder; with ``saved_with`` the weights' stored
    config too (a crafted folder whose two files agree), else the weights keep none (a folder written before
    the weights stored it)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    folder = Path(str(directory))
    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(changes)
    (folder / "config.json").write_text(json.dumps(meta))
    metadata = {"format": "pt"}
    if saved_with:
        stored = {"model_class": meta["model_class"], "config": meta["config"]}
        metadata["fastflow_config"] = json.dumps(stored, sort_keys=True)
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors", metadata=metadata)
