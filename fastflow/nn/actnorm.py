"""ActNorm: per-channel affine with data-dependent initialisation (Glow)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastflow.nn.base import FlowLayer, check_image
from fastflow.ops.actnorm import actnorm_inverse_ref, actnorm_ref

__all__ = ["ActNorm"]


class ActNorm(FlowLayer):
    """``y = (x + bias) * exp(logs)`` per channel; log-det ``H * W * sum(logs)``.

    On the first forward in training mode, ``bias`` and ``logs`` are set so that the batch's output has zero
    mean and unit variance per channel (statistics all-reduced across ranks under ``torch.distributed``).
    The ``initialized`` flag is a buffer, so loading a checkpoint never re-initialises.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = num_channels
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
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
        """Set ``bias = -mean`` and ``logs = -log(std + eps)`` from the batch ``x`` (once)."""
        xf = x.detach().float()
        stats = torch.stack([xf.mean(dim=(0, 2, 3)), (xf * xf).mean(dim=(0, 2, 3))])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
            stats /= dist.get_world_size()
        mean, sq_mean = stats[0], stats[1]
        std = (sq_mean - mean * mean).clamp_min(0.0).sqrt()
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_(-torch.log(std + self.eps).view_as(self.logs))
        self.initialized.fill_(True)
        self._initialized = True

    def initialize_once(self, x: torch.Tensor) -> None:
        """:meth:`initialize` from ``x`` if in training mode and not yet initialised (the first batch)."""
        if self.training and not self.is_initialized:
            self.initialize(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, logdet)`` for ``x`` of shape ``(B, C, H, W)``."""
        check_image("x", x, self.num_channels)
        self.initialize_once(x)
        return actnorm_ref(x, self.bias, self.logs)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, -logdet)`` for ``y`` of shape ``(B, C, H, W)``."""
        check_image("y", y, self.num_channels)
        return actnorm_inverse_ref(y, self.bias, self.logs)
