"""``spline``: the rational-quadratic spline transform of a coupling, forward + backward, across providers.

The transform of :class:`fastflow.nn.SplineCoupling` on vectors: ``x`` ``(B, D)`` and ``raw`` ``(B, D, 3K - 1)``
(a conditioner's output viewed in place), ``(y, logdet) = spline(x, raw)``, then the gradients w.r.t. ``x`` and
``raw`` for fixed upstream ``grad_y`` and ``grad_logdet``. Sizes: ``B`` in :data:`BATCHES`, ``D`` in
:data:`FEATURES`, ``K`` bins in :data:`BINS` (``--quick``: :data:`QUICK_SIZES`), ``x ~ 1.5 N(0, 1)`` (a few
percent beyond ``bound = 3``, in the identity tails) and ``raw ~ N(0, 1)``.

Providers:

- ``eager``: :func:`fastflow.ops.spline.rq_spline_ref`, autograd through ATen;
- ``fused``: :func:`fastflow.ops.spline.rq_spline` on the Triton backend (CUDA only: on the CPU the kernels run
  only under the interpreter, whose times say nothing of speed);
- ``compile``: ``torch.compile`` of :func:`fastflow.ops.spline.rq_spline` on the eager backend: in float32 and
  float64 the eager twin's forward with closed-form gradients (:mod:`fastflow.ops.spline_compiled`), in the
  half dtypes autograd through the eager twin;
- ``zuko``: ``zuko.transforms.MonotonicRQSTransform`` on the same raw tensors (its own map from raw parameters:
  soft-clipped softmax sizes, ``exp`` derivatives; the same spline, its parity is tested in
  ``tests/ops/test_spline_parity.py``), ``call_and_ladj`` with the log-det summed per sample;
- ``nflows``: ``unconstrained_rational_quadratic_spline`` with linear tails, where nflows is installed (a row
  saying so where it is not).

``compile`` and ``fused`` are checked before they are timed (:func:`_check`): against float64 eager, their mean
errors must be at most twice eager's float32 ones and their largest errors at most ``MAX_ERROR_FACTOR`` times
eager's, plus a small ``atol``; the gradients of the few elements within a few ulps of a knot, whose bin a
float32 evaluation may pick either way (:func:`_near_knot`), are left out of that but must be finite (their
count is the rows' ``near_knot``). A fused mismatch raises; a compiled one is recorded in its row
(``skipped: mismatch``) and not timed. zuko's and nflows' maps differ, so they are timed only.
``median_ms`` is the median wall time of forward + backward, the providers timed side by side in rounds on the
CPU (:func:`benchmarks.common.interleaved_medians_ms`; CUDA events on CUDA); ``gbps`` is
the fused kernels' byte count, ``(3P + 5) E`` per element of ``x`` (``P = 3K - 1``, ``E`` the element size;
:mod:`fastflow.kernels.spline`), over that time for every provider (an effective rate for the others, which
move more); ``saved_mb`` is what the provider keeps saved for backward:
the bytes of the distinct storages its autograd graph saves (``torch.autograd.graph.saved_tensors_hooks``),
inputs included; ``peak_mem_mb`` (CUDA) what one forward + backward adds at its peak.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

import fastflow
from benchmarks.common import SKIPPED, Budget, MismatchError, interleaved_medians_ms, peak_mib
from fastflow.backend import interpreter_enabled, triton_available
from fastflow.ops import spline_eager as eager
from fastflow.ops.spline import rq_spline, rq_spline_ref

__all__ = ["BATCHES", "BINS", "FEATURES", "QUICK_SIZES", "grid_sizes", "run", "saved_bytes"]

BATCHES = (4096, 65536)
FEATURES = (8, 64)
BINS = (8, 16)
TARGET_SIZE = (4096, 16, 8)
"""Issue 15's target size (``B``, ``D``, ``K``): timed first, before the grid."""
QUICK_SIZES = (TARGET_SIZE, (4096, 64, 16))


