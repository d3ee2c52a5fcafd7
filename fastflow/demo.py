"""``make demo``: train a small Glow on scikit-learn's 8x8 digits on the CPU, report held-out bits/dim,
write a checkpoint and a grid of samples at temperature 0.7."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from fastflow.checkpoint import save_checkpoint
from fastflow.cli import number_arg, seed_arg
from fastflow.data import DIGITS_N_BINS, load_digits
from fastflow.images import check_writable_folder, save_grid
from fastflow.models import Glow
from fastflow.train import TrainConfig, TrainingInterrupted, evaluate_bits_per_dim, train

__all__ = ["main"]


def main(argv: list[str] | None = None) -> float:
    """Run the demo; returns the held-out bits/dim. An unwritable ``--out`` exits with status 2 before training,
    Ctrl-C with status 130 (the demo keeps no state to resume from)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=number_arg(int, 1), default=1500)
    parser.add_argument("--batch", type=number_arg(int, 1), default=64)
    parser.add_argument("--out", default="runs/demo", help="folder for samples.png and checkpoint.pt")
    parser.add_argument("--seed", type=seed_arg, default=0)
    args = parser.parse_args(argv)
    try:
        check_writable_folder(args.out)  # before the training, which an unwritable --out would waste
    except ValueError as err:
        parser.error(str(err))

    torch.manual_seed(args.seed)
    train_levels, _, test_levels, _ = load_digits()
    model = Glow(in_channels=1, image_size=8, levels=2, steps=8, hidden=64, n_bins=DIGITS_N_BINS)
    print(f"Glow L=2 K=8 hidden=64 on 8x8 digits: {len(train_levels)} train / {len(test_levels)} held-out images")
    start = time.perf_counter()
    try:
        train(model, train_levels, TrainConfig(steps=args.steps, batch=args.batch, seed=args.seed))
    except TrainingInterrupted as stop:
        print(f"interrupted at step {stop.step}: nothing written (the demo saves after its last step)", file=sys.stderr)
        raise SystemExit(130) from None
    elapsed = time.perf_counter() - start
    bpd = evaluate_bits_per_dim(model, test_levels)
    print(f"trained {args.steps} steps of batch {args.batch} in {elapsed:.1f} s")
    print(f"held-out bits/dim: {bpd:.3f} ({DIGITS_N_BINS} levels per pixel, uniform dequantization)")

    model.eval()
    checkpoint, grid = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "samples.png")
    save_checkpoint(checkpoint, model, heldout_bits_per_dim=bpd)  # first: a grid that cannot be drawn costs the grid
    written = [checkpoint]
    try:
        save_grid(model.sample(64, temperature=0.7), grid, nrow=8, scale=4, n_bins=model.n_bins)
        written.append(f"{grid} (temperature 0.7)")
    except (FloatingPointError, ValueError) as err:  # non-finite samples
        warnings.warn(f"no sample grid: {err}", RuntimeWarning, stacklevel=1)
    print(f"wrote {' and '.join(written)}")
    return bpd


if __name__ == "__main__":
    main()
