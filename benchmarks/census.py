"""Launch and byte census of one FlowStep and of one Glow training step, eager and compiled, device-independent.

What is counted, per step, split into forward and backward (the optimizer step counts with backward):

- Every ATen or custom op that reaches a kernel, seen by a ``TorchDispatchMode`` (views, allocations and other
  metadata-only ops are not counted): one launch each, moving the bytes of its tensor inputs and outputs.
  Custom ops (``fastflow::*``, the fused Triton kernels) count once each, with their arguments and results.
- Under ``torch.compile`` the same mode stays on (it declares ``ignore_compile_internals``, so Dynamo runs the
  compiled code under it instead of falling back to eager): it sees what the compiled code still sends through
  the dispatcher (Inductor's extern kernels such as convolutions and matmuls, fallback ATen ops, custom ops
  Inductor cannot see into) and every op that runs eagerly between graphs after a graph break. The kernels
  Inductor generates itself (C++ kernels on the CPU, Triton kernels on CUDA) run below the dispatcher: each
  generated module is instrumented as it is compiled, and each call of one of its kernels counts as one launch
  moving the bytes of its tensor arguments (a buffer both read and written counts once; an eager in-place op
  counts it as input and output). Eager and compiled rows thus count the same thing: kernels run, and the
  tensors each one is handed.

Values per pixel are bytes / 4 / (batch * height * width) of the input image. ``generated_kernels`` is the part
of the launches that Inductor generated; ``graphs`` and ``graph_breaks`` are Dynamo's counts while compiling
(a compiled row with breaks runs the code around each break eagerly, counted as such); ``recompiles`` counts
the graphs Dynamo compiled again in the counted step (a guard that fails on every step: a steady step should
have none);
``launches_vs_eager`` and ``bytes_vs_eager`` compare forward+backward with the eager row of the same case
(issue 13's target for the compiled training step: at most 0.2 and 0.67).

Cases: one FlowStep forward+backward (B=2, C=12, 16x16, hidden 512) and the reference training step (Glow
L=3, K=8, hidden 64, 32x32, batch 8, run as :class:`fastflow.step.TrainStep` runs it: guards deferred (no
host read of the finite check or the drift), the gradient norm clipped at the training default (50), then
Adam's step, ``fused=True``: one kernel in every mode (left out: TrainStep's skip-flag update and the fused
Adam's ``found_inf`` and learning-rate fill, about 16 small launches a step in eager mode); in the layout
TrainStep gives it, :func:`fastflow.step.default_channels_last`: channels-last on the CPU), for
``eager`` (standard backprop), ``reversible``, ``compiled`` and ``compiled-reversible`` (``torch.compile`` of
the loss, whose backward AOTAutograd compiles), on the backend the device gets, so on the CPU through the
CPU's ops: there eager runs Glow's network's 1x1 convolution as a ``bmm`` (reading the weight once per sample) and
a bias pass (:class:`fastflow.nn.PointwiseConv2d`), where CUDA runs one convolution. Every variant runs one
whole warm-up step first (ActNorm's initialisation, Adam's state, compilation), so the count is of a steady
step. Compiled variants need a torch whose ``TorchDispatchMode`` has ``ignore_compile_internals``
(torch >= 2.9); on an older one their rows say so instead of counting.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.common import SKIPPED, Budget, dynamo_counts
from fastflow.backend import resolve_backend
from fastflow.models import Glow
from fastflow.nn import FlowSequential, FlowStep
from fastflow.nn.reversible import deferred_guards
from fastflow.step import clip_gradients, convolutions_channels_last, default_channels_last
from fastflow.train import TrainConfig

__all__ = ["MODES", "OpCensus", "census_rows", "count_step", "inductor_kernels_counted"]

MODES = ("eager", "reversible", "compiled", "compiled-reversible")

_FREE = {
    "view", "_unsafe_view", "as_strided", "expand", "permute", "t", "transpose", "unsqueeze", "squeeze", "slice",
    "select", "detach", "alias", "split", "split_with_sizes", "chunk", "unbind", "reshape", "_reshape_alias",
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "unflatten", "flatten", "view_as",
    "diagonal", "narrow", "new_empty_strided", "_record_function_enter_new", "_record_function_exit",
}  # fmt: skip
"""ATen ops that only make views, allocate or mark a profiler range: no kernel runs."""

_ACTIVE: list[OpCensus] = []
"""The censuses in force, innermost last: instrumented Inductor kernels report their launches to the last."""


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class OpCensus(TorchDispatchMode):
    """Counts the ops that launch a kernel and the bytes they read and write, by phase (``forward`` or
    ``backward``); Inductor's generated kernels report to the innermost census through
    :func:`inductor_kernels_counted`."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.launches: dict[str, int] = {"forward": 0, "backward": 0}
        self.bytes: dict[str, int] = {"forward": 0, "backward": 0}
        self.generated: dict[str, int] = {"forward": 0, "backward": 0}

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Let Dynamo run compiled code under this mode (the default makes it skip to eager)."""
        return True

    def record(self, nbytes: int, generated: bool = False) -> None:
        """Count one launch moving ``nbytes`` in the current phase."""
        self.launches[self.phase] += 1
        self.bytes[self.phase] += nbytes
        self.generated[self.phase] += generated

    def __enter__(self) -> OpCensus:
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        _ACTIVE.remove(self)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] not in _FREE:
            self.record(_tensor_bytes((args, kwargs, out)))
        return out


def _report(args: tuple, kwargs: dict) -> None:
    if _ACTIVE:
        _ACTIVE[-1].record(_tensor_bytes((args, kwargs)), generated=True)


def _counted_cpp_kernel(kernel: Callable[..., Any]) -> Callable[..., Any]:
    def launch(*args: Any, **kwargs: Any) -> Any:
        _report(args, kwargs)
        return kernel(*args, **kwargs)

    return launch


class _CountedTritonKernel:
    """A generated Triton kernel (anything the wrapper calls ``.run`` on) whose launches are counted."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel

    def run(self, *args: Any, **kwargs: Any) -> Any:
        _report(args, kwargs)
        return self._kernel.run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)