def grid_sizes() -> list[tuple[int, int, int]]:
    """The full run's sizes: :data:`TARGET_SIZE`, then the grid with the batch sizes taken in turn, the largest
    ``D`` and ``K`` first within each: a run cut by its time box (``make gpu-check``'s spline step) has rows at
    both batch sizes, not only at the first."""
    per_batch = [
        [(b, d, k) for d in sorted(FEATURES, reverse=True) for k in sorted(BINS, reverse=True)] for b in BATCHES
    ]
    return [TARGET_SIZE, *(size for sizes in zip(*per_batch) for size in sizes)]


BOUND = 3.0
_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # slack of the three-way check
MAX_ERROR_FACTOR = 8.0
"""How many times eager's largest error a checked provider's largest error may be (see :func:`_check`)."""
KNOT_ULPS = 32
"""Within how many ``eps(dtype) bound`` of a knot an element's bin counts as ambiguous (:func:`_near_knot`)."""
_DEFAULTS = inspect.signature(rq_spline).parameters
_MINIMUMS = tuple(float(_DEFAULTS[n].default) for n in ("min_width", "min_height", "min_derivative"))
"""``rq_spline``'s default minimum width, height and derivative, which the providers take."""
_ROUNDS = {True: 5, False: 10}  # CPU rounds of three timed calls for quick / full runs (CUDA: common.CUDA_SAMPLES)

