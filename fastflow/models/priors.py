"""Priors over the top latent of a flow model: (conditional) diagonal Gaussian and standard logistic."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.nn.distributions import draw, gaussian_log_prob, gaussian_sample, standard_gaussian_log_prob
from fastflow.nn.reversible import guards_deferred
from fastflow.ops._checks import cast, int_at_least, logdet_dtype

__all__ = ["GaussianPrior", "LogisticPrior", "TopPrior", "check_labels_as"]

LABELS = "context (class labels)"  # what the priors' label errors call the labels


class TopPrior(nn.Module):
    """A density over latents of shape ``(B, *shape)`` with ``log_prob(z, y)`` and ``sample(n, T, y)`` (drawing
    from ``generator=`` where given: :func:`~fastflow.nn.distributions.draw`); ``y`` are class labels ``(B,)`` for
    a prior with class conditioning (:attr:`conditional`), else None."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    @property
    def conditional(self) -> bool:
        """Whether the prior is conditioned on class labels."""
        return False

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _check_latent(self, z: torch.Tensor) -> None:
        """``ValueError`` unless ``z`` is a batch ``(B, *shape)`` (a density of another shape would broadcast)."""
        if tuple(z.shape[1:]) != self.shape or z.dim() == 0:
            raise ValueError(f"z must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(z.shape)}")

    def check_labels(self, y: torch.Tensor | None) -> None:
        """``ValueError`` unless ``y`` suits the prior: ``None``, as it has no class conditioning."""
        if y is not None:
            raise ValueError(f"{LABELS} was given but the {type(self).__name__} has no class conditioning")

    def sample(
        self,
        n: int,
        temperature: float,
        y: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class GaussianPrior(TopPrior):
    """``N(mean, exp(logs)^2)`` per element of ``shape`` (``(C, H, W)`` or ``(D,)``): standard normal, or learned
    (Glow's ``learn_top``), optionally shifted per class by a zero-initialised linear map of the one-hot label
    (class conditioning)."""

    def __init__(self, shape: tuple[int, ...], learned: bool = True, num_classes: int = 0) -> None:
        super().__init__(shape)
        int_at_least("num_classes", num_classes, 0)
        c, rest = shape[0], tuple(shape[1:])
        self.num_classes = num_classes
        self.params = nn.Parameter(torch.zeros(1, 2 * c, *rest)) if learned else None
        self.class_proj = nn.Linear(num_classes, 2 * c) if num_classes > 0 else None
        if self.class_proj is not None:
            nn.init.zeros_(self.class_proj.weight)
            nn.init.zeros_(self.class_proj.bias)

    @property
    def conditional(self) -> bool:
        """Whether the prior is conditioned on class labels (``num_classes > 0``)."""
        return self.class_proj is not None

    def mean_logs(
        self, n: int, y: torch.Tensor | None, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logs)`` of shape ``(n, *shape)``, for the class labels ``y`` (``(n,)``) with class conditioning
        (see :meth:`check_labels`)."""
        self._check_label_form(y, n)
        c, rest = self.shape[0], self.shape[1:]
        params = torch.zeros(n, 2 * c, *rest, device=device, dtype=dtype)
        if self.params is not None:
            params = params + cast(self.params, dtype)
        if self.class_proj is not None and y is not None:
            deferred = guards_deferred(y)
            if not deferred:
                self.check_labels(y)
            # one-hot by comparison: F.one_hot checks the labels' range on the host (a sync every step)
            hits = y.to(device).long()[:, None] == torch.arange(self.num_classes, device=device)
            shift = self.class_proj(hits.to(self.class_proj.weight.dtype)).to(dtype)  # the prior's dtype, then dtype
            if deferred:  # an out-of-range label reads no class: NaN for its sample, which the finite check records
                shift = torch.where(hits.any(1, keepdim=True), shift, torch.nan)
            params = params + shift.reshape(n, 2 * c, *[1] * len(rest))
        mean, logs = params.chunk(2, dim=1)
        return mean, logs

    def _check_label_form(self, y: torch.Tensor | None, n: int | None) -> None:
        """``ValueError`` unless ``y`` is None without class conditioning, or integer labels of shape ``(n,)``
        (any length for ``n=None``) with it; reads nothing from the device."""
        if self.class_proj is None:
            if y is not None:
                raise ValueError(f"{LABELS} was given but the model has no class conditioning (num_classes=0)")
            return
        if y is None:
            raise ValueError(f"{LABELS} is required: the model is conditioned on {self.num_classes} classes")
        if y.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{LABELS} must be int32 or int64 labels, got {y.dtype}")
        if y.dim() != 1 or (n is not None and len(y) != n):
            raise ValueError(
                f"{LABELS} must be integer labels of shape ({'N' if n is None else n},), got {tuple(y.shape)}"
            )

    def check_labels(self, y: torch.Tensor | None) -> None:
        """``ValueError`` unless ``y`` suits the prior: integer class labels of shape ``(N,)`` in
        ``[0, num_classes)`` with class conditioning, ``None`` without. The range check reads two numbers from
        ``y``'s device; where guards defer (inside a training step) :meth:`mean_logs` makes the prior NaN for an
        out-of-range label instead, without a host read, so the model's deferred finite check records it
        (``check_guards`` with the batch then names the labels); ``fastflow.train`` also checks its data set's
        labels once before training."""
        self._check_label_form(y, None)
        if y is not None and y.numel():
            low, high = (int(v) for v in y.aminmax())
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"{LABELS} must be in [0, {self.num_classes}), got values in [{low}, {high}]")

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample log-density, shape ``(B,)``."""
        self._check_latent(z)
        if self.params is None and self.class_proj is None:  # the standard normal: no mean and scale to build
            self._check_label_form(y, z.shape[0])
            return standard_gaussian_log_prob(z)
        mean, logs = self.mean_logs(z.shape[0], y, z.device, z.dtype)
        return gaussian_log_prob(z, mean, logs)

    def sample(
        self,
        n: int,
        temperature: float,
        y: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` draws at ``temperature`` (the standard deviation is scaled by it), in ``dtype`` on ``device``
        (default: the learned parameters' dtype, else float32, on the CPU), from ``generator`` where given (see
        :func:`~fastflow.nn.distributions.draw`)."""
        if dtype is None:
            dtype = self.params.dtype if self.params is not None else torch.float32
        mean, logs = self.mean_logs(n, y, device or torch.device("cpu"), dtype)
        return gaussian_sample(mean, logs, temperature, generator)


class LogisticPrior(TopPrior):
    """Standard logistic density per element (NICE): ``log p(z) = -(softplus(z) + softplus(-z))``."""

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample log-density, shape ``(B,)``."""
        self._check_latent(z)
        self.check_labels(y)
        dtype = logdet_dtype(z.dtype)
        zf = cast(z, dtype)
        return -(F.softplus(zf) + F.softplus(-zf)).reshape(z.shape[0], math.prod(z.shape[1:])).sum(dim=1)

    def sample(
        self,
        n: int,
        temperature: float,
        y: torch.Tensor | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` draws ``temperature * logit(u)`` with ``u ~ U(0, 1)``, in ``dtype`` (default float32), from
        ``generator`` where given (see :func:`~fastflow.nn.distributions.draw`)."""
        self.check_labels(y)
        dtype = dtype or torch.float32
        u = draw(torch.rand, (n, *self.shape), device, torch.promote_types(dtype, torch.float32), generator)
        half_ulp = torch.finfo(u.dtype).eps / 2  # the finest step of torch.rand: tails cut only where u must be
        u = u.clamp(half_ulp, 1 - half_ulp)
        return cast(temperature * (torch.log(u) - torch.log1p(-u)), dtype)


def check_labels_as(prior: TopPrior, y: torch.Tensor | None, name: str) -> None:
    """``prior.check_labels(y)``, its errors naming ``name`` (the argument the labels came from) where the prior's
    say :data:`LABELS` (a prior of your own keeps its own messages)."""
    try:
        prior.check_labels(y)
    except (TypeError, ValueError) as err:
        if LABELS not in str(err):
            raise
        raise type(err)(str(err).replace(LABELS, name)) from None
