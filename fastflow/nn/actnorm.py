"""ActNorm: per-channel (per-feature for vectors) affine with data-dependent initialisation (Glow)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastflow.nn.base import FlowLayer, as_pixels, check_features
from fastflow.ops._checks import int_at_least
from fastflow.ops.actnorm import actnorm_inverse_ref, actnorm_ref
from fastflow.warning_location import warn_at_caller

__all__ = ["ActNorm", "ActNormInitError", "actnorms_initialized"]


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged over the ranks of ``torch.distributed`` (unchanged without it)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class ActNormInitError(ValueError):
    """ActNorm's data-dependent initialisation refused its batch (empty, or statistics that are not finite)."""


class ActNorm(FlowLayer):
    """``y = (x + bias) * exp(logs)`` per channel of ``(B, C, H, W)`` or per feature of ``(B, D)``; log-det
    ``H * W * sum(logs)`` (``sum(logs)`` for vectors).

    On the first forward in training mode, ``bias`` and ``logs`` are set so that the batch's output has zero
    mean and unit variance per channel (statistics all-reduced across ranks under ``torch.distributed``), if
    they still hold their construction value 0 (values trained through the inverse, e.g. by an ``rsample``
    objective, or set by hand are kept). The ``initialized`` flag is a buffer, so loading a checkpoint never
    re-initialises. A channel that holds
    a single value in that batch (standard deviation <= ``eps``, e.g. batch 1 at a 1x1 level) keeps scale 1
    (``logs = 0``; its bias still centres it) and a ``RuntimeWarning`` names the layer: ``1 / eps`` would
    scale it by 1e6. ``name`` is what warnings call the layer (models set it to the module path).
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        int_at_least("num_channels", num_channels, 1)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
        self.num_channels = num_channels
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.name = "ActNorm"
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of the buffer: checking it needs no device sync and no graph break under compile.
        self._initialized = False

    @property
    def is_initialized(self) -> bool:
        """Whether the data-dependent initialisation has run (or was loaded from a state_dict)."""
        return self._initialized

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        key = prefix + "initialized"
        if key in state_dict:
            self._initialized = bool(state_dict[key])

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Set ``bias = -mean`` and ``logs = -log(std)`` from the batch ``x`` (once; ``logs = 0`` where
        ``std <= eps``).

        Two passes (the mean, then the mean squared deviation from it) in float64: a one-pass
        ``E[x^2] - E[x]^2`` cancels catastrophically when the mean is large against the spread, and float32
        squares overflow from ``|x| ~ 2e19``. A batch whose statistics are not finite (a NaN or an infinity in
        it) or do not fit the parameters' dtype, or an empty batch, is an :class:`ActNormInitError` (a
        ``ValueError``) and the layer stays uninitialised, so the next batch initialises it.
        """
        if x.numel() == 0:
            raise ActNormInitError(f"{self.name}: cannot initialise from an empty batch (shape {tuple(x.shape)})")
        xf = as_pixels(x).detach().to(torch.float64)
        mean = _mean_over_ranks(xf.mean(dim=(0, 2, 3)))
        var = _mean_over_ranks((xf - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)))
        std = var.sqrt()
        degenerate = std <= self.eps
        logs = torch.where(degenerate, torch.zeros_like(std), -torch.log(std.clamp_min(self.eps)))
        bias, logs = (-mean).to(self.bias.dtype), logs.to(self.logs.dtype)
        # once per layer, at initialisation: host syncs are fine here
        if not bool(torch.isfinite(bias).all() & torch.isfinite(logs).all()):
            raise ActNormInitError(
                f"{self.name}: cannot initialise from a batch of shape {tuple(x.shape)} whose per-channel mean or "
                f"standard deviation is not finite in {self.bias.dtype} (NaN or infinite values, or values too "
                "large); the layer stays uninitialised"
            )
        if bool(degenerate.any()):
            channels = degenerate.nonzero().flatten().tolist()
            warn_at_caller(
                f"{self.name}: channel(s) {channels} hold a single value in the initialisation batch of shape "
                f"{tuple(x.shape)}; their scale stays 1 (logs = 0) instead of 1/eps. Initialise with a larger "
                "or more varied first batch.",
                RuntimeWarning,
            )
        self.bias.copy_(bias.view_as(self.bias))
        self.logs.copy_(logs.view_as(self.logs))
        self.initialized.fill_(True)
        self._initialized = True

    def initialize_once(self, x: torch.Tensor) -> None:
        """:meth:`initialize` from ``x`` if in training mode and not yet initialised (the first batch), unless
        ``bias`` or ``logs`` has left its construction value 0: parameters trained through the inverse alone (an
        ``rsample`` objective), set by hand or loaded without the flag are kept, and the layer counts as
        initialised from then on."""
        if not self.training or self.is_initialized:
            return
        with torch.no_grad():  # once per layer, like the initialisation itself: a host read is fine here
            moved = bool((self.bias != 0).any() | (self.logs != 0).any())
        if moved:
            self.initialized.fill_(True)
            self._initialized = True
        else:
            self.initialize(x)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` for ``x`` of shape ``(B, C, H, W)`` or ``(B, D)``; ``context`` is ignored."""
        check_features("x", x, self.num_channels)
        self.initialize_once(x)
        y, logdet = actnorm_ref(as_pixels(x), self.bias, self.logs)
        return y.view_as(x), logdet

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, -logdet)`` for ``y`` of shape ``(B, C, H, W)`` or ``(B, D)``."""
        check_features("y", y, self.num_channels)
        x, logdet = actnorm_inverse_ref(as_pixels(y), self.bias, self.logs)
        return x.view_as(y), logdet


def actnorms_initialized(module: nn.Module) -> bool:
    """Whether every ActNorm in ``module`` has initialised (or loaded its flag): a training-mode forward then
    reads nothing from its batch on the host."""
    return all(m.is_initialized for m in module.modules() if isinstance(m, ActNorm))
