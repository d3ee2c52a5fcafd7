"""``peers_glow``: the digits demo (``make demo``) against normflows' Glow at the same configuration, on the CPU.

Both train Glow with L=2 levels of K=8 steps, hidden width 64, on scikit-learn's 8x8 digits (17 levels,
uniform dequantization), batches of 64 drawn by :func:`fastflow.data.batch_at_step`, the fused
``torch.optim.Adam`` (``fused=True``) at 2e-3 with fastflow's linear warm-up and gradient-norm clipping at 50:

- ``fastflow``: :func:`fastflow.train.train` with the demo's model and :class:`~fastflow.train.TrainConfig`
  (progress off), i.e. what ``make demo`` runs (it reads the loss back every 25 steps, and its timing includes its
  per-call set-up: the level check over the data set, the step's construction, the channels-last layout);
- ``normflows``: ``normflows.MultiscaleFlow`` of ``GlowBlock`` (affine coupling with sigmoid scale, LU 1x1
  convolution, ActNorm; the same 3x3 / 1x1 / 3x3 coupling network) with ``Squeeze``/``Merge`` and learned
  diagonal Gaussian priors, built as normflows' Glow example builds it, trained by that loop written out in
  plain PyTorch (the loss read back every step: no cost on the CPU).

The demo is 1,500 steps; this times ``rounds`` chunks of ``chunk`` steps of each library in turn (a shared
machine's noise falls on both alike) and extrapolates: ``est_1500_steps_s`` is the median ms per step times
1,500. Each chunk is a fresh run of ``chunk`` steps on the weights so far (a new optimizer, the warm-up
restarted), for both libraries alike. ``last_bits_per_dim`` (mean training bits/dim of the last chunk's last 10
steps) shows both learn. Target (issue 13): fastflow no slower, ``speedup_vs_normflows`` >= 1.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import SKIPPED, Budget
from fastflow.data import DIGITS_N_BINS, TensorImages, batch_at_step, load_digits
from fastflow.models import Glow
from fastflow.train import TrainConfig, train

__all__ = ["DEMO", "normflows_glow", "peers_rows"]

DEMO = {"levels": 2, "steps": 8, "hidden": 64, "batch": 64, "demo_steps": 1500}
"""The digits demo's configuration (:mod:`fastflow.demo`)."""


def normflows_glow(levels: int, steps: int, hidden: int, image_shape: tuple[int, int, int]) -> nn.Module:
    """normflows' multi-scale Glow (its Glow example, unconditional priors) for images ``(C, H, W)``."""
    import normflows as nf

    channels, height, width = image_shape
    priors, flows, merges = [], [], []
    for i in range(levels):  # i = 0 is the coarsest level (normflows lists levels from the latent side)
        level_channels = channels * 2 ** (levels + 1 - i)
        flows.append(
            [nf.flows.GlowBlock(level_channels, hidden, split_mode="channel", scale=True) for _ in range(steps)]
        )
        flows[-1].append(nf.flows.Squeeze())
        scale = 2 ** (levels - i)
        if i > 0:
            merges.append(nf.flows.Merge())
            latent = (channels * scale, height // scale, width // scale)
        else:
            latent = (channels * 2 * scale, height // scale, width // scale)
        priors.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(priors, flows, merges, class_cond=False)


def _train_normflows(model: nn.Module, source: TensorImages, config: TrainConfig) -> list[float]:
    """fastflow's training loop for a normflows model; returns the training bits/dim of each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)  # fastflow's optimizer too
    dims = math.prod(source.image_shape)
    history = []
    for step in range(config.steps):
        x, _ = batch_at_step(source, step, config.batch, DIGITS_N_BINS, config.seed)
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        loss = model.forward_kld(x)  # mean negative log-density, nats
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        history.append(float(loss.detach()) / (dims * math.log(2)) + math.log2(DIGITS_N_BINS))
    return history


def peers_rows(quick: bool, budget: Budget | None = None) -> list[dict[str, Any]]:
    """Rows ``{library, ms_per_step, est_1500_steps_s, speedup_vs_normflows, ...}`` of both libraries."""
    budget = budget or Budget()
    chunk, rounds = (25, 2) if quick else (100, 5)
    levels = load_digits()[0]
    base = {
        "config": f"Glow L{DEMO['levels']} K{DEMO['steps']} h{DEMO['hidden']} 8x8 digits",
        "batch": DEMO["batch"],
    }
    try:
        torch.manual_seed(0)
        peer = normflows_glow(DEMO["levels"], DEMO["steps"], DEMO["hidden"], (1, 8, 8))
    except ImportError:
        peer = None
    torch.manual_seed(0)
    ours = Glow(1, 8, levels=DEMO["levels"], steps=DEMO["steps"], hidden=DEMO["hidden"], n_bins=DIGITS_N_BINS)
    source = TensorImages(levels)

    def run(library: str, steps: int) -> list[float]:
        config = TrainConfig(steps=steps, batch=DEMO["batch"], progress=False, quiet=True)
        if library == "fastflow":
            return train(ours, levels, config)
        return _train_normflows(peer, source, config)

    libraries = ["fastflow"] + (["normflows"] if peer is not None else [])
    for library in libraries:
        run(library, 2)  # warm-up: ActNorm initialisation, allocator and thread pools
    times: dict[str, list[float]] = {library: [] for library in libraries}
    last: dict[str, list[float]] = {}
    for _ in range(rounds):
        if budget.expired() and all(times.values()):
            break
        for library in libraries:
            start = time.perf_counter()
            last[library] = run(library, chunk)
            times[library].append((time.perf_counter() - start) * 1e3 / chunk)
    rows = []
    for library in ("fastflow", "normflows"):
        row: dict[str, Any] = {"library": library, **base}
        if library not in times:
            row["error"] = "normflows is not installed (pip install 'fastflow[bench]')"
        elif not times[library]:
            row.update(SKIPPED)
        else:
            ms = statistics.median(times[library])
            row.update(
                steps_timed=chunk * len(times[library]),
                ms_per_step=ms,
                est_1500_steps_s=ms * DEMO["demo_steps"] / 1e3,
                last_bits_per_dim=statistics.fmean(last[library][-10:]),
            )
        rows.append(row)
    if all("ms_per_step" in r for r in rows):
        for row in rows:
            row["speedup_vs_normflows"] = rows[1]["ms_per_step"] / row["ms_per_step"]
        rows[0]["target_met"] = rows[0]["speedup_vs_normflows"] >= 1.0
    return rows
