"""``python -m fastflow.examples.toy``: train a TabularFlow on a 2-D toy density on the CPU, print the held-out
negative log-likelihood before and after training, and write a density heat-map and a sample scatter (PNG)."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from fastflow.examples.toy_data import TOY_DATASETS, toy_dataset
from fastflow.images import check_writable_folder
from fastflow.models import TabularFlow
from fastflow.models.base import eval_mode
from fastflow.ops._checks import int_at_least

__all__ = ["ToyResult", "heldout_nll", "main", "plot_density", "plot_samples", "train_flow"]

TRAIN_POINTS = 8192
HELDOUT_POINTS = 2048
MAX_SEED = 2**32 - 2
"""The largest --seed: the held-out points are drawn with seed + 1 (scikit-learn takes seeds < 2**32)."""


@dataclass
class ToyResult:
    """What a run of the example measured (NLL in nats per point) and wrote."""

    nll_untrained: float
    nll_trained: float
    train_seconds: float
    density_png: str
    samples_png: str


def heldout_nll(model: TabularFlow, x: torch.Tensor) -> float:
    """Mean negative log-likelihood ``-log p(x)`` in nats per point over ``x`` ``(N, D)``, in eval mode."""
    with eval_mode(model), torch.no_grad():
        nll = -model.log_prob(x).mean()
    return float(nll)


def train_flow(model: TabularFlow, data: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """``steps`` Adam steps on minibatches of ``data`` ``(N, D)`` drawn with replacement; returns each step's
    training NLL. The first batch initialises the model's ActNorm layers (data-dependent, in training mode)."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    history: list[torch.Tensor] = []
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=generator)]
        loss = -model.log_prob(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        history.append(loss.detach())  # read once at the end: no host sync in the loop
    return torch.stack(history).tolist() if history else []


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (matplotlib is optional: imported on first use)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the toy example's plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _extent(data: torch.Tensor, margin: float = 0.25) -> tuple[float, float, float, float]:
    """``(x_min, x_max, y_min, y_max)`` around ``data`` ``(N, 2)``, widened by ``margin`` of its span."""
    low, high = data.min(0).values, data.max(0).values
    pad = margin * torch.where(high > low, high - low, torch.ones_like(high))  # a constant coordinate: span 1
    low, high = low - pad, high + pad
    return float(low[0]), float(high[0]), float(low[1]), float(high[1])


def plot_density(model: TabularFlow, data: torch.Tensor, path: str, resolution: int = 200) -> str:
    """Heat-map of the model's density ``p(x)`` on a ``resolution``-square grid around ``data``; returns
    ``path``."""
    int_at_least("resolution", resolution, 2)
    plt = _pyplot()
    x0, x1, y0, y1 = _extent(data.float().cpu())
    parameter = model.floating_parameter()  # the grid in the model's dtype and on its device
    xs, ys = (
        torch.linspace(a, b, resolution, dtype=parameter.dtype, device=parameter.device)
        for a, b in ((x0, x1), (y0, y1))
    )
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    with eval_mode(model), torch.no_grad():
        density = torch.cat([model.log_prob(chunk).exp() for chunk in grid.split(8192)]).float().cpu()
    fig, ax = plt.subplots(figsize=(6, 6 * (y1 - y0) / (x1 - x0) + 0.5))
    ax.imshow(density.reshape(resolution, resolution).numpy(), extent=(x0, x1, y0, y1), origin="lower", cmap="viridis")
    ax.set_title("model density p(x)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_samples(model: TabularFlow, data: torch.Tensor, path: str, n: int = 2000) -> str:
    """Scatter of ``n`` model samples next to ``n`` points of ``data``, on the same axes limits; returns
    ``path``."""
    plt = _pyplot()
    with eval_mode(model), torch.no_grad():
        samples = model.sample(n).float().cpu()
    data = data.float().cpu()
    x0, x1, y0, y1 = _extent(data)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    for ax, points, title in ((axes[0], data[:n], "data"), (axes[1], samples, "model samples")):
        ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_title(title)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> ToyResult:
    """Run the example; returns the held-out NLL before and after training and the paths written."""
    parser = argparse.ArgumentParser(
        prog="python -m fastflow.examples.toy",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", choices=TOY_DATASETS, default="moons", help="the 2-D data set")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--batch", type=int, default=256, help="points per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam's learning rate")
    parser.add_argument("--transforms", type=int, default=6, help="coupling transforms of the flow")
    parser.add_argument("--hidden", type=int, default=64, help="hidden width of each coupling's MLP")
    parser.add_argument("--out", default="runs/toy", help="folder for density.png and samples.png")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (a 2-D flow's matrices are too small to share out)"
    )
    args = parser.parse_args(argv)
    for flag, low in (("steps", 1), ("batch", 1), ("transforms", 1), ("hidden", 1), ("threads", 1), ("seed", 0)):
        if getattr(args, flag) < low:
            parser.error(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    if args.seed > MAX_SEED:
        parser.error(f"--seed must be <= {MAX_SEED}, got {args.seed}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    try:
        check_writable_folder(args.out)
        _pyplot()  # before the training: the plots at its end need matplotlib
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> ToyResult:
    """Train, evaluate and plot as ``args`` say (the threads already set)."""
    torch.manual_seed(args.seed)
    train_data = toy_dataset(args.dataset, TRAIN_POINTS, seed=args.seed)
    heldout = toy_dataset(args.dataset, HELDOUT_POINTS, seed=args.seed + 1)
    model = TabularFlow(2, transforms=args.transforms, hidden=args.hidden)
    print(
        f"TabularFlow(2, transforms={args.transforms}, hidden={args.hidden}) on {args.dataset}: "
        f"{TRAIN_POINTS} training / {HELDOUT_POINTS} held-out points"
    )
    with torch.no_grad():
        model.train()
        model.log_prob(train_data[: args.batch])  # the untrained model, with its data-dependent ActNorm init
    nll_untrained = heldout_nll(model, heldout)

    start = time.perf_counter()
    diverged = f"training diverged: try a lower --lr than {args.lr}"
    try:
        train_flow(model, train_data, args.steps, args.batch, args.lr, args.seed)
        nll_trained = heldout_nll(model, heldout)
    except FloatingPointError as err:  # the model's log-density went non-finite during training
        raise SystemExit(f"error: {err}: {diverged}") from err
    seconds = time.perf_counter() - start
    print(f"trained {args.steps} steps of batch {args.batch} in {seconds:.1f} s")
    print(f"held-out NLL (nats per point): {nll_untrained:.3f} untrained -> {nll_trained:.3f} trained")
    if not nll_trained <= nll_untrained:  # NaN too
        print(f"warning: {diverged} (the held-out NLL rose)", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    try:
        density = plot_density(model, train_data, os.path.join(args.out, "density.png"))
        samples = plot_samples(model, train_data, os.path.join(args.out, "samples.png"))
    except FloatingPointError as err:  # the trained model's density or samples are not finite
        raise SystemExit(f"error: cannot plot the trained model ({err}): {diverged}") from err
    print(f"wrote {density} and {samples}")
    return ToyResult(nll_untrained, nll_trained, seconds, density, samples)


if __name__ == "__main__":
    main()
