"""FlowModel: a (multi-scale) flow of blocks, splits and a top prior with likelihood, encode, decode and sampling,
optionally conditioned on a context."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from fastflow.backend import functorch_transforms_active
from fastflow.models.priors import TopPrior
from fastflow.nn.actnorm import ActNorm, ActNormInitError
from fastflow.nn.base import check_image, first_floating_parameter, run_layer
from fastflow.nn.distributions import check_generator
from fastflow.nn.reversible import drift_tripped, guards_deferred, moved_record, read_drift_guard
from fastflow.nn.sequential import FlowSequential
from fastflow.nn.split import Split
from fastflow.nn.tiling import set_tiling
from fastflow.ops._checks import check_bool, int_at_least, logdet_dtype
from fastflow.warning_location import warn_at_caller

__all__ = ["FlowModel", "check_levels", "dequantize", "eval_mode"]

_BELOW_HALF = 0.5 - 2**-25  # the largest float32 below 0.5 (24-bit significand: its spacing below 0.5 is 2**-25)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode, then put back the mode every one of its modules had (train or
    eval: ``model.train(was_training)`` would set a submodule left in eval mode, or in train mode under an eval
    model, to the model's)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:  # a module's own train(), for what else it does
            if type(module).train is not nn.Module.train:
                module.train(training)
        for module, training in modes:  # then the flags themselves: train() sets a whole subtree, and a module
            module.training = training  # shared by two parents is listed once


def _check_integer_levels(name: str, levels: object, n_bins: int | None) -> torch.Tensor:
    """``levels``, or a ``TypeError`` / ``ValueError`` naming ``name`` unless it is an integer tensor with values in
    ``[0, n_bins)`` (the range check reads two numbers from the device; none for ``n_bins=None``)."""
    if not isinstance(levels, torch.Tensor) or levels.is_floating_point() or levels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(levels, 'dtype', type(levels).__name__)}")
    if n_bins is not None and levels.numel():
        low, high = levels.aminmax()
        if int(low) < 0 or int(high) >= n_bins:
            raise ValueError(f"{name} must lie in [0, n_bins) = [0, {n_bins}), got values in [{int(low)}, {int(high)}]")
    return levels


def dequantize(
    levels: torch.Tensor, n_bins: int, generator: torch.Generator | None = None, *, check_range: bool = True
) -> torch.Tensor:
    """Uniform dequantization of integer pixel levels in ``[0, n_bins)`` to ``(k + u) / n_bins - 0.5``, ``u``
    drawn from ``generator`` (on its device, then moved to ``levels``'), else from the global RNG.

    This is the input convention of every model: continuous float32 values in ``[-0.5, 0.5)`` (``k + u`` may
    round up to ``k + 1`` in float32, which for the top level would be 0.5: the result is clamped to the largest
    float32 below 0.5).
    ``ValueError`` for levels outside ``[0, n_bins)`` (a check that reads two numbers back from the device);
    ``check_range=False`` skips that read for levels known to be in range (a data set checked once, whole: on a
    GPU the read is a sync per batch), keeping the integer check.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an int >= 2, got {n_bins!r}")
    _check_integer_levels("levels", levels, n_bins if check_range else None)
    if generator is None:
        u = torch.rand(levels.shape, device=levels.device)
    else:
        u = torch.rand(levels.shape, device=generator.device, generator=generator).to(levels.device)
    return ((levels.float() + u) / n_bins - 0.5).clamp_max(_BELOW_HALF)


def check_levels(name: str, levels: object, image_shape: tuple[int, ...], n_bins: int) -> torch.Tensor:
    """``levels``, or a ``TypeError`` / ``ValueError`` naming ``name`` unless it is a non-empty integer tensor of
    pixel levels ``(N, *image_shape)`` in ``[0, n_bins)`` (the range check reads two numbers from the device)."""
    levels = _check_integer_levels(name, levels, n_bins)
    if levels.dim() != 1 + len(image_shape) or tuple(levels.shape[1:]) != tuple(image_shape) or len(levels) == 0:
        shape = ", ".join(map(str, image_shape))
        raise ValueError(f"{name} must have shape (N, {shape}) with N >= 1, got {tuple(levels.shape)}")
    return levels


class FlowModel(nn.Module):
    """Multi-scale flow: ``blocks[i]`` (a FlowSequential), then ``splits[i]`` for all but the last block,
    then ``prior`` over what is left.

    Data convention for images (``n_bins`` given): inputs ``x`` are dequantized images in ``[-0.5, 0.5)`` of
    shape ``(B, *image_shape)`` (see :func:`dequantize`), from ``n_bins`` levels per pixel. ``bits_per_dim`` is
    the discrete negative log-likelihood ``(-log p(x) + D * log(n_bins)) / (D * log 2)`` with ``D = C * H * W``.
    Other data (``n_bins=None``, e.g. vectors ``(B, D)``) is taken as it comes, and has no ``bits_per_dim``.

    Conditioning: every method takes an optional ``context`` ``(B, ...)``. It reaches the blocks' layers that
    condition on it (their conditioners) and, for a prior with class conditioning (Glow's ``num_classes``), the
    prior, as integer class labels ``(B,)``. A conditional model needs it and an unconditional one refuses it
    (``ValueError``), as does a context whose batch does not match.
    ``check_finite`` (default on) raises ``FloatingPointError`` naming the first layer with a non-finite
    output or log-det instead of returning a NaN likelihood. ``reversible`` (settable at any time) trains
    every block with memory-saving reversible backprop; latents that leave at a split are outputs of their
    block, not activations.

    Guards (``check_finite``, the class-label range check, reversible backprop's drift check) read the device
    at once, a host sync, except where :func:`~fastflow.nn.reversible.guards_deferred` holds: inside
    :func:`~fastflow.nn.reversible.deferred_guards` (``fastflow.train`` runs each step there), under
    ``torch.compile`` tracing and during CUDA graph capture. There they only record on the device:
    :meth:`guards_tripped` says on the device whether one tripped, :meth:`check_guards` reads them and raises.
    """

    def __init__(
        self,
        blocks: list[FlowSequential],
        splits: list[Split],
        prior: TopPrior,
        image_shape: tuple[int, ...],
        n_bins: int | None,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        if len(splits) != len(blocks) - 1:
            raise ValueError(
                f"need one split between consecutive blocks, got {len(blocks)} blocks, {len(splits)} splits"
            )
        if n_bins is not None:
            int_at_least("n_bins", n_bins, 2)
        reversible = check_bool("reversible", config.get("reversible", False))
        self.blocks = nn.ModuleList(blocks)
        self.splits = nn.ModuleList(splits)
        self.prior = prior
        self.image_shape = tuple(image_shape)  # the event shape: (C, H, W) for images, (D,) for vectors
        self.n_bins = n_bins
        self.config = dict(config)
        self.check_finite = True
        # the deferred finite check's record, moved to the batch's device on first use (a plain tensor, not a
        # buffer: no state_dict entry, and DDP's buffer broadcast would overwrite each rank's own record)
        self._nonfinite_seen = torch.zeros((), dtype=torch.bool)
        self._range_checked = False
        self.reversible = reversible
        for name, module in self.named_modules():
            if isinstance(module, ActNorm):
                module.name = name  # warnings name the layer by its path in the model

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FlowModel:
        # the finite check's record moves with the model (.to(device), .cuda()): left behind, the first compiled
        # step would swap in a new one on the device and recompile the next (a bool: dtype casts leave it)
        self._nonfinite_seen = moved_record(self._nonfinite_seen, fn)
        return super()._apply(fn, recurse)

    def set_tiling(self, tile_size: int | None = None, memory_budget_mb: float | None = None) -> None:
        """Run every coupling network in spatial tiles: :func:`fastflow.nn.tiling.set_tiling` on this model."""
        set_tiling(self, tile_size, memory_budget_mb)

    @property
    def reversible(self) -> bool:
        """Whether the blocks train with memory-saving reversible backprop."""
        return all(block.reversible for block in self.blocks)

    @reversible.setter
    def reversible(self, value: bool) -> None:
        check_bool("reversible", value)  # "no" would switch it on, and the config would not load back
        for block in self.blocks:
            block.reversible = value
        self.config["reversible"] = value

    def floating_parameter(self) -> torch.Tensor:
        """A floating-point parameter of the model: its dtype and device are the model's."""
        parameter = first_floating_parameter(self)
        if parameter is not None:
            return parameter
        raise RuntimeError(f"{type(self).__name__} has no floating-point parameters")

    @property
    def num_dims(self) -> int:
        """``D``: ``C * H * W`` for images, the feature count for vectors."""
        return math.prod(self.image_shape)

    @property
    def conditional(self) -> bool:
        """Whether the model needs a ``context``: some layer conditions on it, or the prior on class labels."""
        return self._blocks_use_context or self.prior.conditional

    @property
    def _blocks_use_context(self) -> bool:
        return any(block.uses_context for block in self.blocks)

    def _check_input(self, x: torch.Tensor) -> None:
        if self.n_bins is not None:
            check_image("x", x, self.image_shape[0])
        elif not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}): pass at least one sample")
        parameter = self.floating_parameter()
        if x.dtype != parameter.dtype:  # under autocast too: autocast computes the networks in low precision
            dtype = parameter.dtype
            raise TypeError(f"x is {x.dtype} but the model is {dtype}: convert one, e.g. x.to({dtype})")
        _check_device("x", x, parameter.device)
        # the first batch only (a check per step would sync with the device), and never where guards defer
        # guards_deferred first: under torch.compile it folds to True, so no guard is put on _range_checked (a
        # resumed run sets it at its first evaluation, which would recompile the step)
        if self.n_bins is not None and not guards_deferred(x) and not self._range_checked:
            self._range_checked = True
            low, high = x.detach().aminmax()
            if float(low) < -0.5 or float(high) > 0.5:
                warn_at_caller(
                    f"x lies in [{float(low):.3g}, {float(high):.3g}], outside [-0.5, 0.5]: models expect "
                    "dequantized pixels, (k + u) / n_bins - 0.5 (fastflow.models.dequantize); images in [0, 1) "
                    "give wrong bits/dim",
                    UserWarning,
                )

    def _check_context(self, context: object, batch: int, device: torch.device) -> None:
        """``ValueError`` unless ``context`` suits the model: None for an unconditional model, a tensor of batch
        ``batch`` for a conditional one, on ``device`` and at least 2-D where layers condition on it (the layers and
        the prior check the rest: features, labels)."""
        name = type(self).__name__
        if context is None:
            if self._blocks_use_context:
                raise ValueError(f"context is required: {name}'s layers condition on a context")
            return  # a prior conditioned on class labels says so itself
        if not self.conditional:
            raise ValueError(
                f"context was given but {name} is unconditional (no class conditioning, no conditional layers)"
            )
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor, got {type(context).__name__}")
        if self._blocks_use_context and context.dim() == 1:
            features = self.config.get("context")  # the vector presets' context width; "F" where unknown
            width = features if isinstance(features, int) and features > 0 else "F"
            per_sample = "one feature per sample is c[:, None]; " if width == 1 and len(context) == batch else ""
            raise ValueError(
                f"context must have shape ({batch}, {width}) (one row of context features per sample), got "
                f"{tuple(context.shape)}: {per_sample}one context vector c of shape ({width},) shared by every sample "
                f"is c.expand({batch}, -1)"
            )
        if context.dim() == 0 or context.shape[0] != batch:
            raise ValueError(f"context must have shape ({batch}, ...) (one row per sample), got {tuple(context.shape)}")
        if self._blocks_use_context:  # the conditioners' input; class labels the prior moves to its device itself
            _check_device("context", context, device)

    def _prior_context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        return context if self.prior.conditional else None

    def _block_context(self, context: torch.Tensor | None) -> torch.Tensor | None:
        return None if context is None or not self._blocks_use_context else context

    def _encode(
        self, x: torch.Tensor, context: torch.Tensor | None, diagnose: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        # running sums start from their first term (a zero start costs an allocation and an add per sum)
        logdet_total: torch.Tensor | None = None
        log_prior: torch.Tensor | None = None
        latents: list[torch.Tensor] = []
        if diagnose:  # non-finite inputs are named as such, not blamed on the first layer they reach
            _raise_if_nonfinite_inputs(x, context)
        block_context = self._block_context(context)
        for i, block in enumerate(self.blocks):
            if diagnose:
                for j, layer in enumerate(block.layers):
                    x, logdet = run_layer(layer, x, block_context)
                    _raise_if_nonfinite(f"blocks.{i}.layers.{j} ({type(layer).__name__})", x, logdet)
                    logdet_total = _added(logdet_total, logdet)
            else:
                x, logdet = block(x, block_context)
                logdet_total = _added(logdet_total, logdet)
            if i < len(self.splits):
                x, z_out, split_log_p = self.splits[i](x)
                if diagnose:
                    _raise_if_nonfinite(f"splits.{i}", z_out, split_log_p, "prior log-density")
                latents.append(z_out)
                log_prior = _added(log_prior, split_log_p)
        latents.append(x)
        log_prior = _added(log_prior, self.prior.log_prob(x, self._prior_context(context)))
        if logdet_total is None:  # a model without blocks
            logdet_total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x.dtype))
        return latents, logdet_total, log_prior

    def encode_with_logdet(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(latents, log|det d latents / dx|, log p(latents))``, each log term of shape ``(B,)``. With
        ``check_finite``, a non-finite ``log p(x)`` raises ``FloatingPointError`` naming the layer, or is recorded
        for :meth:`check_guards` where guards are deferred (see the class docstring)."""
        self._check_input(x)
        self._check_context(context, x.shape[0], x.device)
        try:
            latents, logdet, log_prior = self._encode(x, context)
        except ActNormInitError as err:  # from a non-finite batch (a host read already): named as later batches are
            _raise_if_nonfinite_inputs(x, context, cause=err)
            raise
        if self.check_finite:
            finite = torch.isfinite(logdet + log_prior).all()
            if guards_deferred(x):
                self._record_nonfinite(~finite)
            elif not _read_check(finite):
                self._diagnose(x, context)
        return latents, logdet, log_prior

    def _record_nonfinite(self, nonfinite: torch.Tensor) -> None:
        if self._nonfinite_seen.device != nonfinite.device:  # the model moved: a record left behind is dropped
            self._nonfinite_seen = torch.zeros((), dtype=torch.bool, device=nonfinite.device)
        self._nonfinite_seen.logical_or_(nonfinite)

    @torch.no_grad()
    def _diagnose(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        """Rerun the forward on ``(x, context)`` layer by layer and raise ``FloatingPointError`` naming the first
        layer with a non-finite output or log-det (``ValueError`` naming a non-finite ``x`` or floating-point
        ``context``), else one blaming the prior."""
        self._encode(x, context, diagnose=True)
        raise FloatingPointError("log p(x) is not finite, though every layer's output is: check the prior")

    def guards_tripped(self) -> torch.Tensor:
        """Whether a deferred guard recorded a failure since the last :meth:`check_guards`: a non-finite
        ``log p(x)`` (``check_finite``) or a reversible backward's drift beyond ``max_drift``. A 0-dim bool tensor
        on the device, computed without a host read (``fastflow.train`` skips optimizer updates on it)."""
        nonfinite, drifted = self._nonfinite_seen, drift_tripped(self)
        if drifted is None:
            return nonfinite
        # a finite-check record on another device predates a move (or check_finite is off): dropped, as the next
        # record would drop it, rather than copied (a copy off the device would be a host sync)
        return drifted if nonfinite.device != drifted.device else nonfinite | drifted

    def check_guards(self, x: torch.Tensor | None = None, context: torch.Tensor | None = None) -> None:
        """Read the deferred guards (two small host transfers) and clear them; raise if one tripped since the
        last call.

        ``FloatingPointError`` if a forward saw a non-finite ``log p(x)``: given the batch that produced it
        (``x``, with its ``context``), the forward is rerun on it layer by layer to name the first layer with a
        non-finite output or log-det, as the immediate check does (a ``ValueError`` if ``x`` or a floating-point
        ``context`` is not finite); the weights must still be the ones of that forward. ``ReconstructionError``
        naming the reversible chains whose backward rebuilt its input with a drift beyond ``max_drift``
        (:func:`~fastflow.nn.reversible.read_drift_guard`): the gradients of that backward were computed at
        wrong points.
        """
        nonfinite = self._nonfinite_seen.item()
        self._nonfinite_seen.zero_()
        drift_error = read_drift_guard(self)  # read and cleared: raised, or chained to the error raised instead
        if nonfinite:
            if x is not None:
                try:
                    self._diagnose(x, context)
                except Exception as err:
                    if drift_error is None:
                        raise
                    raise err from drift_error
            raise FloatingPointError(
                "log p(x) was not finite in a forward since the guards were last checked: pass that batch to "
                "check_guards to name the layer"
            ) from drift_error
        if drift_error is not None:
            raise drift_error

    def encode_with_log_prob(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``(latents, log p(x))``: the latents leave at each split, the last one is the top latent."""
        latents, logdet, log_prior = self.encode_with_logdet(x, context)
        return latents, logdet + log_prior

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample continuous log-density ``log p(x | context)`` in nats, shape ``(B,)``, float32 (float64 for
        a float64 model)."""
        return self.encode_with_log_prob(x, context)[1]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`log_prob`: ``model(x, context)``, so that ``torch.compile(model)`` (which compiles ``forward``
        only) and module hooks see the density."""
        return self.log_prob(x, context)

    def bits_per_dim(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample discrete NLL in bits per dimension (see the class docstring), shape ``(B,)``; images only."""
        if self.n_bins is None:
            raise ValueError(f"bits_per_dim needs quantized data (n_bins): {type(self).__name__} has none")
        d = self.num_dims
        return (-self.log_prob(x, context) + d * math.log(self.n_bins)) / (d * math.log(2.0))

    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The latents of ``x``: one per split, then the top latent."""
        return self.encode_with_log_prob(x, context)[0]

    def decode(
        self,
        latents: list[torch.Tensor | None],
        context: torch.Tensor | None = None,
        temperature: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Exact inverse of :meth:`encode`; a ``None`` split latent is drawn from its prior at ``temperature`` (from
        ``generator`` where given: on its device, then moved, so a CPU generator gives the same draws for a model
        on any device; else from the global RNG). Differentiable (the split priors' draws are reparameterised).
        With ``check_finite``, a non-finite result (from non-finite latents or context) raises
        ``FloatingPointError`` (one host read; not where guards are deferred, whose step records a non-finite loss
        instead). A class-conditional model's labels are checked as :meth:`log_prob` checks them (the prior's
        shift is not part of the inverse: they do not change the result)."""
        if self.prior.conditional and not guards_deferred(self.floating_parameter()):
            self.prior.check_labels(self._prior_context(context))
        return self._decode(latents, context, temperature, generator)

    def _decode(
        self,
        latents: list[torch.Tensor | None],
        context: torch.Tensor | None,
        temperature: float,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """:meth:`decode` without the label check (:meth:`rsample`'s prior has made it)."""
        _check_temperature(temperature)
        check_generator(generator)
        if not isinstance(latents, (list, tuple)):
            raise TypeError(
                f"latents must be a list of {len(self.blocks)} tensors (encode's output), got {type(latents).__name__}"
            )
        if len(latents) != len(self.blocks):
            raise ValueError(f"latents must be a list of {len(self.blocks)} tensors, got {len(latents)}")
        x = latents[-1]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"latents[-1] (the top latent) must be a tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.prior.shape or x.dim() == 0:
            shape = ", ".join(map(str, self.prior.shape))
            raise ValueError(f"latents[-1] (the top latent) must have shape (B, {shape}), got {tuple(x.shape)}")
        parameter = self.floating_parameter()
        if x.dtype != parameter.dtype:
            dtype = parameter.dtype
            raise TypeError(f"latents[-1] is {x.dtype} but the model is {dtype}: convert one, e.g. .to({dtype})")
        _check_device("latents[-1]", x, parameter.device)
        for i, z in enumerate(latents[:-1]):
            if z is not None and not isinstance(z, torch.Tensor):
                raise TypeError(f"latents[{i}] must be None or a tensor (a split latent), got {type(z).__name__}")
            if z is not None and z.dim() != x.dim():
                raise ValueError(f"latents[{i}] must be a split latent of rank {x.dim()}, got shape {tuple(z.shape)}")
        sizes = {i: z.shape[0] for i, z in enumerate(latents) if isinstance(z, torch.Tensor)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"latents must share one batch size, got batch sizes {sizes} (index: size)")
        self._check_context(context, x.shape[0], x.device)
        block_context = self._block_context(context)
        for i in reversed(range(len(self.blocks))):
            if i < len(self.splits):
                try:
                    x = self.splits[i].inverse(x, latents[i], temperature, generator)
                except (TypeError, ValueError) as err:  # the split names z_out (latents[i]) and z_keep (from above)
                    raise type(err)(f"decoding latents[{i}]: {err}") from err
            x, _ = self.blocks[i].inverse(x, block_context)
        if self.check_finite and not guards_deferred(x):
            if not _read_check(torch.isfinite(x).all()):
                raise FloatingPointError(
                    "the decoded samples hold non-finite values (NaN/Inf): check the latents and the context"
                )
        return x

    def rsample(
        self,
        n: int,
        context: torch.Tensor | None = None,
        temperature: float = 1.0,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` reparameterised draws ``x = f^-1(z)`` with ``z = mean + temperature * std * eps``: differentiable
        w.r.t. the parameters (and ``context``), for objectives over samples (variational inference). In the
        model's dtype, on its device. A conditional model takes a ``context`` of batch ``n``, or of batch 1 shared
        by the ``n`` draws. ``eps`` comes from ``generator`` where given (a ``torch.Generator``, on any device:
        the draws are made on its device, then moved; one seeded CPU generator gives the same samples on the CPU
        and on a GPU), else from the global RNG."""
        if isinstance(n, bool) or not hasattr(n, "__index__"):
            raise TypeError(f"n must be an int, got {type(n).__name__} {n!r}")
        n = operator.index(n)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        _check_temperature(temperature)
        check_generator(generator)
        # a batch-1 context is shared by the draws (a 1-D one only as class labels: features are (1, F))
        shared = isinstance(context, torch.Tensor) and context.dim() > 0 and context.shape[0] == 1 and n > 1
        if shared and (context.dim() > 1 or not self._blocks_use_context):
            context = context.expand(n, *context.shape[1:])
        parameter = self.floating_parameter()
        self._check_context(context, n, parameter.device)
        drawn_from = {} if generator is None else {"generator": generator}  # a prior of the older signature works
        top = self.prior.sample(
            n, temperature, self._prior_context(context), parameter.device, parameter.dtype, **drawn_from
        )
        latents: list[torch.Tensor | None] = [None] * len(self.splits) + [top]
        return self._decode(latents, context, temperature, generator)

    def sample(
        self,
        n: int,
        context: torch.Tensor | None = None,
        temperature: float | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``n`` draws from the model without a graph (:meth:`rsample` under ``torch.no_grad``) at ``temperature``,
        by default :attr:`default_temperature`: 0.7 for images (1.0 gives noisy samples), 1.0 otherwise; from
        ``generator`` where given (see :meth:`rsample`)."""
        temperature = self.default_temperature if temperature is None else temperature
        with torch.no_grad():
            return self.rsample(n, context, temperature, generator=generator)

    @property
    def default_temperature(self) -> float:
        """The temperature :meth:`sample` uses by default: 0.7 for images (``n_bins`` set), else 1.0."""
        return 1.0 if self.n_bins is None else 0.7

    def save_pretrained(self, directory: str) -> None:
        """Write ``directory/model.safetensors`` (weights) and ``directory/config.json`` (class and config),
        the shareable format (``directory`` a str or path-like); see :func:`fastflow.checkpoint.save_pretrained`."""
        from fastflow.checkpoint import save_pretrained  # local: checkpoint imports the models

        save_pretrained(directory, self)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu") -> FlowModel:
        """The model that :meth:`save_pretrained` wrote to ``directory`` (a str or path-like), on
        ``map_location``; loads no code, validates ``config.json`` and the weights, and on a subclass
        (``Glow.from_pretrained``) refuses a folder holding another class (``ValueError``)."""
        from fastflow.checkpoint import load_pretrained  # local: checkpoint imports the models

        return load_pretrained(directory, map_location=map_location, expected_class=cls)


def _check_temperature(temperature: object) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):  # numpy scalars too
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__} {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")


def _read_check(flag: torch.Tensor) -> bool:
    """``bool(flag)``, a finite check's host read; under ``torch.func.vmap``, which cannot batch a read, a
    ``RuntimeError`` saying to switch the check off (vmap's own error asks to file an issue with PyTorch)."""
    try:
        return bool(flag)
    except RuntimeError as err:
        if not functorch_transforms_active():
            raise
        raise RuntimeError(
            "check_finite reads the device, which torch.func.vmap cannot batch: set model.check_finite = False "
            "under vmap"
        ) from err


def _raise_if_nonfinite_inputs(x: torch.Tensor, context: object, cause: BaseException | None = None) -> None:
    """``ValueError`` (from ``cause``) naming ``x``, or a floating-point ``context``, if it holds NaN or Inf."""
    for name, value in (("x", x), ("context", context)):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            count = int((~torch.isfinite(value)).sum())
            message = f"{name} holds {count} non-finite values (NaN/Inf): the model needs finite inputs"
            raise ValueError(message) from cause


def _raise_if_nonfinite(where: str, out: torch.Tensor, log_term: torch.Tensor, what: str = "log-det") -> None:
    if not bool(torch.isfinite(out).all()):
        raise FloatingPointError(f"non-finite output at {where}")
    if not bool(torch.isfinite(log_term).all()):
        raise FloatingPointError(f"non-finite {what} at {where}")


def _added(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """``total + term``, or ``term`` where there is no total yet."""
    return term if total is None else total + term


def _check_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    """``ValueError`` naming ``name`` unless ``t`` is on the model's ``device`` (it failed deep in a layer)."""
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the model is on {device}: move one, e.g. {name}.to('{device}')")
