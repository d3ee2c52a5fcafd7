"""Priors over the top latent of a flow model: (conditional) diagonal Gaussian and standard logistic."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.nn.distributions import gaussian_log_prob, gaussian_sample
from fastflow.nn.reversible import guards_deferred

__all__ = ["GaussianPrior", "LogisticPrior", "TopPrior"]


class TopPrior(nn.Module):
    """A density over latents of shape ``(B, *shape)`` with ``log_prob(z, y)`` and ``sample(n, T, y)``."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.shape = shape

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_labels(self, y: torch.Tensor | None) -> None:
        """``ValueError`` unless ``y`` suits the prior: ``None``, as it has no class conditioning."""
        if y is not None:
            raise ValueError(f"y was given but the {type(self).__name__} has no class conditioning")

    def sample(
        self,
        n: int,
        temperature: float,
        y: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class GaussianPrior(TopPrior):
    """``N(mean, exp(logs)^2)`` per element: standard normal, or learned (Glow's ``learn_top``), optionally
    shifted per class by a zero-initialised linear map of the one-hot label (class conditioning)."""

    def __init__(self, shape: tuple[int, int, int], learned: bool = True, num_classes: int = 0) -> None:
        super().__init__(shape)
        c, h, w = shape
        self.num_classes = num_classes
        self.params = nn.Parameter(torch.zeros(1, 2 * c, h, w)) if learned else None
        self.class_proj = nn.Linear(num_classes, 2 * c) if num_classes > 0 else None
        if self.class_proj is not None:
            nn.init.zeros_(self.class_proj.weight)
            nn.init.zeros_(self.class_proj.bias)

    def mean_logs(
        self, n: int, y: torch.Tensor | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logs)`` of shape ``(n, C, H, W)``, for the class labels ``y`` (``(n,)``) with class conditioning
        (see :meth:`check_labels`)."""
        self._check_label_form(y, n)
        c, h, w = self.shape
        params = torch.zeros(n, 2 * c, h, w, device=device, dtype=dtype)
        if self.params is not None:
            params = params + self.params.to(dtype)
        if self.class_proj is not None and y is not None:
            if not guards_deferred(y):  # where guards defer, the labels' range was checked before (fastflow.train)
                self.check_labels(y)
            one_hot = F.one_hot(y.to(device).long(), self.num_classes).to(dtype)
            params = params + self.class_proj(one_hot).to(dtype)[:, :, None, None]
        mean, logs = params.chunk(2, dim=1)
        return mean, logs

    def _check_label_form(self, y: torch.Tensor | None, n: int | None) -> None:
        """``ValueError`` unless ``y`` is None without class conditioning, or integer labels of shape ``(n,)``
        (any length for ``n=None``) with it; reads nothing from the device."""
        if self.class_proj is None:
            if y is not None:
                raise ValueError("y was given but the model has no class conditioning (num_classes=0)")
            return
        if y is None:
            raise ValueError(f"y (class labels) is required: the model is conditioned on {self.num_classes} classes")
        if y.dim() != 1 or (n is not None and len(y) != n) or y.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"y must be integer labels of shape ({'N' if n is None else n},), got {y.dtype} {tuple(y.shape)}"
            )

    def check_labels(self, y: torch.Tensor | None) -> None:
        """``ValueError`` unless ``y`` suits the prior: integer class labels of shape ``(N,)`` in
        ``[0, num_classes)`` with class conditioning, ``None`` without. The range check reads two numbers from
        ``y``'s device; :meth:`mean_logs` skips it where guards defer (inside a training step), so
        ``fastflow.train`` checks its data set's labels once before training: an out-of-range label would make
        ``F.one_hot`` fail on the device (CUDA: a device-side assert)."""
        self._check_label_form(y, None)
        if y is not None and y.numel():
            low, high = (int(v) for v in y.aminmax())
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"y must be in [0, {self.num_classes}), got values in [{low}, {high}]")

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample log-density, shape ``(B,)``."""
        mean, logs = self.mean_logs(z.shape[0], y, z.device, z.dtype)
        return gaussian_log_prob(z, mean, logs)

    def sample(
        self,
        n: int,
        temperature: float,
        y: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``n`` draws at ``temperature`` (the standard deviation is scaled by it), in ``dtype`` on ``device``
        (default: the learned parameters' dtype, else float32, on the CPU)."""
        if dtype is None:
            dtype = self.params.dtype if self.params is not None else torch.float32
        mean, logs = self.mean_logs(n, y, device or torch.device("cpu"), dtype)
        return gaussian_sample(mean, logs, temperature)


class LogisticPrior(TopPrior):
    """Standard logistic density per element (NICE): ``log p(z) = -(softplus(z) + softplus(-z))``."""

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample log-density, shape ``(B,)``."""
        if y is not None:
            raise ValueError("y was given but the logistic prior has no class conditioning")
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        zf = z.to(dtype)
        return -(F.softplus(zf) + F.softplus(-zf)).reshape(z.shape[0], -1).sum(dim=1)

    def sample(
        self,
        n: int,
        temperature: float,
        y: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``n`` draws ``temperature * logit(u)`` with ``u ~ U(0, 1)``, in ``dtype`` (default float32)."""
        if y is not None:
            raise ValueError("y was given but the logistic prior has no class conditioning")
        dtype = dtype or torch.float32
        u = torch.rand(n, *self.shape, device=device, dtype=torch.promote_types(dtype, torch.float32))
        u = u.clamp(1e-6, 1 - 1e-6)
        return (temperature * (torch.log(u) - torch.log1p(-u))).to(dtype)
