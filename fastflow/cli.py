"""The fastflow command: train, sample, interpolate, manipulate and export.

Every failure is one line on stderr, never a traceback (set FASTFLOW_DEBUG=1 to get one), with a non-zero
exit status: 2 for bad input (a flag out of range, an unreadable or too small image, a wrong channel count, a
checkpoint of another architecture or of a model the command cannot serve, a missing file, an unwritable
--out), found before anything is written;
1 when a run fails (training diverged, images that came out NaN/Inf, a full disk); 130 when Ctrl-C interrupts
(train first saves a checkpoint at the current step and prints the command that resumes it).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shlex
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from fastflow import distributed
from fastflow.checkpoint import load_checkpoint
from fastflow.data import (
    DIGITS_N_BINS,
    HELDOUT_FRACTION,
    ImageSource,
    TensorImages,
    digits_of_class,
    load_digits,
    load_image_spec,
    load_photo_crops,
    quantize,
    split_heldout,
)
from fastflow.image_folder import (
    image_size,
    list_classes,
    list_images,
    list_labelled_images,
    load_image_folder,
    load_images,
)
from fastflow.images import IMAGE_FORMATS, check_writable_folder
from fastflow.latent import attribute_direction, interpolate, manipulate
from fastflow.models import FlowModel, Glow, Jet
from fastflow.models.glow import check_halvings
from fastflow.train import (
    CHECKPOINT_NAME,
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    save_image_grid,
    train,
)

__all__ = ["main"]

DEFAULT_N_BITS = 5
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 1, 2, 130
OUTPUT_SUFFIXES = tuple(IMAGE_FORMATS)  # the image format of --out follows its extension
# Defaults of the train flags. Their argparse default is None, so that a flag the user gave can be told apart
# from a default: --resume takes every flag not given from the checkpoint, and a given one that contradicts
# the checkpoint is an error unless it is in RESUME_OVERRIDES (--device and --quiet are never stored).
TRAIN_DEFAULTS: dict[str, Any] = {
    "data": None, "resolution": None, "n_bits": None, "model": "glow", "levels": 2, "steps": 8, "hidden": 64,
    "patch_size": 2, "couplings": 8, "width": 64, "depth": 2, "heads": 4, "reversible": False,
    "tile_memory_mb": 1024.0, "tile_size": None, "amp": None, "iterations": 1500, "batch": 64, "lr": 2e-3,
    "warmup": 100, "clip": 50.0, "seed": 0, "save_every": 500, "eval_every": 250, "samples": 64, "temperature": 0.7,
    "compile": False, "cuda_graph": False, "channels_last": None,
}  # fmt: skip
FLAG_TYPES: dict[str, type | tuple[type, ...]] = {
    **{name: type(value) for name, value in TRAIN_DEFAULTS.items() if value is not None},
    "data": str, "resolution": int, "n_bits": int, "tile_size": int, "amp": str, "channels_last": bool,
    "tile_memory_mb": (int, float), "lr": (int, float), "clip": (int, float), "temperature": (int, float),
}  # fmt: skip
FLAG_TYPE_NAMES = {str: "string", int: "integer", bool: "bool", (int, float): "number"}
# Settings that change how a step runs but not what it computes may change on --resume.
# The flags of one model only: giving one for the other model is an error.
MODEL_FLAGS = {"glow": ("levels", "steps", "hidden"), "jet": ("patch_size", "couplings", "width", "depth", "heads")}
RESUME_OVERRIDES = (
    "iterations", "save_every", "eval_every", "samples", "temperature", "tile_size", "tile_memory_mb", "compile",
    "cuda_graph", "channels_last",
)  # fmt: skip


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with status 2, like every other failure."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` and exit with status 2."""
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number_arg(cast: type, low: float, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: a finite ``cast`` (int or float) ``>= low`` (``> low`` when ``strict``)."""
    kind = "an integer" if cast is int else "a finite number"
    bound = "" if low == -math.inf else f" {'>' if strict else '>='} {low:g}"

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}{bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {kind}{bound}, got {text!r}")
        return value

    return parse


def seed_arg(text: str) -> int:
    """An argparse type: a seed, an integer in ``[0, 2**64)`` (a ``torch.Generator`` seed's range)."""
    value = number_arg(int, 0)(text)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 and < 2**64, got {text!r}")
    return value


def _image_out(text: str) -> str:
    """An argparse type: an output image path whose extension names the format."""
    if os.path.splitext(text)[1].lower() not in OUTPUT_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the extension sets the format and must be one of {OUTPUT_SUFFIXES}"
        )
    return text


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _infer_resolution(folder: str) -> int:
    """The shorter side shared by every image of ``folder``; ``ValueError`` asking for --resolution otherwise."""
    sides = {min(image_size(path)) for path in list_images(folder)}
    if len(sides) > 1:
        raise ValueError(
            f"--data {folder!r} holds images of several sizes (shorter sides {min(sides)} to {max(sides)} pixels): "
            "pass --resolution, the side every image is resized and center-cropped to"
        )
    return sides.pop()


def _stored_flags(extra: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The train flags a checkpoint was written with (those of an older checkpoint: from its TrainConfig), each
    of its flag's type (``ValueError`` naming the checkpoint and the flag otherwise: an edited or corrupt file)."""
    if isinstance(extra.get("cli"), dict):
        stored = {k: v for k, v in extra["cli"].items() if k in TRAIN_DEFAULTS}
    else:
        config = extra.get("train_config") or {}
        renamed = {("iterations" if k == "steps" else k): v for k, v in config.items()}
        stored = {k: v for k, v in renamed.items() if k in TRAIN_DEFAULTS}
    for name, value in stored.items():
        kind = FLAG_TYPES[name]
        fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not (fits or (value is None and TRAIN_DEFAULTS[name] is None)):
            raise ValueError(
                f"{checkpoint!r} stores {_flag(name)} = {value!r}, which is no {FLAG_TYPE_NAMES[kind]}: the file was "
                "edited or is corrupt"
            )
    return stored


def _same_flag(name: str, given: object, stored: object) -> bool:
    """Whether a flag given with --resume says what the run used: a stored --n-bits of None is the default (the
    embedded digits, where it is None too, refuse any --n-bits later)."""
    if name == "n_bits" and stored is None:
        return given == DEFAULT_N_BITS
    return given == stored


def _resolve_train_flags(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """Fill in the train flags not given, from the checkpoint with --resume (after refusing given flags that
    contradict it, see RESUME_OVERRIDES) and from TRAIN_DEFAULTS otherwise; returns the step to start from and
    the resumed checkpoint's extra entries (empty for a new run)."""
    given = {name for name in TRAIN_DEFAULTS if getattr(args, name) is not None}
    if args.data is not None:
        args.data = os.path.abspath(args.data)  # so that --resume finds it from any folder
    checkpoint = os.path.join(args.out, CHECKPOINT_NAME)
    start, extra = 0, {}
    if args.resume:
        if not os.path.exists(checkpoint):
            raise ValueError(f"cannot resume: no checkpoint {checkpoint!r}")
        extra = load_checkpoint(checkpoint)[1].get("extra") or {}
        stored = _stored_flags(extra, checkpoint)
        differ = [
            n
            for n in sorted(given)
            if n not in RESUME_OVERRIDES and n in stored and not _same_flag(n, getattr(args, n), stored[n])
        ]
        if differ:
            shown = ", ".join(
                f"{_flag(n)}{'' if isinstance(stored[n], bool) else ' ' + str(getattr(args, n))} (the run's: "
                f"{stored[n]})"
                for n in differ
            )
            allowed = ", ".join(_flag(n) for n in RESUME_OVERRIDES)
            raise ValueError(
                f"{shown} contradicts {checkpoint!r}, which --resume continues: drop it or train into another "
                f"--out (with --resume only {allowed}, --device and --quiet may change)"
            )
        for name, value in stored.items():
            if name not in given:
                setattr(args, name, value)
        for mode, other in (("compile", "cuda_graph"), ("cuda_graph", "compile")):
            if getattr(args, mode) and mode in given and other not in given:
                setattr(args, other, False)  # one step mode given on --resume replaces the run's
        for tiling, other in (("tile_size", "tile_memory_mb"), ("tile_memory_mb", "tile_size")):
            if tiling in given and other not in given:
                setattr(args, other, None)  # one tiling given on --resume replaces the run's (its default below)
        start = extra.get("step", 0)
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(
                f"{checkpoint!r} stores step {start!r}, which is no int >= 0: the file was edited or is corrupt"
            )
    elif os.path.exists(checkpoint):
        raise ValueError(f"{checkpoint!r} exists: pass --resume to continue that run, or choose another --out")
    for name, value in TRAIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    foreign = [_flag(n) for m, names in MODEL_FLAGS.items() if m != args.model for n in names if n in given]
    if foreign:
        verb = "does" if len(foreign) == 1 else "do"
        raise ValueError(f"{', '.join(foreign)} {verb} not apply to --model {args.model}")
    if not args.reversible and ("tile_size" in given or "tile_memory_mb" in given):
        raise ValueError("--tile-size and --tile-memory-mb only apply with --reversible")
    if args.model == "jet" and ("tile_size" in given or "tile_memory_mb" in given):
        raise ValueError("--tile-size and --tile-memory-mb apply to Glow only: Jet's attention is global, not tiled")
    if args.compile and args.cuda_graph:
        raise ValueError("choose one of --compile and --cuda-graph")
    if args.cuda_graph and (args.device == "cpu" or not torch.cuda.is_available()):
        started_with = args.resume and "cuda_graph" not in given
        inherited = " (the run was started with it: --no-cuda-graph resumes it without)" if started_with else ""
        raise ValueError(f"--cuda-graph needs a CUDA device{inherited}")
    if "tile_size" in given and "tile_memory_mb" in given:
        raise ValueError("choose one of --tile-size and --tile-memory-mb")
    if args.cuda_graph and args.amp == "fp16":
        raise ValueError("--cuda-graph runs in float32 or under --amp bf16, not --amp fp16 (loss scaling)")
    if args.resolution is None:
        args.resolution = 8 if args.data is None else _infer_resolution(args.data)
        if args.data is not None and not args.quiet and distributed.launched_as_main():
            print(f"--resolution {args.resolution}: the shorter side of every image in {args.data}")
    if args.model == "jet":
        if args.resolution % args.patch_size:
            raise ValueError(f"--resolution {args.resolution} must be divisible by --patch-size {args.patch_size}")
        if args.width % args.heads:
            raise ValueError(f"--width {args.width} must be divisible by --heads {args.heads}")
    else:
        check_halvings(args.resolution, args.resolution, args.levels, "levels", f"--resolution {args.resolution}")
    return start, extra


def _levels_digest(levels: torch.Tensor) -> str:
    """A SHA-256 of quantized images (their shape and every level): the data a run started on, checked on
    --resume."""
    digest = hashlib.sha256(repr(tuple(levels.shape)).encode())
    digest.update(levels.contiguous().numpy())  # read through the buffer protocol: no copy of the data
    return digest.hexdigest()


def _training_data(args: argparse.Namespace) -> tuple[ImageSource, torch.Tensor, int, str, str | None]:
    """``(train source, held-out levels, n_bins, description, digest)`` from ``--data`` or the embedded data; the
    digest (:func:`_levels_digest`) of a ``--data`` folder's images, None for the embedded data."""
    if args.n_bits is not None and not 1 <= args.n_bits <= 8:
        raise ValueError(f"--n-bits must be in [1, 8], got {args.n_bits}")
    n_bins = 2 ** (args.n_bits or DEFAULT_N_BITS)
    res = args.resolution
    if args.data is not None:
        levels = quantize(load_image_folder(args.data, res), n_bins)
        if len(levels) < 2:
            raise ValueError(
                f"--data {args.data!r} holds {len(levels)} image: training holds {HELDOUT_FRACTION:.0%} of the images "
                "out (at least one) to measure held-out bits/dim, so it needs at least 2"
            )
        train_idx, test_idx = split_heldout(len(levels))
        classes = list_classes(args.data)
        labelled = f" ({len(classes)} class folders, labels unused)" if classes else ""
        description = f"{args.data}{labelled} at {res}x{res}"
        return TensorImages(levels[train_idx]), levels[test_idx], n_bins, description, _levels_digest(levels)
    if res == 8:
        if args.n_bits is not None:
            raise ValueError("--n-bits does not apply to the embedded digits, which have 17 levels per pixel")
        train_levels, _, test_levels, _ = load_digits()
        return TensorImages(train_levels), test_levels, DIGITS_N_BINS, "the 8x8 digits", None
    source, heldout = load_photo_crops(res, n_bins)
    return source, heldout.levels, n_bins, f"{res}x{res} crops of the bundled photos", None


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`~fastflow.train.TrainConfig` of the train flags in ``args`` (every name of
    :data:`TRAIN_DEFAULTS`, with ``out`` and ``quiet``)."""
    return TrainConfig(
        steps=args.iterations, batch=args.batch, lr=args.lr, warmup=args.warmup, clip=args.clip, seed=args.seed,
        amp=args.amp, out=args.out, save_every=args.save_every, eval_every=args.eval_every,
        samples=args.samples, temperature=args.temperature, progress=not args.quiet, quiet=args.quiet,
        step_mode="cuda-graph" if args.cuda_graph else "compile" if args.compile else "eager",
        channels_last=args.channels_last,
    )  # fmt: skip


def train_model(args: argparse.Namespace, in_channels: int, n_bins: int) -> tuple[FlowModel, str]:
    """The ``--model`` to train, built from the train flags in ``args``, and its one-line description."""
    if args.model == "jet":
        jet = Jet(
            in_channels, args.resolution, patch_size=args.patch_size, couplings=args.couplings, width=args.width,
            depth=args.depth, heads=args.heads, n_bins=n_bins, reversible=args.reversible,
        )  # fmt: skip
        return jet, (
            f"Jet patch={args.patch_size} couplings={args.couplings} width={args.width} depth={args.depth} "
            f"heads={args.heads}"
        )
    glow = Glow(
        in_channels=in_channels, image_size=args.resolution, levels=args.levels, steps=args.steps,
        hidden=args.hidden, n_bins=n_bins, reversible=args.reversible,
    )  # fmt: skip
    return glow, f"Glow L={args.levels} K={args.steps} hidden={args.hidden}"


def _train(args: argparse.Namespace) -> int:
    start, resumed = _resolve_train_flags(args)
    if args.resume and start >= args.iterations:
        if distributed.launched_as_main():  # before the process group: every rank gets here
            print(f"already at step {start} of {args.iterations}: nothing to do (a larger --iterations trains further)")
        return 0
    config = train_config(args)
    ranks = distributed.launched_world_size()
    if args.batch % ranks:  # before the data, the process group and the model
        raise ValueError(f"--batch {args.batch} does not split evenly over the {ranks} ranks torchrun launched")
    source, heldout, n_bins, description, digest = _training_data(args)
    if args.resume and digest is not None and resumed.get("data_digest", digest) != digest:
        raise ValueError(
            f"the images in --data {args.data!r} are not those the run in {args.out!r} started on (files added, "
            "removed, renamed or changed): resuming would hold out and draw other images; train into another --out"
        )
    torch.manual_seed(args.seed)
    model, name = train_model(args, source.image_shape[0], n_bins)
    check_writable_folder(args.out, create=False)  # made at the first save: a run failing before leaves no folder
    context = distributed.setup(args.device)
    try:
        model.to(context.device)
        if args.reversible and args.model == "glow":
            model.set_tiling(tile_size=args.tile_size, memory_budget_mb=args.tile_memory_mb)
        if context.is_main and not args.quiet:
            print(
                f"{name} on {description}, {n_bins} levels, "
                f"{len(heldout)} held-out images, {context.world_size} rank(s) on {context.device.type}"
            )
        flags = {name: getattr(args, name) for name in TRAIN_DEFAULTS}  # plain values, for --resume
        written: list[str] = []
        try:
            train(
                model, source, config, heldout=heldout, resume=args.resume,
                checkpoint_extra={"cli": flags, "data_digest": digest}, written=written,
            )  # fmt: skip
        except TrainingInterrupted as stop:
            if context.is_main:
                resume = f"fastflow train --out {shlex.quote(args.out)} --resume"
                print(f"interrupted at step {stop.step}; resume with: {resume}", file=sys.stderr)
            return EXIT_INTERRUPTED
        if context.is_main and written:  # the grid is missing where it could not be drawn (a warning said why)
            print(f"wrote {' and '.join(written)}")
        return 0
    finally:
        distributed.teardown()


def _check_output_file(path: str) -> None:
    """``ValueError`` unless the image file ``path`` can be written, so an unwritable --out fails before the work:
    ``path`` is no folder, and its folder, or the nearest existing folder above it (where :func:`_write` makes the
    missing ones), takes a scratch file. Creates no folder: a command that fails later leaves nothing behind."""
    if os.path.isdir(path):
        raise ValueError(f"--out {path!r} is a folder: give the image file to write")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), "the folder of --out", create=False)


def _check_servable(args: argparse.Namespace, model: FlowModel) -> None:
    """``ValueError`` saying what ``model`` is, unless the checkpoint commands can serve it: a model of images of 1
    or 3 channels (what an image file holds) that needs no context (they set no class labels or context)."""
    command, name = f"fastflow {args.command}", type(model).__name__
    holds = f"{args.checkpoint!r} holds"
    if model.n_bins is None or len(model.image_shape) != 3:
        features = math.prod(model.image_shape)
        raise ValueError(f"{holds} a {name} of {features}-feature vectors, not images: {command} works on images")
    if model.prior.conditional:
        raise ValueError(f"{holds} a class-conditional {name}: {command} takes no class labels")
    if model.conditional:
        raise ValueError(f"{holds} a {name} conditioned on a context: {command} takes no context")
    channels = model.image_shape[0]
    if channels not in (1, 3):
        raise ValueError(f"{holds} a {name} of {channels}-channel images: {command} works on images of 1 or 3 channels")


def _load(args: argparse.Namespace) -> tuple[FlowModel, dict[str, Any]]:
    """``(model in eval mode, checkpoint payload)``; ``ValueError`` for a model the command cannot serve (see
    :func:`_check_servable`) or weights that hold NaN or Inf."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, payload = load_checkpoint(args.checkpoint, map_location=device)
    _check_servable(args, model)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ValueError(f"checkpoint {args.checkpoint!r} holds NaN/Inf values in {', '.join(bad[:3])}{more}")
    model.check_finite = False  # _write counts the images that come out NaN/Inf and says what to try
    return model.eval(), payload


def _write(
    images: torch.Tensor,
    path: str,
    n_bins: int | None,
    nrow: int | None = None,
    what: str = "images",
    hint: str = "",
) -> None:
    """Write the grid of ``images`` (a model's with ``n_bins`` levels per pixel) to ``path``, unless some are not
    finite: then ``FloatingPointError`` saying how many, and nothing is written."""
    bad = int((~torch.isfinite(images.detach().flatten(1))).any(dim=1).sum())
    if bad:
        raise FloatingPointError(
            f"{bad} of {len(images)} {what} came out NaN/Inf, so nothing was written to {path!r}{hint}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_image_grid(images, path, nrow=nrow, n_bins=n_bins)
    print(f"wrote {path}")


def _sample(args: argparse.Namespace) -> None:
    _check_output_file(args.out)
    model, _ = _load(args)
    samples = model.sample(args.n, temperature=args.temperature, generator=torch.Generator().manual_seed(args.seed))
    _write(samples, args.out, model.n_bins, what="samples", hint=f": try a --temperature below {args.temperature:g}")


def _interpolate(args: argparse.Namespace) -> None:
    _check_output_file(args.out)
    model, _ = _load(args)
    a, b = (load_image_spec(spec, model.image_shape, model.n_bins) for spec in (args.a, args.b))
    _write(interpolate(model, a, b, args.steps), args.out, model.n_bins, nrow=args.steps)


def _class_index(flag: str, spec: str, classes: list[str], folder: str) -> int:
    """The index of class ``spec`` (a sub-folder name, else an index) of the labelled ``folder``."""
    if spec in classes:
        return classes.index(spec)
    if spec.isdigit() and int(spec) < len(classes):
        return int(spec)
    raise ValueError(
        f"{flag} {spec!r} is not a class of {folder!r}: its classes are {', '.join(classes)} "
        f"(or their indices 0 to {len(classes) - 1})"
    )


def _class_images(args: argparse.Namespace, model: FlowModel, payload: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """``(images of --label-to, images of --label-from)`` as uint8 levels: classes of --data (else of the class folders
    the model was trained on), or digit classes for a model of the 8x8 digits."""
    folder = args.data
    if folder is None:
        trained_on = ((payload.get("extra") or {}).get("cli") or {}).get("data")
        folder = trained_on if isinstance(trained_on, str) and list_classes(trained_on) else None
    if folder is None:
        if tuple(model.image_shape) != (1, 8, 8) or model.n_bins != DIGITS_N_BINS:
            raise ValueError(
                f"--label-from/--label-to need --data DIR (a folder of class sub-folders) or a model of the 8x8 "
                f"digits, but {args.checkpoint!r} models {'x'.join(map(str, model.image_shape))} images with "
                f"{model.n_bins} levels"
            )
        for flag, spec in (("--label-from", args.label_from), ("--label-to", args.label_to)):
            if not spec.isdigit() or int(spec) > 9:
                raise ValueError(f"{flag} must be a digit class 0 to 9 for a digits model, got {spec!r}")
        return digits_of_class(int(args.label_to)), digits_of_class(int(args.label_from))
    channels, res = model.image_shape[0], model.image_shape[1]
    files, labels, classes = list_labelled_images(folder)
    to, from_ = (
        _class_index(f, s, classes, folder)
        for f, s in (("--label-to", args.label_to), ("--label-from", args.label_from))
    )
    chosen = [[path for path, k in zip(files, labels) if k == index] for index in (to, from_)]  # only these load
    return tuple(quantize(load_images(paths, res, channels), model.n_bins) for paths in chosen)


def _manipulate(args: argparse.Namespace) -> None:
    dirs = [v is not None for v in (args.attribute_dir, args.without_dir)]
    labels = [v is not None for v in (args.label_from, args.label_to)]
    if not ((all(dirs) and not any(labels)) or (all(labels) and not any(dirs))):
        raise ValueError("manipulate needs either --attribute-dir and --without-dir, or --label-from and --label-to")
    if args.data is not None and args.label_from is None:
        raise ValueError("--data goes with --label-from and --label-to")
    _check_output_file(args.out)
    model, payload = _load(args)
    image = load_image_spec(args.image, model.image_shape, model.n_bins)
    if args.label_from is not None:
        with_attribute, without = _class_images(args, model, payload)
    else:
        channels, res = model.image_shape[0], model.image_shape[1]
        with_attribute = quantize(load_image_folder(args.attribute_dir, res, channels), model.n_bins)
        without = quantize(load_image_folder(args.without_dir, res, channels), model.n_bins)
    direction = attribute_direction(model, with_attribute, without)
    edits = manipulate(model, image, direction, args.strengths)
    _write(edits, args.out, model.n_bins, nrow=len(args.strengths), hint=": try smaller --strengths")


def _export(args: argparse.Namespace) -> None:
    if not args.directory:
        raise ValueError("directory must name the folder to write")
    if os.path.exists(args.directory) and not os.path.isdir(args.directory):
        raise ValueError(f"directory {args.directory!r} is a file: give a folder to write")
    model, _ = load_checkpoint(args.checkpoint)  # first: a bad checkpoint leaves no folder behind
    check_writable_folder(args.directory, "directory")
    model.save_pretrained(args.directory)
    weights, config = (os.path.join(args.directory, name) for name in ("model.safetensors", "config.json"))
    print(f"wrote {weights} and {config}")


def _checkpoint_command(
    commands: argparse._SubParsersAction, name: str, help: str, run: Callable[[argparse.Namespace], int | None]
) -> argparse.ArgumentParser:
    """A sub-command whose first argument is a checkpoint."""
    sub = commands.add_parser(name, help=help)
    sub.add_argument("checkpoint", help="checkpoint.pt written by fastflow train")
    sub.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    sub.set_defaults(run=run)
    return sub


def _parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="fastflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    count, positive, at_least_0 = number_arg(int, 1), number_arg(float, 0, strict=True), number_arg(float, 0)
    steps = number_arg(int, 0)

    t = commands.add_parser("train", help="train a Glow or a Jet; resumable, data-parallel under torchrun")
    t.add_argument("--data", help="folder of PNG/JPEG images, or of class sub-folders of them; "
                   f"{HELDOUT_FRACTION:.0%}% (at least one) held out at random (seed 0) for the held-out bits/dim "
                   "(default: embedded digits at --resolution 8, else crops of the photos bundled with "
                   "scikit-learn)")  # fmt: skip
    t.add_argument("--resolution", type=count, help="image side in pixels (default: 8, the digits; with --data the "
                   "shorter side shared by its images)")  # fmt: skip
    t.add_argument("--n-bits", type=int, help=f"bits per colour channel for images (default {DEFAULT_N_BITS})")
    t.add_argument("--model", choices=["glow", "jet"], help="the flow to train (default glow)")
    t.add_argument("--levels", type=count, help="Glow levels L (default 2)")
    t.add_argument("--steps", type=count, help="flow steps per level K (default 8)")
    t.add_argument("--hidden", type=count, help="Glow coupling network width (default 64)")
    t.add_argument("--patch-size", type=count, help="Jet patch side (default 2)")
    t.add_argument("--couplings", type=count, help="Jet couplings (default 8)")
    t.add_argument("--width", type=count, help="Jet ViT width (default 64)")
    t.add_argument("--depth", type=count, help="Jet ViT blocks per coupling (default 2)")
    t.add_argument("--heads", type=count, help="Jet ViT attention heads (default 4)")
    t.add_argument("--reversible", action="store_true", default=None, help="memory-saving reversible backprop")
    t.add_argument(
        "--tile-memory-mb", type=positive,
        help="with --reversible: memory budget of one coupling network's activations; the network runs in "
        "spatial tiles that fit it (default 1024, which leaves small images untiled)",
    )  # fmt: skip
    t.add_argument("--tile-size", type=count, help="with --reversible: fixed tile side instead of the budget")
    t.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (fp16 with loss scaling)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="compile the training "
                   "step with torch.compile (Inductor; CPU or CUDA; the first steps compile)")  # fmt: skip
    t.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None, help="capture the whole "
                   "training step in a CUDA graph after 3 warm-up steps and replay it (single GPU, static "
                   "batch)")  # fmt: skip
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="channels-last "
                   "convolutions (the layout tensor cores want under --amp bf16; default: on on the CPU, where it "
                   "measured faster, off on CUDA)")  # fmt: skip
    t.add_argument("--iterations", type=count, help="training steps (default 1500)")
    t.add_argument("--batch", type=count, help="global batch, split over the ranks (default 64)")
    t.add_argument("--lr", type=positive, help="Adam learning rate after warm-up (default 2e-3)")
    t.add_argument("--warmup", type=steps, help="linear learning-rate warm-up steps (default 100)")
    t.add_argument("--clip", type=at_least_0, help="gradient-norm clipping, 0 disables (default 50)")
    t.add_argument("--seed", type=seed_arg, help="seed of the weights and of every batch (default 0)")
    t.add_argument(
        "--out", default="runs/train", help="folder for checkpoint.pt and samples-STEP.png (default runs/train)"
    )
    overrides = ", ".join(map(_flag, RESUME_OVERRIDES))
    t.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out, with its "
                   f"flags; only {overrides}, --device and --quiet may change")  # fmt: skip
    t.add_argument("--save-every", type=steps, help="checkpoint and sample grid interval, 0: at the end (default 500)")
    t.add_argument("--eval-every", type=steps, help="held-out bits/dim interval, 0: at the end (default 250)")
    t.add_argument("--samples", type=count, help="images per sample grid (default 64)")
    t.add_argument("--temperature", type=positive, help="sampling temperature (default 0.7)")
    t.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    t.add_argument("--quiet", action="store_true", help="print only errors and the final line")
    t.set_defaults(run=_train)

    s = _checkpoint_command(commands, "sample", "write a grid of samples from a checkpoint", _sample)
    s.add_argument("--n", type=count, default=64, help="number of samples (default 64)")
    s.add_argument("--temperature", type=positive, default=0.7, help="sampling temperature (default 0.7)")
    s.add_argument("--seed", type=seed_arg, default=0, help="random seed (default 0)")
    s.add_argument("--out", type=_image_out, default="samples.png", help="PNG or JPEG to write (default samples.png)")

    i = _checkpoint_command(commands, "interpolate", "decode a line between the latents of two images", _interpolate)
    i.add_argument("a", help="first image: a PNG/JPEG file, digits:N or photos:N (N-th held-out image)")
    i.add_argument("b", help="second image, as A")
    i.add_argument("--steps", type=number_arg(int, 2), default=8, help="images in the strip, ends included (default 8)")
    i.add_argument("--out", type=_image_out, default="interpolation.png",
                   help="PNG or JPEG to write (default interpolation.png)")  # fmt: skip

    m = _checkpoint_command(commands, "manipulate", "move an image along a latent attribute direction", _manipulate)
    m.add_argument("image", help="a PNG/JPEG file, digits:N or photos:N (N-th held-out image)")
    m.add_argument("--attribute-dir", help="folder of images with the attribute")
    m.add_argument("--without-dir", help="folder of images without it")
    m.add_argument("--label-from", help="direction from this class (a sub-folder name or index of --data; a digit "
                   "for a digits model) ...")  # fmt: skip
    m.add_argument("--label-to", help="... to this class")
    m.add_argument("--data", help="with --label-from/--label-to: folder of class sub-folders (default: the one the "
                   "model was trained on, if it was one)")  # fmt: skip
    m.add_argument("--strengths", type=number_arg(float, -math.inf), nargs="+", default=[-1.0, -0.5, 0.0, 0.5, 1.0],
                   help="multiples of the direction to add (default -1 -0.5 0 0.5 1)")  # fmt: skip
    m.add_argument("--out", type=_image_out, default="manipulation.png",
                   help="PNG or JPEG to write (default manipulation.png)")  # fmt: skip

    e = commands.add_parser("export", help="write a checkpoint's model as model.safetensors + config.json")
    e.add_argument("checkpoint", help="checkpoint.pt written by fastflow train")
    e.add_argument("directory", help="folder to write (FlowModel.from_pretrained loads it)")
    e.set_defaults(run=_export)
    return parser


DIVERGED_HINT = "try a lower --lr or a longer --warmup"


def _one_line(err: BaseException, diverged_hint: str) -> str:
    message = " ".join(str(err).split())
    if isinstance(err, TrainingDiverged):
        return f"{message}: {diverged_hint}"
    if isinstance(err, (ValueError, OSError, FloatingPointError)):
        return message
    return f"{type(err).__name__}: {message}"


def run_reporting_errors(run: Callable[[], int | None], prog: str, diverged_hint: str = DIVERGED_HINT) -> int:
    """``run()``'s exit status (None: 0), or, where it fails, the status a failure gets after one line on stderr
    (see the module docstring; ``FASTFLOW_DEBUG=1`` re-raises instead): 130 for Ctrl-C, 2 for a ``ValueError``
    (bad input), 1 for any other error; a diverged run's line ends with ``diverged_hint``."""
    try:
        status = run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if os.environ.get("FASTFLOW_DEBUG"):
            raise
        print(f"{prog}: error: {_one_line(err, diverged_hint)}", file=sys.stderr)
        return EXIT_BAD_INPUT if isinstance(err, ValueError) else EXIT_FAILED
    return status or 0


def main(argv: list[str] | None = None) -> int:
    """Run the ``fastflow`` command line; returns the exit status (0, or 1, 2, 130: see the module docstring)."""
    args = _parser().parse_args(argv)
    return run_reporting_errors(lambda: args.run(args), f"fastflow {args.command}")


if __name__ == "__main__":
    sys.exit(main())
