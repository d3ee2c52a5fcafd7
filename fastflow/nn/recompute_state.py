"""What a reversible backward's recompute of a conditioner must leave as the forward left it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fastflow.nn.module_walk import submodules

__all__ = ["running_statistics_kept"]


@contextmanager
def running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Run the block (a recompute of ``module`` in a reversible backward) with the running statistics of
    ``module``'s batch norms in training mode put back after it: the forward updated them once, and the
    recompute, on the same batch, would update them again. (Their batch statistics, so the outputs and gradients,
    are the forward's.) Nothing is copied for a module without such a batch norm."""
    kept = [
        (buffer, buffer.clone())
        for m in submodules(module)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)
