"""Diagonal Gaussian log-density and sampling used by the priors of split and top latents."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from fastflow.ops._checks import cast, logdet_dtype

__all__ = ["check_generator", "draw", "gaussian_log_prob", "gaussian_sample", "standard_gaussian_log_prob"]

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(z: torch.Tensor, mean: torch.Tensor, logs: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum log N(z; mean, exp(logs)^2)`` in float32 (float64 for float64 ``z``), shape ``(B,)``."""
    dtype = logdet_dtype(z.dtype)
    z, mean, logs = cast(z, dtype), cast(mean, dtype), cast(logs, dtype)
    log_p = -0.5 * (_LOG_2PI + 2.0 * logs + (z - mean) ** 2 * torch.exp(-2.0 * logs))
    return log_p.reshape(z.shape[0], math.prod(z.shape[1:])).sum(dim=1)


def standard_gaussian_log_prob(z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum log N(z; 0, 1) = -(sum z^2 + D log(2 pi)) / 2`` over the ``D`` elements of a sample, in
    float32 (float64 for float64 ``z``), shape ``(B,)``: :func:`gaussian_log_prob` at ``mean = logs = 0`` without
    materialising them."""
    z = cast(z, logdet_dtype(z.dtype)).reshape(z.shape[0], math.prod(z.shape[1:]))
    return (z * z).sum(dim=1).mul(-0.5).sub(0.5 * z.shape[1] * _LOG_2PI)


def check_generator(generator: object) -> None:
    """``TypeError`` naming ``generator`` unless it is None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def draw(
    sampler: Callable[..., torch.Tensor],
    shape: Sequence[int],
    device: torch.device | str | None,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sampler(shape)`` (``torch.randn``, ``torch.rand``) in ``dtype`` on ``device``, from ``generator`` where
    given: drawn on the generator's device, then moved (so one CPU generator gives the same draws for a model on
    any device), else from the global RNG of ``device``. ``TypeError`` naming ``generator`` unless it is a
    ``torch.Generator``."""
    if generator is None:
        return sampler(tuple(shape), device=device, dtype=dtype)
    check_generator(generator)
    return sampler(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def gaussian_sample(
    mean: torch.Tensor, logs: torch.Tensor, temperature: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``mean + temperature * exp(logs) * eps`` with ``eps ~ N(0, I)`` (from ``generator`` where given, see
    :func:`draw`)."""
    eps = draw(torch.randn, mean.shape, mean.device, mean.dtype, generator)
    return mean + temperature * torch.exp(logs) * eps
