"""Monotonic rational-quadratic spline (RQS) transform, element-wise (Durkan et al., 2019, "Neural Spline Flows").

Parameters: ``x`` has shape ``(B, ...)`` and ``raw`` shape ``(*x.shape, 3K - 1)``: along its last dim ``K`` raw bin
widths, ``K`` raw bin heights and ``K - 1`` raw interior knot derivatives, in that order (a conditioner's
``(B, D * (3K - 1))`` output is ``.view(B, D, 3K - 1)``; channel layouts are the caller's to arrange).

Math, for ``K`` bins on ``[-bound, bound]``:
- widths ``w = min_width + (1 - K min_width) softmax(raw_w)``, heights likewise with ``min_height``; knots
  ``x_j = -bound + 2 bound cumsum(w)_j``, ``y_j`` likewise, the last exactly ``bound``. A bin's size is
  ``2 bound w_k`` itself rather than a difference of knots (which is what nflows and zuko take): equal in exact
  arithmetic, but accurate to float32 rounding for small bins too.
- knot derivatives ``d_j = min_derivative + softplus(raw_d[j - 1])`` for the ``K - 1`` interior knots and
  ``1`` at ``+-bound``, the slope of the identity tails: outside ``[-bound, bound]`` ``y = x`` with log-det 0.
- in bin ``k`` (``xl <= x <= xl + W``, ``yl``, ``H``, ``s = H / W``, ``u = (x - xl) / W``, ``t = u (1 - u)``,
  ``d0 = d_k``, ``d1 = d_{k+1}``): ``y = yl + H (s u^2 + d0 t) / (s + (d0 + d1 - 2 s) t)`` and
  ``dy/dx = s^2 (d1 u^2 + 2 s t + d0 (1 - u)^2) / (s + (d0 + d1 - 2 s) t)^2``.
- inverse: ``u`` is the root in ``[0, 1]`` of a quadratic, in the form that does not cancel
  (:mod:`fastflow.kernels.spline`); ``x = xl + u W``.
- positions are measured from the nearer knot (in a bin's upper half ``1 - u`` from the right knot, and ``y``
  down from its right knot), so knots and the bound map to knots and the bound exactly and a round trip
  measures ``y`` from the same knot both ways; results are clamped between their bin's knots.
Log-det per sample: ``sum(log dy/dx)`` over every non-batch element (negated for the inverse), ``(B,)`` float32
(float64 for float64 inputs). An element whose input or any raw parameter is NaN has a NaN log-det and NaN
gradients for its input and all its raw parameters, on every backend and path (autograd of the eager twin, the
closed form, the fused backwards), whether or not its value reads the NaN and whatever the upstream gradients.

Conventions: nflows' ``unconstrained_rational_quadratic_spline`` with linear tails (its ``tail_bound`` is
``bound``, ``min_bin_width`` etc. the minimums, its raw widths, heights and derivatives the three parts of
``raw``; it pads the raw derivatives so that the end derivatives are 1, as here), up to the rounding of the
bin sizes above; nflows' coupling layer also divides the raw sizes by ``sqrt(hidden_features)``, a layer's
choice. zuko's ``MonotonicRQSTransform`` has the same spline and tails but other maps from raw parameters:
softmax without minimum sizes of soft-clipped raw sizes, and ``exp`` of soft-clipped raw derivatives; sizes
``w`` and derivatives ``d`` from here are zuko's for raw parameters ``clip^-1(log w)`` and ``clip^-1(log d)``
(tested in ``tests/ops/test_spline_parity.py``). Its default ``bound`` is 5.

Dispatch: the public functions run the eager references (autograd through ATen, the math in
:mod:`fastflow.ops.spline_eager`) on the ``"eager"`` backend, except :func:`rq_spline` in float32 / float64 while
``torch.compile`` traces, which takes the same forward with closed-form gradients
(:mod:`fastflow.ops.spline_compiled`: Inductor fuses them, where autograd's ``gather`` and ``cumsum`` backwards
stay library calls); and the torch.library ops ``fastflow::rq_spline_fwd`` / ``fastflow::rq_spline_inv``
(fused Triton kernels of :mod:`fastflow.kernels.spline`) on ``"triton"`` / ``"interpret"``. Both ops'
backwards are the fused op ``fastflow::rq_spline_bwd`` (one pass: gradients to the input and to all raw
parameters), saving the op's input and ``raw``; neither is differentiable again. Registration as in
:mod:`fastflow.ops.coupling` (:data:`fastflow.ops._registration.TRACEABLE`): triton ops where Triton compiles,
custom ops otherwise.

Reversible backprop: :func:`rq_spline_backward_from_output` takes the forward *output* ``y`` and returns the
rebuilt ``x`` with the gradients in one fused pass.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from fastflow.backend import resolve_backend
from fastflow.ops import spline_eager as eager
from fastflow.ops._checks import check_float_tensor, check_same_shape, int_at_least, logdet_dtype, upcasts
from fastflow.ops._registration import TRACEABLE, direct_autograd, kernel_function, registration, use_library_op
from fastflow.ops.spline_compiled import rq_spline_closed_form
from fastflow.warning_location import warn_at_caller

__all__ = [
    "HARD_MAX_LAYER_BINS",
    "MAX_LAYER_BINS",
    "check_layer_bins",
    "rq_spline",
    "rq_spline_inverse",
    "rq_spline_ref",
    "rq_spline_inverse_ref",
    "rq_spline_backward_from_output",
    "rq_spline_backward_from_output_ref",
]


def _ref(
    v: torch.Tensor, raw: torch.Tensor, spline: eager.Spline, inverse: bool, upcast: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = v.dtype
    if upcast:
        v, raw = v.to(logdet_dtype(out_dtype)), raw.to(logdet_dtype(out_dtype))
    out, log_slope = (eager.inverse if inverse else eager.forward)(v, raw, spline)
    return out.to(out_dtype), eager.per_sample_sum(log_slope, logdet_dtype(out_dtype))


def rq_spline_ref(
    x: torch.Tensor,
    raw: torch.Tensor,
    bins: int,
    bound: float = 3.0,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager forward ``(y, logdet)``, differentiable through ATen; ``upcast`` computes in float32 (float64 for
    float64) and casts ``y`` back. Arguments as :func:`rq_spline`."""
    spline = _checked(bins, bound, min_width, min_height, min_derivative)
    _check_args("x", x, raw, spline)
    return _ref(x, raw, spline, False, upcast)


