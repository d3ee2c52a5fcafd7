"""``make demo``: train a small Glow on scikit-learn's 8x8 digits on the CPU, report held-out bits/dim,
write a checkpoint and a grid of samples at temperature 0.7.

The run is ``fastflow train`` with its defaults (Glow L=2 K=8 hidden 64, 1,500 steps of batch 64 on the
embedded digits), saving at the end only: its checkpoint resumes with ``fastflow train --out OUT --resume``
(a larger ``--iterations`` trains further), and Ctrl-C saves one at the current step and prints that command.
Failures are one line on stderr with ``fastflow train``'s exit statuses (2 bad input, 1 a failed run, 130
Ctrl-C; ``FASTFLOW_DEBUG=1`` for a traceback).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from fastflow.cli import EXIT_INTERRUPTED, TRAIN_DEFAULTS, number_arg, run_reporting_errors, seed_arg
from fastflow.data import DIGITS_N_BINS, load_digits
from fastflow.images import check_writable_folder
from fastflow.models import Glow
from fastflow.train import TrainConfig, TrainingInterrupted, evaluate_bits_per_dim, train

__all__ = ["main"]

PROG = "python -m fastflow.demo"


def main(argv: list[str] | None = None) -> float:
    """Run the demo; returns the held-out bits/dim. Exits (``SystemExit``) with status 2 on bad flags or an
    unwritable ``--out`` (before training), 1 when the run fails, 130 on Ctrl-C (after saving a checkpoint)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=number_arg(int, 1), default=TRAIN_DEFAULTS["iterations"],
                        help="training steps (default %(default)s)")  # fmt: skip
    parser.add_argument("--batch", type=number_arg(int, 1), default=TRAIN_DEFAULTS["batch"],
                        help="images per step (default %(default)s)")  # fmt: skip
    parser.add_argument("--out", default="runs/demo",
                        help="folder for checkpoint.pt and the sample grid (default %(default)s)")  # fmt: skip
    parser.add_argument("--seed", type=seed_arg, default=TRAIN_DEFAULTS["seed"],
                        help="seed of the initial weights and of the batches (default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        check_writable_folder(args.out, create=False)  # before the training, which an unwritable --out would waste
    except ValueError as err:
        parser.error(str(err))
    result: list[float] = []
    status = run_reporting_errors(lambda: _run(args, result), PROG)
    if status:
        raise SystemExit(status)
    return result[0]


def _run(args: argparse.Namespace, result: list[float]) -> int:
    """Train and report; appends the held-out bits/dim to ``result``; returns the exit status."""
    # the flags `fastflow train` would store for this run: --resume reads the model and the schedule from them
    flags = {**TRAIN_DEFAULTS, "iterations": args.steps, "batch": args.batch, "seed": args.seed,
             "save_every": 0, "eval_every": 0}  # fmt: skip
    torch.manual_seed(args.seed)
    train_levels, _, test_levels, _ = load_digits()
    model = Glow(
        in_channels=1, image_size=8, levels=flags["levels"], steps=flags["steps"], hidden=flags["hidden"],
        n_bins=DIGITS_N_BINS,
    )  # fmt: skip
    print(
        f"Glow L={flags['levels']} K={flags['steps']} hidden={flags['hidden']} on 8x8 digits: "
        f"{len(train_levels)} train / {len(test_levels)} held-out images"
    )
    config = TrainConfig(
        steps=args.steps, batch=args.batch, lr=flags["lr"], warmup=flags["warmup"], clip=flags["clip"],
        seed=args.seed, out=args.out, save_every=0, eval_every=0, samples=flags["samples"],
        temperature=flags["temperature"],
    )  # fmt: skip
    written: list[str] = []
    start = time.perf_counter()
    try:
        train(
            model, train_levels, config, heldout=test_levels,
            checkpoint_extra={"cli": flags, "data_digest": None}, written=written,
        )  # fmt: skip
    except TrainingInterrupted as stop:
        resume = f"fastflow train --out {shlex.quote(args.out)} --resume"
        print(f"interrupted at step {stop.step}; resume with: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    elapsed = time.perf_counter() - start
    bpd = evaluate_bits_per_dim(model, test_levels)  # what the checkpoint stores: the same fixed-seed evaluation
    print(f"trained {args.steps} steps of batch {args.batch} in {elapsed:.1f} s (with the final evaluation and save)")
    print(f"held-out bits/dim: {bpd:.3f} ({DIGITS_N_BINS} levels per pixel, uniform dequantization)")
    print(f"wrote {' and '.join(written)}")  # the grid is missing where it could not be drawn (a warning said why)
    result.append(bpd)
    return 0


if __name__ == "__main__":
    main()
