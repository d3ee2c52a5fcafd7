"""``make demo``: train a small Glow on scikit-learn's 8x8 digits on the CPU, report held-out bits/dim,
write a checkpoint and a grid of samples at temperature 0.7.

The run is ``fastflow train`` with its defaults (Glow L=2 K=8 hidden 64, 1,500 steps of batch 64 on the
embedded digits), saving at the end only, into --out (an earlier run's checkpoint there is replaced; its sample
grids stay). The checkpoint resumes with ``python -m fastflow train --out OUT --resume`` (a larger
``--iterations`` trains further); Ctrl-C saves one at the current step and prints the command that resumes it.
Failures are one line on stderr with ``fastflow train``'s exit statuses (2 bad input, 1 a failed run, 130
Ctrl-C; ``FASTFLOW_DEBUG=1`` for a traceback)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch

from fastflow.cli import (
    EXIT_INTERRUPTED,
    TRAIN_DEFAULTS,
    OneLineErrorParser,
    number_arg,
    run_reporting_errors,
    seed_arg,
    train_config,
    train_model,
)
from fastflow.data import DIGITS_N_BINS, load_digits
from fastflow.images import check_writable_folder
from fastflow.train import CHECKPOINT_NAME, TrainingInterrupted, evaluate_bits_per_dim, train

__all__ = ["main"]

PROG = "python -m fastflow.demo"


def main(argv: list[str] | None = None) -> float:
    """Run the demo; returns the held-out bits/dim. Exits (``SystemExit``) with status 2 on bad flags or an
    unwritable ``--out`` (before training), 1 when the run fails, 130 on Ctrl-C (after saving a checkpoint)."""
    parser = OneLineErrorParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--steps", type=number_arg(int, 1), default=TRAIN_DEFAULTS["iterations"],
                        help="training steps (fastflow train's --iterations; default %(default)s)")  # fmt: skip
    parser.add_argument("--batch", type=number_arg(int, 1), default=TRAIN_DEFAULTS["batch"],
                        help="images per step (default %(default)s)")  # fmt: skip
    parser.add_argument("--out", default="runs/demo",
                        help="folder for checkpoint.pt and the sample grid (default %(default)s); an earlier run's\n"
                        "checkpoint there is replaced")  # fmt: skip
    parser.add_argument("--seed", type=seed_arg, default=TRAIN_DEFAULTS["seed"],
                        help="seed of the initial weights and of the batches (default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        check_writable_folder(args.out, create=False)  # before the data and the model: a bad --out fails at once
    except ValueError as err:
        parser.error(str(err))
    bpd = float("nan")

    def run() -> int:
        nonlocal bpd
        status, bpd = _run(args)
        return status

    hint = "the demo's settings diverged: try fastflow train with a lower --lr or a longer --warmup"
    status = run_reporting_errors(run, PROG, diverged_hint=hint)
    if status:
        raise SystemExit(status)
    return bpd


def _run(args: argparse.Namespace) -> tuple[int, float]:
    """Train and report: ``(exit status, held-out bits/dim)`` (NaN where the run was interrupted)."""
    # the flags `fastflow train` stores for the same run (--resume reads the model and the schedule from them),
    # and the model and TrainConfig it builds from them
    flags = {**TRAIN_DEFAULTS, "resolution": 8, "iterations": args.steps, "batch": args.batch, "seed": args.seed,
             "save_every": 0, "eval_every": 0}  # fmt: skip
    train_args = argparse.Namespace(**flags, out=args.out, quiet=False)
    torch.manual_seed(args.seed)
    train_levels, _, test_levels, _ = load_digits()
    model, name = train_model(train_args, 1, DIGITS_N_BINS)
    print(f"{name} on 8x8 digits: {len(train_levels)} train / {len(test_levels)} held-out images")
    if os.path.exists(os.path.join(args.out, CHECKPOINT_NAME)):
        print(f"replacing the checkpoint of an earlier run in {args.out}")
    config = train_config(train_args)
    written: list[str] = []
    start = time.perf_counter()
    try:
        train(
            model, train_levels, config, heldout=test_levels,
            checkpoint_extra={"cli": flags, "data_digest": None}, written=written,
        )  # fmt: skip
    except TrainingInterrupted as stop:
        # the interpreter running the demo: `fastflow` is on the PATH only where its environment is active
        resume = f"{shlex.quote(sys.executable)} -m fastflow train --out {shlex.quote(args.out)} --resume"
        print(f"interrupted at step {stop.step}; resume with: {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED, float("nan")
    elapsed = time.perf_counter() - start
    bpd = evaluate_bits_per_dim(model, test_levels)  # the fixed-seed evaluation train() stored in the checkpoint
    print(f"trained {args.steps} steps of batch {args.batch} in {elapsed:.1f} s (with the final evaluation and save)")
    print(f"held-out bits/dim: {bpd:.3f} ({DIGITS_N_BINS} levels per pixel, uniform dequantization)")
    print(f"wrote {' and '.join(written)}")  # the grid is missing where it could not be drawn (a warning said why)
    return 0, bpd


if __name__ == "__main__":
    main()
