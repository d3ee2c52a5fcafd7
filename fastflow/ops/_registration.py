"""How the ops that launch Triton kernels register with ``torch.library``, and when a call bypasses it.

Every fused op is a ``torch.library`` op (so ``torch.compile``, fake tensors and dispatch modes see it) and has
a direct twin: an ``autograd.Function`` built from the same forward, ``setup_context`` and backward
(:func:`direct_autograd`). Outside tracing and dispatch modes (:func:`use_library_op` false) the public
functions call the twin: the same kernels, outputs and gradients without the dispatcher's Python layers (the
custom op's autograd wrapper, schema checks and redispatch), which cost about as much host time as the
launcher itself: an eager (or CUDA-graph captured) training step is bound by that host time."""

from __future__ import annotations

import importlib
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from fastflow.backend import functorch_transforms_active, interpreter_enabled, legacy_batched, triton_available

__all__ = ["TRACEABLE", "direct_autograd", "kernel_function", "kernels_traceable", "registration", "use_library_op"]


def kernels_traceable() -> bool:
    """Whether the ops register as ``torch.library.triton_op``, launching through ``torch.library.wrap_triton``:
    ``torch.compile`` then traces into them and Inductor schedules their kernels among the neighbouring ops.
    That needs torch >= 2.6, Triton, compiled kernels (under ``TRITON_INTERPRET`` a kernel is Python that
    neither Inductor nor fake tensors can run) and a torch built with CUDA (a CPU build never runs a compiled
    kernel, and registering a triton op imports Inductor: seconds at ``import fastflow``). Otherwise they are
    opaque ``torch.library.custom_op`` ops with fake kernels, which ``torch.compile(fullgraph=True)`` traces
    too."""
    return (
        hasattr(torch.library, "triton_op")
        and hasattr(torch.library, "wrap_triton")
        and triton_available()
        and not interpreter_enabled()
        and torch.backends.cuda.is_built()
    )


TRACEABLE = kernels_traceable()
""":func:`kernels_traceable` for this process, decided at import: the ops register once."""


def _typing_form(hint: Any) -> Any:
    """``hint`` with ``list[X]``, ``tuple[X, ...]`` and ``X | None`` in ``typing``'s spelling, which the schema
    inference of torch < 2.7 requires (it refused ``-> list[Tensor]``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return typing.List[_typing_form(args[0])]  # noqa: UP006 (the point: torch < 2.7 needs this spelling)
    if origin is tuple:
        return typing.Tuple[tuple(_typing_form(a) for a in args)]  # noqa: UP006 (likewise)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return typing.Union[tuple(_typing_form(a) for a in args)]
    return hint


def _evaluated_annotations(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its annotations evaluated (``from __future__ import annotations`` leaves strings, which torch
    2.4's schema inference does not evaluate) and in :func:`_typing_form`."""
    fn.__annotations__ = {name: _typing_form(hint) for name, hint in typing.get_type_hints(fn).items()}
    return fn


def registration(traceable: bool) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``(define, launch)``: ``define(name, mutates_args=())`` decorates an op function to register it
    (``triton_op``, whose fake kernel is the function itself run on fake tensors, when ``traceable``, else
    ``custom_op``, which needs a fake kernel registered), its annotations evaluated for every supported torch
    (:func:`_evaluated_annotations`), and ``launch`` holds the keyword arguments its body passes to the kernel
    launchers (``wrap_triton`` for a triton op; none for a custom op, which launches its kernels directly)."""
    register = torch.library.triton_op if traceable else torch.library.custom_op

    def define(name: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        decorate = register(name, **options)
        return lambda fn: decorate(_evaluated_annotations(fn))

    launch = {"wrap_triton": torch.library.wrap_triton} if traceable else {}
    return define, launch


def kernel_function(module: str, name: str) -> Callable[..., Any]:
    """``fastflow.kernels.<module>.<name>``, imported at its first call: Triton is optional."""

    imported: list[Any] = []  # the module, once imported (the function is looked up per call: tests patch it)

    def call(*args: Any, **kwargs: Any) -> Any:
        if not imported:
            imported.append(importlib.import_module(f"fastflow.kernels.{module}"))
        return getattr(imported[0], name)(*args, **kwargs)

    return call


def use_library_op() -> bool:
    """Whether a fused op is called through ``torch.library`` rather than its direct twin: while
    ``torch.compile`` traces (Dynamo folds this to True without a graph break), while a dispatch mode is
    active (fake tensors, ``make_fx``, a ``TorchDispatchMode`` census), which must see the op whole, and under
    functorch transforms, which need the registered op's ``setup_context`` (the fused ops themselves run their
    eager twins there: :func:`fastflow.backend.resolve_backend`)."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None or functorch_transforms_active()


def direct_autograd(
    forward: Callable[..., Any],
    setup_context: Callable[..., None],
    backward: Callable[..., Any],
    differentiable_backward: bool = False,
    name: str | None = None,
) -> Callable[..., Any]:
    """``apply`` of an ``autograd.Function`` running ``forward`` (an op's body, launching its kernels directly)
    with the ``setup_context`` and ``backward`` the op registers with ``register_autograd``. Unless
    ``differentiable_backward``, a backward run to be differentiated again (``create_graph=True``) raises, as
    the op's second backward does (its backward op has no autograd): never a silent zero or constant gradient;
    so does one given autograd's batched gradients, which the kernels cannot read (errors name the op ``name``,
    default ``forward``'s name).

    The Function's ``forward`` takes ``ctx`` and calls ``setup_context`` itself, with the positional inputs
    completed by ``forward``'s defaults (bound once here): a Function with its own ``setup_context`` binds
    every call's arguments with ``inspect.signature``, tens of microseconds of host time per call."""
    parameters = list(inspect.signature(forward).parameters.values())
    if any(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in parameters):
        raise TypeError(f"{forward.__name__}: a direct twin takes positional parameters only")
    op = name or forward.__name__
    fixed = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    defaults = tuple(p.default for p in fixed)
    required = sum(p.default is p.empty for p in fixed)

    def forward_with_context(ctx: Any, *args: Any) -> Any:
        if required <= len(args) < len(defaults):
            args = (*args, *defaults[len(args) :])
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    def first_order_backward(ctx: Any, *grads: Any) -> Any:
        # grad mode is on in a backward only under create_graph=True: the gradients it returns would be constants
        # of the graph (their dependence on the inputs, through the saved tensors, unrecorded), whatever the
        # incoming gradients are (a loss's constant 1 included)
        if torch.is_grad_enabled() and any(ctx.needs_input_grad):
            raise RuntimeError(
                f"fastflow's fused {op} has no double backward (create_graph=True); "
                "run it on the eager backend: with fastflow.backend('eager'): ..."
            )
        try:
            return backward(ctx, *grads)
        except (NotImplementedError, RuntimeError) as err:  # the kernels cannot take autograd's batched gradients
            if not any(legacy_batched(g) for g in grads):
                raise
            raise RuntimeError(
                f"fastflow's fused {op} has no batched backward (autograd.grad(..., "
                "is_grads_batched=True), jacobian(..., vectorize=True)): use torch.func.jacrev or vmap, which run its "
                "eager twin, or run it on the eager backend: with fastflow.backend('eager'): ..."
            ) from err

    function = type(
        f"Direct_{forward.__name__}",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward_with_context),
            "backward": staticmethod(backward if differentiable_backward else first_order_backward),
        },
    )
    return function.apply
