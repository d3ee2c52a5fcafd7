"""Multi-process data-parallel training with ``torch.distributed``, as launched by ``torchrun``.

``torchrun --nproc_per_node N -m fastflow.cli train ...`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`setup` reads them and joins the process group (NCCL on CUDA, one GPU per local rank; gloo on the CPU).
Every rank draws the same global batch and keeps its :func:`shard`, so a run on N ranks follows the same
optimisation as a single process with the same global batch.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastflow.ops._checks import int_at_least

__all__ = ["Context", "launched_as_main", "launched_world_size", "rank_and_world_size", "setup", "shard", "teardown"]


@dataclass(frozen=True)
class Context:
    """Where this process runs: its ``rank`` of ``world_size`` and its ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that prints, evaluates and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from err


def launched_as_main() -> bool:
    """Whether this process is rank 0 as its launcher set it (``RANK``, torchrun's), before any process group
    exists: what prints before :func:`setup` prints once. True without a launcher (or with an unreadable
    ``RANK``, which :func:`setup` then refuses)."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def launched_world_size() -> int:
    """``WORLD_SIZE`` as the launcher set it (torchrun's), 1 without one: the ranks :func:`setup` will join, known
    before it joins them (``ValueError`` for an unreadable value or one below 1)."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world_size}")
    return world_size


def setup(device: str | None = None) -> Context:
    """Join the process group described by ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` when ``WORLD_SIZE > 1``.

    ``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available). Under several ranks on CUDA each
    process takes GPU ``LOCAL_RANK`` and the NCCL backend; on the CPU the gloo backend.
    """
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"WORLD_SIZE must be >= 1 and RANK in [0, WORLD_SIZE) (LOCAL_RANK >= 0), got WORLD_SIZE={world_size}, "
            f"RANK={rank}, LOCAL_RANK={local_rank}"
        )
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    where = torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(where)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Context(rank, world_size, where)


def teardown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_initialized():
        # A DDP wrapper left in a reference cycle keeps the group alive until interpreter shutdown, when gloo's
        # worker threads abort the process as they release finished work: collect it so the group goes now.
        gc.collect()
        dist.destroy_process_group()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous ``1 / world_size`` of the batch ``x``. Its length must divide evenly: then
    the mean of the per-rank means (DDP's gradient average, ActNorm's all-reduced statistics) is the mean over
    the whole batch."""
    int_at_least("world_size", world_size, 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size = {world_size}), got {rank!r}")
    if len(x) % world_size:
        raise ValueError(f"the batch of {len(x)} does not split evenly over {world_size} ranks")
    size = len(x) // world_size
    return x[rank * size : (rank + 1) * size]
