"""NICE (Dinh et al., 2015): additive couplings on the flattened image, a diagonal scaling, logistic prior."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastflow.models.base import FlowModel
from fastflow.models.glow import image_hw
from fastflow.models.priors import LogisticPrior
from fastflow.nn.base import FlowLayer, check_features, check_network_dtype
from fastflow.nn.coupling_network import mlp_network
from fastflow.nn.sequential import FlowSequential
from fastflow.ops._checks import int_at_least, logdet_dtype
from fastflow.ops.coupling import additive_coupling, additive_coupling_inverse

__all__ = ["NICE", "NICECoupling", "DiagonalScaling"]


class NICECoupling(FlowLayer):
    """Additive coupling on the flattened image: ``x_b += mlp(x_a)`` where ``a`` and ``b`` are the even and
    odd elements (swapped for ``parity=1``). Log-det 0."""

    def __init__(self, num_features: int, hidden: int, depth: int, parity: int) -> None:
        super().__init__()
        if num_features % 2:
            raise ValueError(f"NICE needs an even number of dimensions C*H*W, got {num_features}")
        self.num_features = num_features
        if parity not in (0, 1) or isinstance(parity, bool):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        self.parity = parity
        self.mlp = mlp_network(num_features // 2, hidden, num_features // 2, depth)

    def _couple(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        name = "y" if inverse else "x"
        x = check_features(name, x)  # a floating tensor, (B, D) or (B, C, H, W)
        if math.prod(x.shape[1:]) != self.num_features:
            raise ValueError(f"{name} must hold {self.num_features} values per sample, got shape {tuple(x.shape)}")
        check_network_dtype(name, x, self.mlp)
        # (B, 2, D/2) view of the even/odd pairs: the op transforms channel 1 - parity and copies the other
        # through in one pass, writing the output in x's own element order (so the reshape back is a view)
        halves = x.reshape(x.shape[0], self.num_features // 2, 2).transpose(1, 2)
        op = additive_coupling_inverse if inverse else additive_coupling
        shift = self.mlp(halves[:, self.parity]).to(x.dtype)  # under autocast the MLP answers in its dtype
        out, logdet = op(halves, shift[:, None], b_start=1 - self.parity)
        return out.transpose(1, 2).reshape(x.shape), logdet

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, 0)``; ``context`` is ignored."""
        return self._couple(x, inverse=False)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, 0)``."""
        return self._couple(y, inverse=True)


class DiagonalScaling(FlowLayer):
    """``y = x * exp(s)`` per dimension; log-det ``sum(s)``."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(1, *shape))

    def _logdet(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``sum(s)`` per sample, after checking that ``x`` is a ``(B, *shape)`` floating tensor (the scaling would
        broadcast any other shape, and its log-det would not be the map's)."""
        x = check_features(name, x)  # a floating tensor, (B, D) or (B, C, H, W)
        if x.shape[1:] != self.log_scale.shape[1:]:
            shape = ", ".join(map(str, self.log_scale.shape[1:]))
            raise ValueError(f"{name} must have shape (B, {shape}), got {tuple(x.shape)}")
        return self.log_scale.to(logdet_dtype(x.dtype)).sum().expand(x.shape[0])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x * exp(s), sum(s))``; ``context`` is ignored."""
        logdet = self._logdet("x", x)
        return x * torch.exp(self.log_scale).to(x.dtype), logdet

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y * exp(-s), -sum(s))``."""
        logdet = self._logdet("y", y)
        return y * torch.exp(-self.log_scale).to(y.dtype), -logdet


class NICE(FlowModel):
    """NICE: ``couplings`` additive couplings with ``depth``-layer ReLU MLPs of width ``hidden`` alternating
    even/odd halves of the flattened image, then a diagonal scaling; standard logistic prior."""

    def __init__(
        self, in_channels: int = 1, image_size: int | tuple[int, int] = 28, couplings: int = 4, hidden: int = 1000,
        depth: int = 5, n_bins: int = 256, reversible: bool = False,
    ) -> None:  # fmt: skip
        h, w = image_hw(image_size)
        int_at_least("in_channels", in_channels, 1)
        int_at_least("couplings", couplings, 1)
        int_at_least("n_bins", n_bins, 2)
        int_at_least("hidden", hidden, 1)
        int_at_least("depth", depth, 0)
        d = in_channels * h * w
        if d % 2:
            raise ValueError(
                f"NICE couples halves of the flattened image: in_channels * height * width must be even, got "
                f"{in_channels} * {h} * {w} = {d}"
            )
        config = dict(
            in_channels=in_channels,
            image_size=(h, w),
            couplings=couplings,
            hidden=hidden,
            depth=depth,
            n_bins=n_bins,
            reversible=reversible,
        )
        layers: list[FlowLayer] = [NICECoupling(d, hidden, depth, parity=i % 2) for i in range(couplings)]
        layers.append(DiagonalScaling((in_channels, h, w)))
        prior = LogisticPrior((in_channels, h, w))
        super().__init__([FlowSequential(*layers)], [], prior, (in_channels, h, w), n_bins, config)