Spline = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _zuko(bins: int) -> Spline:
    from zuko.transforms import MonotonicRQSTransform

    def spline(x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, ladj = MonotonicRQSTransform(*raw.split([bins, bins, bins - 1], dim=-1), bound=BOUND).call_and_ladj(x)
        return y, ladj.sum(dim=1)

    return spline


def _nflows(bins: int) -> Spline:
    from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

    def spline(x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        widths, heights, derivatives = raw.split([bins, bins, bins - 1], dim=-1)
        y, logabsdet = unconstrained_rational_quadratic_spline(
            x, widths, heights, derivatives, inverse=False, tails="linear", tail_bound=BOUND
        )
        return y, logabsdet.sum(dim=1)

    return spline


def _providers(bins: int, device: torch.device) -> dict[str, tuple[str, Spline | None]]:
    """``name -> (fastflow backend, spline)``; a None spline marks a provider that is not installed."""
    torch._dynamo.reset()  # one compiled graph per size: never the recompile limit's silent eager fallback
    providers: dict[str, tuple[str, Spline | None]] = {
        "eager": ("eager", lambda x, raw: rq_spline_ref(x, raw, bins, BOUND)),
        "compile": ("eager", torch.compile(lambda x, raw: rq_spline(x, raw, bins, BOUND), dynamic=False)),
    }
    if device.type == "cuda" and triton_available() and not interpreter_enabled():
        providers["fused"] = ("triton", lambda x, raw: rq_spline(x, raw, bins, BOUND))
    for name, make in (("zuko", _zuko), ("nflows", _nflows)):
        providers[name] = ("eager", make(bins) if importlib.util.find_spec(name) is not None else None)
    return providers


def _fwd_bwd(
    spline: Spline, grad_y: torch.Tensor, grad_logdet: torch.Tensor
) -> Callable[..., tuple[torch.Tensor, ...]]:
    def step(x: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, logdet = spline(x, raw)
        return (y, logdet, *torch.autograd.grad((y, logdet), (x, raw), (grad_y, grad_logdet.to(logdet.dtype))))

    return step


def _in_backend(backend: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` run on the fastflow ``backend``."""

    def run(*args: Any) -> Any:
        with fastflow.backend(backend):  # type: ignore[arg-type]
            return fn(*args)

    return run


def saved_bytes(spline: Spline, x: torch.Tensor, raw: torch.Tensor) -> int:
    """Bytes of the distinct storages that ``spline(x, raw)``'s autograd graph saves for backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = spline(x, raw)
    del out
    return sum(storages.values())


def _near_knot(x: torch.Tensor, raw: torch.Tensor, bins: int, dtype: torch.dtype) -> torch.Tensor:
    """Elements of ``x`` within ``KNOT_ULPS`` ``eps(dtype) bound`` of an interior knot, from float64 ``x`` and
    ``raw``: there the bin is not fixed by the ``dtype`` evaluation. The knots a ``dtype`` evaluation computes
    are off by its rounding (float32 on the CPU: up to 6.5 ``eps bound`` at the grid's sizes; a GPU's softmax
    and sums round otherwise), so it may place such an ``x`` in the neighbouring bin. ``y`` and the log-det are
    continuous there, but their gradients jump (the spline is C1, not C2): on an H200 at B=65536, D=8, K=16 an
    ``x`` one float32 ulp below a knot had its ``grad_x`` from the bin above (-140 against 2874), in the fused
    kernels and in torch.compile alike, correct for that bin."""
    spline = eager.Spline(bins, BOUND, *_MINIMUMS)
    knots = eager.sizes_and_knots(raw[..., :bins], spline, spline.min_width)[1][..., :-1]
    distance = (x.unsqueeze(-1) - knots).abs().amin(dim=-1)
    return distance <= KNOT_ULPS * torch.finfo(dtype).eps * BOUND


def _errors(
    outputs: Sequence[torch.Tensor], truth: Sequence[torch.Tensor], near_knot: torch.Tensor | None = None
) -> list[tuple[float, float]]:
    """``(largest, mean)`` absolute error of each output against its float64 truth; the gradients (``grad_x``,
    ``grad_raw``: the outputs after ``y`` and the log-det) leave out the elements where ``near_knot`` (their bin
    is ambiguous, :func:`_near_knot`)."""
    errors = []
    for i, (got, want) in enumerate(zip(outputs, truth)):
        error = (got.detach().double() - want.detach()).abs()
        if near_knot is not None and i >= 2:
            error = error[~near_knot.view(near_knot.shape + (1,) * (error.dim() - near_knot.dim())).expand_as(error)]
        errors.append((float(error.max()), float(error.mean())))
    return errors


def _check(
    name: str,
    outputs: Sequence[torch.Tensor],
    eager_errors: list[tuple[float, float]],
    truth: Sequence[torch.Tensor],
    atol: float,
    near_knot: torch.Tensor | None = None,
) -> None:
    """Three-way check (DESIGN.md) of each output against float64, beside eager's same-dtype errors, with slack
    ``atol`` times the output's largest magnitude (at least 1: a per-sample log-det sums ``D`` terms, and a
    different summation order moves it by rounding of that size):

    - the largest error at most ``MAX_ERROR_FACTOR`` times eager's plus the slack: no wrong element anywhere;
    - the mean error at most twice eager's plus the slack: no less accurate on the whole.
      The largest error is the far tail of a heavy-tailed distribution (elements in steep, narrow bins lose
      digits in any float32 evaluation, and which elements lose the most depends on the order of the
      operations), so over millions of elements two correct evaluations' maxima differ by more than 2x (on an
      H200 at B=65536, D=64, K=16: the fused log-det's 0.013 against eager's 0.0034).

    The gradients at elements ``near_knot`` (:func:`_near_knot`) are left out of both, but must be finite, as
    must every output."""
    labels = ("y", "logdet", "grad_x", "grad_raw")
    for label, got in zip(labels, outputs):
        if not bool(torch.isfinite(got).all()):
            raise MismatchError(f"{name} {label}: not finite: refusing to time it")
    for label, (largest, mean), (eager_largest, eager_mean), want in zip(
        labels, _errors(outputs, truth, near_knot), eager_errors, truth
    ):
        slack = atol * max(1.0, float(want.detach().abs().max()))
        for what, error, allowed in (
            ("largest", largest, MAX_ERROR_FACTOR * eager_largest + slack),
            ("mean", mean, 2 * eager_mean + slack),
        ):
            if not error <= allowed:
                raise MismatchError(
                    f"{name} {label}: {what} error {error:.3g} against float64 is over {allowed:.3g} (eager's: "
                    f"mean {eager_mean:.3g}, largest {eager_largest:.3g}): refusing to time it"
                )


def _size_rows(size: Sequence[int], dtype: torch.dtype, device: torch.device, quick: bool) -> list[dict[str, Any]]:
    batch, features, bins = size
    params = 3 * bins - 1
    generator = torch.Generator().manual_seed(0)  # the same inputs every run: the checks below must repeat

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    x = (1.5 * draw(batch, features)).to(dtype).requires_grad_()
    raw = draw(batch, features, params).to(dtype).requires_grad_()
    grad_y, grad_logdet = draw(batch, features).to(dtype), draw(batch)
    with fastflow.backend("eager"):
        x64, raw64 = (v.detach().double().requires_grad_() for v in (x, raw))
        want = _fwd_bwd(lambda u, r: rq_spline_ref(u, r, bins, BOUND), grad_y.double(), grad_logdet)(x64, raw64)
    near_knot = _near_knot(x64.detach(), raw64.detach(), bins, dtype)
    nbytes = x.numel() * x.element_size() * (3 * params + 5)
    base = {"op": "spline", "pass": "fwd+bwd", "batch": batch, "features": features, "bins": bins}
    base["near_knot"] = int(near_knot.sum())
    base.update(dtype=str(dtype).replace("torch.", ""), device=str(device))
    timed, memory, mismatches = {}, {}, {}
    providers = _providers(bins, device)
    for name, (backend, spline) in providers.items():
        if spline is None:
            continue
        fn = _in_backend(backend, _fwd_bwd(spline, grad_y, grad_logdet))
        if name == "eager":
            eager_errors = _errors(fn(x, raw), want, near_knot)
        elif name == "fused":
            _check(f"spline {tuple(size)} {name}", fn(x, raw), eager_errors, want, _ATOL[dtype], near_knot)
        elif name == "compile":
            try:
                _check(f"spline {tuple(size)} {name}", fn(x, raw), eager_errors, want, _ATOL[dtype], near_knot)
            except MismatchError as error:
                mismatches[name] = str(error)
                continue
        with fastflow.backend(backend):  # type: ignore[arg-type]
            saved_mb = saved_bytes(spline, x, raw) / 2**20
        memory[name] = {"saved_mb": saved_mb, "peak_mem_mb": peak_mib(lambda fn=fn: fn(x, raw), device)}
        timed[name] = lambda fn=fn: fn(x, raw)
    medians = interleaved_medians_ms(timed, device, _ROUNDS[quick])
    rows: list[dict[str, Any]] = []
    for name in providers:
        if name in mismatches:
            rows.append({**base, "provider": name, "skipped": "mismatch", "mismatch": mismatches[name]})
            continue
        if name not in medians:
            rows.append({**base, "provider": name, "skipped": "not installed"})
            continue
        ms = medians[name]
        rows.append({**base, "provider": name, "median_ms": ms, "gbps": nbytes / ms / 1e6, **memory[name]})
    eager_ms = next(r["median_ms"] for r in rows if r["provider"] == "eager")
    for row in rows:
        if "median_ms" in row:
            row["speedup_vs_eager"] = eager_ms / row["median_ms"]
    return rows


def run(
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float32,
    quick: bool = False,
    budget: Budget | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ``spline`` case (module docstring) for each ``(B, D, K)`` of ``sizes`` (default: the full grid,
    or :data:`QUICK_SIZES` with ``quick``). A size not started before ``budget`` expires gets a ``skipped: time``
    row. A ``torch.compile`` result that fails the three-way check (:func:`_check`) is not timed: its row says
    ``skipped: mismatch`` with the check's message, and the other providers are timed. Raises
    :class:`benchmarks.common.MismatchError` if the fused kernels fail it.
    """
    device = torch.device(device)
    if sizes is None:
        sizes = QUICK_SIZES if quick else grid_sizes()
    rows: list[dict[str, Any]] = []
    for size in sizes:
        if budget is not None and budget.expired():
            rows.append({"op": "spline", "batch": size[0], "features": size[1], "bins": size[2], **SKIPPED})
            continue
        rows += _size_rows(size, dtype, device, quick)
    return rows
