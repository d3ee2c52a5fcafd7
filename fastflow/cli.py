"""The ``fastflow`` command: ``train``, ``sample``, ``interpolate`` and ``manipulate``.

Bad input (an unreadable or too small image, a wrong channel count, a checkpoint of another architecture, a
missing file) prints one line naming the file to stderr and exits with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

from fastflow import distributed
from fastflow.checkpoint import load_checkpoint
from fastflow.data import (
    DIGITS_N_BINS,
    ImageSource,
    TensorImages,
    digits_of_class,
    load_digits,
    load_image_spec,
    load_photo_crops,
    quantize,
    split_heldout,
)
from fastflow.image_folder import load_image_folder
from fastflow.latent import attribute_direction, interpolate, manipulate
from fastflow.models import FlowModel, Glow
from fastflow.train import CHECKPOINT_NAME, TrainConfig, save_image_grid, train

__all__ = ["main"]

DEFAULT_N_BITS = 5


def _training_data(args: argparse.Namespace) -> tuple[ImageSource, torch.Tensor, int, str]:
    """``(train source, held-out levels, n_bins, description)`` from ``--data`` or the embedded data."""
    if args.n_bits is not None and not 1 <= args.n_bits <= 8:
        raise ValueError(f"--n-bits must be in [1, 8], got {args.n_bits}")
    n_bins = 2 ** (args.n_bits or DEFAULT_N_BITS)
    res = args.resolution
    if args.data is not None:
        levels = quantize(load_image_folder(args.data, res), n_bins)
        train_idx, test_idx = split_heldout(len(levels))
        return TensorImages(levels[train_idx]), levels[test_idx], n_bins, f"{args.data} at {res}x{res}"
    if res == 8:
        if args.n_bits is not None:
            raise ValueError("--n-bits does not apply to the embedded digits, which have 17 levels per pixel")
        train_levels, _, test_levels, _ = load_digits()
        return TensorImages(train_levels), test_levels, DIGITS_N_BINS, "the 8x8 digits"
    source, heldout = load_photo_crops(res, n_bins)
    return source, heldout.levels, n_bins, f"{res}x{res} crops of the bundled photos"


def _train(args: argparse.Namespace) -> None:
    if args.iterations < 0:
        raise ValueError(f"--iterations must be >= 0, got {args.iterations}")
    checkpoint = os.path.join(args.out, CHECKPOINT_NAME)
    if not args.resume and os.path.exists(checkpoint):
        raise ValueError(f"{checkpoint!r} exists: pass --resume to continue that run, or choose another --out")
    config = TrainConfig(
        steps=args.iterations, batch=args.batch, lr=args.lr, warmup=args.warmup, clip=args.clip, seed=args.seed,
        amp=args.amp, out=args.out, save_every=args.save_every, eval_every=args.eval_every,
        samples=args.samples, temperature=args.temperature,
    )  # fmt: skip
    source, heldout, n_bins, description = _training_data(args)
    context = distributed.setup(args.device)
    try:
        torch.manual_seed(args.seed)
        model = Glow(
            in_channels=source.image_shape[0], image_size=args.resolution, levels=args.levels, steps=args.steps,
            hidden=args.hidden, n_bins=n_bins, reversible=args.reversible,
        ).to(context.device)  # fmt: skip
        if args.reversible:
            model.set_tiling(tile_size=args.tile_size, memory_budget_mb=args.tile_memory_mb)
        if context.is_main:
            print(
                f"Glow L={args.levels} K={args.steps} hidden={args.hidden} on {description}, {n_bins} levels, "
                f"{len(heldout)} held-out images, {context.world_size} rank(s) on {context.device.type}"
            )
        history = train(model, source, config, heldout=heldout, resume=args.resume)
        if context.is_main and history:
            print(f"wrote {checkpoint} and {args.out}/samples-{args.iterations:06d}.png")
    finally:
        distributed.teardown()


def _load(args: argparse.Namespace) -> FlowModel:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_checkpoint(args.checkpoint, map_location=device)
    return model.eval()


def _write(images: torch.Tensor, path: str, nrow: int | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image_grid(images, path, nrow=nrow)
    print(f"wrote {path}")


def _sample(args: argparse.Namespace) -> None:
    model = _load(args)
    torch.manual_seed(args.seed)
    _write(model.sample(args.n, temperature=args.temperature), args.out)


def _interpolate(args: argparse.Namespace) -> None:
    model = _load(args)
    a, b = (load_image_spec(spec, model.image_shape, model.n_bins) for spec in (args.a, args.b))
    _write(interpolate(model, a, b, args.steps), args.out, nrow=args.steps)


def _manipulate(args: argparse.Namespace) -> None:
    model = _load(args)
    image = load_image_spec(args.image, model.image_shape, model.n_bins)
    if args.label_from is not None:
        if tuple(model.image_shape) != (1, 8, 8) or model.n_bins != DIGITS_N_BINS:
            raise ValueError(
                f"--label-from/--label-to need a model of the 8x8 digits, but {args.checkpoint!r} models "
                f"{'x'.join(map(str, model.image_shape))} images with {model.n_bins} levels"
            )
        with_attribute, without = digits_of_class(args.label_to), digits_of_class(args.label_from)
    else:
        channels, res = model.image_shape[0], model.image_shape[1]
        with_attribute = quantize(load_image_folder(args.attribute_dir, res, channels), model.n_bins)
        without = quantize(load_image_folder(args.without_dir, res, channels), model.n_bins)
    direction = attribute_direction(model, with_attribute, without)
    _write(manipulate(model, image, direction, args.strengths), args.out, nrow=len(args.strengths))


def _checkpoint_command(
    commands: argparse._SubParsersAction, name: str, help: str, run: Callable[[argparse.Namespace], None]
) -> argparse.ArgumentParser:
    """A sub-command whose first argument is a checkpoint."""
    sub = commands.add_parser(name, help=help)
    sub.add_argument("checkpoint", help="checkpoint.pt written by fastflow train")
    sub.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    sub.set_defaults(run=run)
    return sub


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    t = commands.add_parser("train", help="train a Glow; resumable, data-parallel under torchrun")
    t.add_argument("--data", help="folder of PNG/JPEG images (default: embedded digits at --resolution 8, "
                   "else crops of the photos bundled with scikit-learn)")  # fmt: skip
    t.add_argument("--resolution", type=int, default=8, help="image side in pixels (default 8: the digits)")
    t.add_argument("--n-bits", type=int, help=f"bits per colour channel for images (default {DEFAULT_N_BITS})")
    t.add_argument("--levels", type=int, default=2, help="Glow levels L (default 2)")
    t.add_argument("--steps", type=int, default=8, help="flow steps per level K (default 8)")
    t.add_argument("--hidden", type=int, default=64, help="coupling network width (default 64)")
    t.add_argument("--reversible", action="store_true", help="memory-saving reversible backprop")
    t.add_argument(
        "--tile-memory-mb", type=float, default=1024.0,
        help="with --reversible: memory budget of one coupling network's activations; the network runs in "
        "spatial tiles that fit it (default 1024, which leaves small images untiled)",
    )  # fmt: skip
    t.add_argument("--tile-size", type=int, help="with --reversible: fixed tile side instead of the budget")
    t.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (fp16 with loss scaling)")
    t.add_argument("--iterations", type=int, default=1500, help="training steps (default 1500)")
    t.add_argument("--batch", type=int, default=64, help="global batch, split over the ranks (default 64)")
    t.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate after warm-up (default 2e-3)")
    t.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps (default 100)")
    t.add_argument("--clip", type=float, default=50.0, help="gradient-norm clipping, 0 disables (default 50)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and of every batch (default 0)")
    t.add_argument("--out", default="runs/train", help="folder for checkpoint.pt and samples-STEP.png")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--save-every", type=int, default=500, help="checkpoint and sample grid interval (default 500)")
    t.add_argument("--eval-every", type=int, default=250, help="held-out bits/dim interval (default 250)")
    t.add_argument("--samples", type=int, default=64, help="images per sample grid (default 64)")
    t.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    t.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    t.set_defaults(run=_train)

    s = _checkpoint_command(commands, "sample", "write a grid of samples from a checkpoint", _sample)
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--out", default="samples.png", help="PNG to write (default samples.png)")

    i = _checkpoint_command(commands, "interpolate", "decode a line between the latents of two images", _interpolate)
    i.add_argument("a", help="first image: a PNG/JPEG file, digits:N or photos:N (N-th held-out image)")
    i.add_argument("b", help="second image, as A")
    i.add_argument("--steps", type=int, default=8, help="images in the strip, ends included (default 8)")
    i.add_argument("--out", default="interpolation.png", help="PNG to write (default interpolation.png)")

    m = _checkpoint_command(commands, "manipulate", "move an image along a latent attribute direction", _manipulate)
    m.add_argument("image", help="a PNG/JPEG file, digits:N or photos:N (N-th held-out image)")
    m.add_argument("--attribute-dir", help="folder of images with the attribute")
    m.add_argument("--without-dir", help="folder of images without it")
    m.add_argument("--label-from", type=int, help="digits model: direction from this class ...")
    m.add_argument("--label-to", type=int, help="... to this class")
    m.add_argument("--strengths", type=float, nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                   help="multiples of the direction to add (default -1 -0.5 0 0.5 1)")  # fmt: skip
    m.add_argument("--out", default="manipulation.png", help="PNG to write (default manipulation.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``fastflow`` command line; returns the exit status (2 for bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "manipulate":
        dirs = [v is not None for v in (args.attribute_dir, args.without_dir)]
        labels = [v is not None for v in (args.label_from, args.label_to)]
        if not ((all(dirs) and not any(labels)) or (all(labels) and not any(dirs))):
            parser.error("manipulate needs either --attribute-dir and --without-dir, or --label-from and --label-to")
    try:
        args.run(args)
    except (ValueError, OSError) as err:
        message = " ".join(str(err).split())
        print(f"fastflow {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