def _instrument(module: Any) -> None:
    """Replace the generated kernels in an Inductor output module's namespace (which its ``call`` reads at run
    time) with counting wrappers: ``cpp_*`` functions (CPU) and objects with a ``run`` method (Triton)."""
    namespace = vars(module)
    for name, obj in list(namespace.items()):
        if name.startswith("cpp_") and callable(obj):
            namespace[name] = _counted_cpp_kernel(obj)
        elif not isinstance(obj, (type, types.ModuleType)) and callable(getattr(obj, "run", None)):
            namespace[name] = _CountedTritonKernel(obj)


@contextlib.contextmanager
def inductor_kernels_counted() -> Iterator[None]:
    """Within the block, every module Inductor compiles gets its kernels instrumented (see the module
    docstring); Inductor's on-disk caches are off so that every graph is compiled here, not loaded."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor.graph import GraphLowering

    original = GraphLowering.compile_to_module

    def compile_to_module(self: GraphLowering) -> Any:
        module = original(self)
        _instrument(module)
        return module

    caches: dict[str, bool] = {"fx_graph_cache": False}
    autograd_cache = {"enable_autograd_cache": False} if hasattr(functorch_config, "enable_autograd_cache") else {}
    GraphLowering.compile_to_module = compile_to_module  # type: ignore[method-assign]
    try:
        with inductor_config.patch(caches), functorch_config.patch(autograd_cache):
            yield
    finally:
        GraphLowering.compile_to_module = original  # type: ignore[method-assign]


def compile_supported() -> bool:
    """Whether this torch lets a dispatch mode run compiled code (``ignore_compile_internals``)."""
    return hasattr(TorchDispatchMode, "ignore_compile_internals")


def count_step(
    forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None], pixels: int, compiled: bool
) -> dict[str, Any]:
    """Census of one step ``backward(forward())`` after one warm-up step (which compiles, when ``forward`` and
    ``backward`` hold compiled functions). Inductor's kernels are instrumented throughout, so a graph that
    Dynamo compiles again in the counted step (a guard that fails every step) is counted too, and reported
    in ``recompiles``."""
    before = dynamo_counts()
    with inductor_kernels_counted() if compiled else contextlib.nullcontext():
        backward(forward())
        warm = dynamo_counts()
        with OpCensus() as census:
            loss = forward()
            census.phase = "backward"
            backward(loss)
        after = dynamo_counts()
    row: dict[str, Any] = {}
    for phase in ("forward", "backward"):
        row[f"{phase}_launches"] = census.launches[phase]
        row[f"{phase}_values_per_pixel"] = round(census.bytes[phase] / 4 / pixels, 1)
    if compiled:
        row.update(
            generated_kernels=sum(census.generated.values()),
            graphs=warm[0] - before[0],
            graph_breaks=warm[1] - before[1],
            recompiles=after[0] - warm[0],
        )
        if row["generated_kernels"] == 0:
            raise RuntimeError("no Inductor kernel ran in the counted step: the compiled code was not used")
    return row


def _flowstep(
    mode: str, device: torch.device, channels: int = 12, hidden: int = 512, side: int = 16, batch: int = 2
) -> dict[str, Any]:
    torch.manual_seed(0)
    chain = FlowSequential(FlowStep(channels, hidden=hidden), reversible="reversible" in mode).to(device).train()
    x = torch.randn(batch, channels, side, side, device=device, requires_grad=True)
    with torch.no_grad():
        chain(x)  # ActNorm's data-dependent init, before any compilation

    def objective(x: torch.Tensor) -> torch.Tensor:
        y, logdet = chain(x)
        return y.square().sum() + logdet.sum()

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        chain.zero_grad(set_to_none=True)  # as a training step does: no accumulation into last step's gradients
        x.grad = None

    compiled = mode.startswith("compiled")
    loss_fn = torch.compile(objective) if compiled else objective
    return count_step(lambda: loss_fn(x), backward, batch * side * side, compiled)


def _training_step(mode: str, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Glow(3, 32, levels=3, steps=8, hidden=64, reversible="reversible" in mode).to(device).train()
    x = torch.rand(8, 3, 32, 32, device=device) - 0.5
    if default_channels_last(device, model):  # the layout TrainStep gives it
        convolutions_channels_last(model)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        model.bits_per_dim(x)  # ActNorm's data-dependent init, before any compilation
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return model.bits_per_dim(x).mean()

    compiled = mode.startswith("compiled")
    loss_fn = torch.compile(objective) if compiled else objective

    # as TrainStep runs a step: guards deferred (no finite-check or drift read), the gradients clipped
    def forward() -> torch.Tensor:
        with deferred_guards():
            return loss_fn(x)

    def backward(loss: torch.Tensor) -> None:
        with deferred_guards():
            loss.backward()
        clip_gradients([p.grad for p in model.parameters() if p.grad is not None], TRAINING_CLIP, device)
        optimizer.step()  # fused: one kernel (Dynamo cannot trace it: compiling it would only add graph breaks)
        optimizer.zero_grad(set_to_none=True)

    return count_step(forward, backward, 8 * 32 * 32, compiled)


TRAINING_CLIP = TrainConfig().clip
"""The gradient-norm clip of a training run (``fastflow.train``'s default), applied in the counted step."""

CASES: dict[str, Callable[[str, torch.device], dict[str, Any]]] = {
    "flowstep B2 C12 16x16 h512": _flowstep,
    "glow step L3 K8 h64 32x32 b8": _training_step,
}


def _relative_to_eager(rows: list[dict[str, Any]]) -> None:
    eager = {r["case"]: r for r in rows if r["mode"] == "eager"}
    for row in rows:
        base = eager.get(row["case"])
        if base is None or "forward_launches" not in row:
            continue
        row["launches_vs_eager"] = round(
            (row["forward_launches"] + row["backward_launches"])
            / (base["forward_launches"] + base["backward_launches"]),
            3,
        )
        row["bytes_vs_eager"] = round(
            (row["forward_values_per_pixel"] + row["backward_values_per_pixel"])
            / (base["forward_values_per_pixel"] + base["backward_values_per_pixel"]),
            3,
        )


def census_rows(
    device: torch.device, modes: tuple[str, ...] = MODES, budget: Budget | None = None
) -> list[dict[str, Any]]:
    """Launches and fp32 values moved per pixel, forward and backward, of both cases in each of ``modes``, on
    the backend :mod:`fastflow.backend` picks for ``device`` (Triton kernels on CUDA, eager on the CPU). Rows
    not started before ``budget`` expires say ``skipped: time``."""
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"modes must be among {MODES}, got {unknown}")
    backend = resolve_backend(torch.empty(0, device=device))
    rows = []
    for case, run in CASES.items():
        for mode in modes:
            row: dict[str, Any] = {"case": case, "mode": mode, "backend": backend}
            if budget is not None and budget.expired():
                row.update(SKIPPED)
            elif mode.startswith("compiled") and not compile_supported():
                row["skipped"] = f"torch {torch.__version__}: dispatch modes cannot see compiled code"
            else:
                torch._dynamo.reset()  # each compiled variant compiles afresh: no recompile limit, honest counts
                row.update(run(mode, device))
            rows.append(row)
    _relative_to_eager(rows)
    return rows