def rq_spline_inverse_ref(
    y: torch.Tensor,
    raw: torch.Tensor,
    bins: int,
    bound: float = 3.0,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager inverse ``(x, -logdet)``; arguments as :func:`rq_spline_ref`."""
    spline = _checked(bins, bound, min_width, min_height, min_derivative)
    _check_args("y", y, raw, spline)
    return _ref(y, raw, spline, True, upcast)


def rq_spline_backward_from_output_ref(
    y: torch.Tensor,
    raw: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    bins: int,
    bound: float = 3.0,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reversible backward ``(x, grad_x, grad_raw)``: ``x`` is the inverse of ``y``, the gradients are
    autograd's of the eager forward at ``x`` for upstream ``grad_y`` and ``grad_logdet`` (``(B,)`` or None for
    zero). ``upcast`` computes in float32; results have ``y``'s dtype."""
    spline = _checked(bins, bound, min_width, min_height, min_derivative)
    _check_args("y", y, raw, spline)
    _check_upstream(grad_y, grad_logdet, y)
    out_dtype = y.dtype
    acc = logdet_dtype(out_dtype) if upcast else out_dtype
    y, raw, grad_y = y.to(acc), raw.to(acc), grad_y.to(acc)
    with torch.no_grad():
        x = eager.inverse(y, raw, spline)[0]
    with torch.enable_grad():
        x_in, raw_in = x.detach().requires_grad_(), raw.detach().requires_grad_()
        out, log_slope = eager.forward(x_in, raw_in, spline)
        logdet = eager.per_sample_sum(log_slope, logdet_dtype(out_dtype))
        gl = torch.zeros_like(logdet) if grad_logdet is None else grad_logdet.to(logdet.dtype)
        grad_x, grad_raw = torch.autograd.grad((out, logdet), (x_in, raw_in), (grad_y, gl))
    return x.to(out_dtype), grad_x.to(out_dtype), grad_raw.to(out_dtype)


class _SplineOps(NamedTuple):
    """The fused ops of one registration (:func:`_define_ops`)."""

    fwd: Any
    inv: Any
    bwd: Any


def _define_ops(namespace: str, traceable: bool) -> _SplineOps:
    """Register ``{namespace}::rq_spline_fwd``, ``rq_spline_inv`` and ``rq_spline_bwd`` with their autograd.

    ``traceable``: as ``torch.library.triton_op`` launching through ``torch.library.wrap_triton``; else as
    ``torch.library.custom_op`` with the fake kernels below (same schemas, results and gradients). The
    package's ops are ``_define_ops("fastflow", TRACEABLE)``; tests build the other one under another namespace.
    """
    define, launch = registration(traceable)
    if traceable:
        # bound by name: triton_op scans the op's source for the kernels it launches, following calls by name
        from fastflow.kernels.spline import rq_spline_backward, rq_spline_forward
    else:
        rq_spline_forward = kernel_function("spline", "rq_spline_forward")
        rq_spline_backward = kernel_function("spline", "rq_spline_backward")

    # Optional[...] rather than "X | None" in the op signatures: torch infers the schema from these strings and
    # must evaluate them on Python 3.9 too
    @define(f"{namespace}::rq_spline_fwd", mutates_args=())
    def fwd(
        u: torch.Tensor, raw: torch.Tensor, bound: float, min_width: float, min_height: float, min_derivative: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused forward ``(y, logdet)``; ``raw`` is ``(*u.shape, 3K - 1)``."""
        return rq_spline_forward(u, raw, bound, min_width, min_height, min_derivative, False, **launch)

    @define(f"{namespace}::rq_spline_inv", mutates_args=())
    def inv(
        u: torch.Tensor, raw: torch.Tensor, bound: float, min_width: float, min_height: float, min_derivative: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused inverse ``(x, -logdet)``."""
        return rq_spline_forward(u, raw, bound, min_width, min_height, min_derivative, True, **launch)

    @define(f"{namespace}::rq_spline_bwd", mutates_args=())
    def bwd(
        u: torch.Tensor,
        raw: torch.Tensor,
        grad: torch.Tensor,
        grad_logdet: Optional[torch.Tensor],
        bound: float,
        min_width: float,
        min_height: float,
        min_derivative: float,
        mode: str,
    ) -> list[torch.Tensor]:
        """Fused backward ``[grad_u, grad_raw]`` (``mode`` "forward" or "inverse"), or ``[grad_x, grad_raw, x]``
        from the forward output ``u = y`` (``mode`` "rebuild")."""
        outs = rq_spline_backward(
            u, raw, grad, grad_logdet, bound, min_width, min_height, min_derivative, mode, **launch
        )
        return [t for t in outs if t is not None]

    if not traceable:

        @fwd.register_fake
        @inv.register_fake
        def fwd_fake(
            u: torch.Tensor, raw: torch.Tensor, bound: float, min_width: float, min_height: float, min_d: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return u.new_empty(u.shape), u.new_empty(u.shape[0], dtype=logdet_dtype(u.dtype))

        @bwd.register_fake
        def bwd_fake(
            u: torch.Tensor,
            raw: torch.Tensor,
            grad: torch.Tensor,
            grad_logdet: torch.Tensor | None,
            bound: float,
            min_width: float,
            min_height: float,
            min_derivative: float,
            mode: str,
        ) -> list[torch.Tensor]:
            rebuilt = [u.new_empty(u.shape)] if mode == "rebuild" else []
            return [u.new_empty(u.shape), u.new_empty(raw.shape), *rebuilt]

    fwd.register_autograd(_backward("forward", bwd), setup_context=_setup_context)
    inv.register_autograd(_backward("inverse", bwd), setup_context=_setup_context)
    return _SplineOps(fwd, inv, bwd)


def _setup_context(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]
) -> None:
    u, raw, *constants = inputs
    ctx.save_for_backward(u, raw)
    ctx.constants = constants
    ctx.set_materialize_grads(False)


def _backward(mode: str, bwd: Any) -> Any:
    """The backward of the forward (``mode`` "forward") or of the inverse ("inverse"), running the fused
    backward ``bwd`` (the op ``rq_spline_bwd`` or its direct twin)."""

    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor | None, grad_logdet: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if grad is None and grad_logdet is None:
            return (None,) * 6
        u, raw = ctx.saved_tensors
        grad = torch.zeros_like(u) if grad is None else grad
        grad_u, grad_raw = bwd(u, raw, grad, grad_logdet, *ctx.constants, mode)
        return grad_u, grad_raw, None, None, None, None

    return backward


def _direct_ops() -> _SplineOps:
    """The direct twins of the ops (:func:`fastflow.ops._registration.direct_autograd`): the same launchers,
    ``setup_context`` and backwards, without ``torch.library``'s dispatch."""
    forward = kernel_function("spline", "rq_spline_forward")
    backward = kernel_function("spline", "rq_spline_backward")

    def fwd(u: torch.Tensor, raw: torch.Tensor, *constants: float) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(u, raw, *constants, False)

    def inv(u: torch.Tensor, raw: torch.Tensor, *constants: float) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(u, raw, *constants, True)

    def bwd(*args: Any) -> list[torch.Tensor]:
        return [t for t in backward(*args) if t is not None]

    return _SplineOps(
        direct_autograd(fwd, _setup_context, _backward("forward", bwd), name="rq_spline"),
        direct_autograd(inv, _setup_context, _backward("inverse", bwd), name="rq_spline_inverse"),
        bwd,
    )


_OPS = _define_ops("fastflow", TRACEABLE)
# called by their torch.ops names, which every supported torch traces
_LIBRARY = _SplineOps(
    torch.ops.fastflow.rq_spline_fwd, torch.ops.fastflow.rq_spline_inv, torch.ops.fastflow.rq_spline_bwd
)
_DIRECT = _direct_ops()


def _ops() -> _SplineOps:
    """The ``torch.library`` ops while tracing or under a dispatch mode, else their direct twins."""
    return _LIBRARY if use_library_op() else _DIRECT


MAX_LAYER_BINS = 500
"""The most bins a spline layer takes without a warning. Layers keep the op's default minimum bin width and height,
``1e-3`` of ``[-bound, bound]``: ``bins * 1e-3`` of the range is fixed and only the rest, ``1 - bins * 1e-3``,
follows the softmax of the raw sizes (it scales their gradients). At most 500 bins keeps at least half of the range
learnable; at 1000 every bin is the minimum and the raw widths and heights get zero gradients. Up to
:data:`HARD_MAX_LAYER_BINS` a layer is still built (with a warning: layers saved before this limit load)."""

HARD_MAX_LAYER_BINS = 1000
"""The most bins a spline layer takes at all: beyond, the minimum sizes would exceed the range."""


def check_layer_bins(bins: object) -> int:
    """``bins`` of a spline layer, or a TypeError / ValueError naming it: an int in ``[2, HARD_MAX_LAYER_BINS]``
    (one bin fills ``[-bound, bound]`` with end derivatives 1: the identity, whatever the conditioner says), with a
    ``UserWarning`` above :data:`MAX_LAYER_BINS`, where the minimum sizes fix more than half of the range."""
    int_at_least("bins", bins, 2)
    if bins > HARD_MAX_LAYER_BINS:  # type: ignore[operator]
        raise ValueError(f"bins must be <= {HARD_MAX_LAYER_BINS} (each bin is at least 1e-3 of the range), got {bins}")
    if bins > MAX_LAYER_BINS:  # type: ignore[operator]
        warn_at_caller(
            f"bins should be <= {MAX_LAYER_BINS}: each bin is at least 1e-3 of [-bound, bound] wide and high, and "
            f"above {MAX_LAYER_BINS} bins those minimums fix more than half of the range (at 1000 all of it, leaving "
            f"no learnable widths or heights), got {bins}",
            UserWarning,
        )
    return bins  # type: ignore[return-value]


def _checked(
    bins: object, bound: object, min_width: object, min_height: object, min_derivative: object
) -> eager.Spline:
    """The spline's constants, or a TypeError / ValueError naming the first bad one."""
    if isinstance(bins, bool) or not isinstance(bins, int):
        raise TypeError(f"bins must be an int, got {type(bins).__name__}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    values = {"bound": bound, "min_width": min_width, "min_height": min_height, "min_derivative": min_derivative}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(value).__name__}")
        if not 0 < value < math.inf:  # finite and > 0 (NaN fails too); a comparison Dynamo folds on constants
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    for name in ("min_width", "min_height"):
        if values[name] * bins > 1:
            raise ValueError(f"{name} * bins must be <= 1 (the bins fill [-bound, bound]), got {values[name]} * {bins}")
    return eager.Spline(bins, float(bound), float(min_width), float(min_height), float(min_derivative))


def _check_args(x_name: str, x: torch.Tensor, raw: torch.Tensor, spline: eager.Spline) -> None:
    check_float_tensor(x_name, x, min_dim=2)
    check_float_tensor("raw", raw)
    params = 3 * spline.bins - 1
    if tuple(raw.shape) != (*x.shape, params):
        raise ValueError(
            f"raw must have shape {x_name}.shape + (3 * bins - 1,) = {(*x.shape, params)}, got {tuple(raw.shape)}"
        )
    if raw.dtype != x.dtype:
        raise TypeError(f"raw must have the dtype of {x_name} ({x.dtype}), got {raw.dtype}")
    if raw.device != x.device:
        raise ValueError(f"raw must be on {x.device} like {x_name}, got {raw.device}")
    _check_constants_fit(spline, torch.float64 if x.dtype == torch.float64 else torch.float32)


def _check_constants_fit(spline: eager.Spline, compute: torch.dtype) -> None:
    """ValueError naming the constant unless the spline is well defined in ``compute`` (float32 for every input
    but float64): ``2 * bound`` finite, and the smallest bin (``2 * bound * min_width`` wide, likewise high) at
    least four rounding steps of ``bound``, so that no knot rounds onto its neighbour (a bin of zero width put
    ``x = -bound`` in the second bin and mapped it far from ``-bound``)."""
    info = torch.finfo(compute)
    if spline.bound > info.max / 4:
        limit = info.max / 4
        raise ValueError(f"bound must be <= {limit:.3g} ({compute}: 2 * bound must stay finite), got {spline.bound}")
    for name, value in (("min_width", spline.min_width), ("min_height", spline.min_height)):
        if value < 2 * info.eps:
            raise ValueError(
                f"{name} must be >= {2 * info.eps:.3g} in {compute} (a smaller bin can round to zero size), got {value}"
            )


def _check_upstream(grad_y: torch.Tensor, grad_logdet: torch.Tensor | None, y: torch.Tensor) -> None:
    check_same_shape("grad_y", check_float_tensor("grad_y", grad_y), "y", y)
    if grad_logdet is None:
        return
    check_float_tensor("grad_logdet", grad_logdet)
    if tuple(grad_logdet.shape) != (y.shape[0],):
        raise ValueError(f"grad_logdet must have shape ({y.shape[0]},), got {tuple(grad_logdet.shape)}")
    if grad_logdet.device != y.device:
        raise ValueError(f"grad_logdet must be on {y.device} like y, got {grad_logdet.device}")


KERNEL_MAX_BINS = 32
"""The most bins the fused kernels take; more bins run the eager twin on every backend. A kernel holds a tile of
``next_power_of_2(bins)`` bins per element in registers: up to 32 bins every direction compiles without spilling
for sm_80 and sm_90 (checked ahead of time, ``kernels/spline.py``'s ``aot_specs``); at 64 the backward of the
inverse spills, and at 1000 bins one kernel spilled some 24,000 instructions and took minutes to compile."""


def _use_kernel(x: torch.Tensor, spline: eager.Spline) -> bool:
    return spline.bins <= KERNEL_MAX_BINS and resolve_backend(x) != "eager"


def rq_spline(
    x: torch.Tensor,
    raw: torch.Tensor,
    bins: int,
    bound: float = 3.0,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spline forward ``(y, logdet)`` on the backend chosen by :mod:`fastflow.backend`.

    ``x`` is ``(B, ...)`` and ``raw`` ``(*x.shape, 3 * bins - 1)`` (raw widths, heights, interior derivatives),
    same float dtype and device, any strides. ``y`` has ``x``'s shape and dtype (contiguous on the Triton
    backends), ``logdet`` is ``(B,)`` float32 (float64 for float64). Identity with log-det 0 outside
    ``[-bound, bound]``. ``min_width * bins`` and ``min_height * bins`` must be ``<= 1``. Differentiable in
    ``x`` and ``raw``. float16 / bfloat16 inputs are computed in float32 on every backend, rounded once. More than
    :data:`KERNEL_MAX_BINS` bins run the eager twin on every backend.
    """
    spline = _checked(bins, bound, min_width, min_height, min_derivative)
    _check_args("x", x, raw, spline)
    if _use_kernel(x, spline):
        return _ops().fwd(x, raw, *spline[1:])
    if torch.compiler.is_compiling() and x.dtype in (torch.float32, torch.float64):
        return rq_spline_closed_form(x, raw, spline)
    return _ref(x, raw, spline, False, upcasts(x))


def rq_spline_inverse(
    y: torch.Tensor,
    raw: torch.Tensor,
    bins: int,
    bound: float = 3.0,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spline inverse ``(x, -logdet)`` on the chosen backend; arguments as :func:`rq_spline`."""
    spline = _checked(bins, bound, min_width, min_height, min_derivative)
    _check_args("y", y, raw, spline)
    if _use_kernel(y, spline):
        return _ops().inv(y, raw, *spline[1:])
    return _ref(y, raw, spline, True, upcasts(y))


def rq_spline_backward_from_output(
    y: torch.Tensor,
    raw: torch.Tensor,
    grad_y: torch.Tensor,
    grad_logdet: torch.Tensor | None,
    bins: int,
    bound: float = 3.0,
    min_width: float = 1e-3,
    min_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reversible backward ``(x, grad_x, grad_raw)`` from the forward output ``y``.

    Rebuilds ``x`` = inverse of ``y`` and returns the gradients of :func:`rq_spline` at ``x`` for upstream
    ``grad_y`` (like ``y``) and ``grad_logdet`` (``(B,)``, or None for zero); one fused pass on the Triton
    backends. New tensors in ``y``'s dtype. Not differentiable (meant for a reversible container's backward).
    """
    spline = _checked(bins, bound, min_width, min_height, min_derivative)
    _check_args("y", y, raw, spline)
    _check_upstream(grad_y, grad_logdet, y)
    if not _use_kernel(y, spline):
        return rq_spline_backward_from_output_ref(y, raw, grad_y, grad_logdet, *spline, upcast=upcasts(y))
    grad_x, grad_raw, x = _ops().bwd(y, raw, grad_y, grad_logdet, *spline[1:], "rebuild")
    return x, grad_x, grad_raw
