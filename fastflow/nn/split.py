"""Split: factor out half of the channels as a latent with a (learned) conditional Gaussian prior."""

from __future__ import annotations

import torch
from torch import nn

from fastflow.nn.base import check_image
from fastflow.nn.coupling_network import ZeroConv2d
from fastflow.nn.distributions import gaussian_log_prob, gaussian_sample
from fastflow.ops._checks import check_bool, int_at_least

__all__ = ["Split"]


class Split(nn.Module):
    """``x -> (z_keep, z_out)``: ``z_keep`` is the first ``C // 2`` channels and continues through the flow.

    ``z_out`` leaves the flow with prior ``N(mean, exp(logs)^2)`` where ``(mean, logs) =
    ZeroConv2d(z_keep)`` (Glow) if ``learned_prior`` else the standard normal (RealNVP). Not a
    :class:`FlowLayer`: it returns the latent and its log-density rather than a log-det.
    """

    def __init__(self, num_channels: int, learned_prior: bool = True) -> None:
        super().__init__()
        int_at_least("num_channels", num_channels, 2)
        check_bool("learned_prior", learned_prior)
        self.num_channels = num_channels
        self.keep_channels = num_channels // 2
        self.out_channels = num_channels - self.keep_channels
        self.prior = ZeroConv2d(self.keep_channels, 2 * self.out_channels) if learned_prior else None

    def prior_params(self, z_keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logs)`` of the prior of ``z_out`` given ``z_keep``."""
        if self.prior is None:
            shape = (z_keep.shape[0], self.out_channels, *z_keep.shape[2:])
            zeros = z_keep.new_zeros(shape)
            return zeros, zeros
        mean, logs = self.prior(z_keep).chunk(2, dim=1)
        return mean, logs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_keep, z_out, log p(z_out | z_keep))`` with the log-density of shape ``(B,)``."""
        check_image("x", x, self.num_channels)
        z_keep, z_out = x[:, : self.keep_channels], x[:, self.keep_channels :]
        mean, logs = self.prior_params(z_keep)
        return z_keep, z_out, gaussian_log_prob(z_out, mean, logs)

    def inverse(
        self,
        z_keep: torch.Tensor,
        z_out: torch.Tensor | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Concatenate ``z_keep`` with ``z_out``, drawing ``z_out`` from the prior at ``temperature`` if None (from
        ``generator`` where given, see :func:`~fastflow.nn.distributions.draw`)."""
        check_image("z_keep", z_keep, self.keep_channels)
        if z_out is None:
            mean, logs = self.prior_params(z_keep)
            z_out = gaussian_sample(mean, logs, temperature, generator)
        else:
            check_image("z_out", z_out, self.out_channels)
            if (z_out.shape[0], *z_out.shape[2:]) != (z_keep.shape[0], *z_keep.shape[2:]):
                raise ValueError(
                    f"z_out must have z_keep's batch and spatial size, shape ({z_keep.shape[0]}, {self.out_channels}, "
                    f"{', '.join(map(str, z_keep.shape[2:]))}), got {tuple(z_out.shape)}"
                )
            if z_out.dtype != z_keep.dtype:
                raise TypeError(f"z_out is {z_out.dtype} but z_keep is {z_keep.dtype}: convert one")
        return torch.cat([z_keep, z_out], dim=1)
