"""Launch and byte census of one FlowStep and of one Glow training step, device-independent.

A ``TorchDispatchMode`` sees every ATen op that reaches a kernel (views and other metadata-only ops are not
counted): each is one launch on a GPU, and the bytes of its tensor inputs and outputs are what that launch
reads and writes at least. Custom ops (``fastflow::*``, the fused Triton kernels) count once each, with the
bytes of their arguments and results. Reported per pixel of the input image (``B * H * W``), split into
forward and backward (the optimizer step counts with backward).

Cases: one FlowStep forward+backward (B=2, C=12, 16x16, hidden 512) and the reference training step (Glow
L=3, K=8, hidden 64, 32x32, batch 8, with Adam's step), each for ``eager`` (standard backprop) and
``reversible``, on the backend the device gets. Compiled variants are not counted yet (Inductor's kernels
run below the dispatcher).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fastflow.backend import resolve_backend
from fastflow.models import Glow
from fastflow.nn import FlowSequential, FlowStep

__all__ = ["OpCensus", "census_rows"]

_FREE = {
    "view", "_unsafe_view", "as_strided", "expand", "permute", "t", "transpose", "unsqueeze", "squeeze", "slice",
    "select", "detach", "alias", "split", "split_with_sizes", "chunk", "unbind", "reshape", "_reshape_alias",
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "unflatten", "flatten", "view_as",
    "diagonal", "narrow",
}  # fmt: skip
"""ATen ops that only make views or allocate: no kernel runs."""


class OpCensus(TorchDispatchMode):
    """Counts the ops that launch a kernel and the bytes they read and write, by phase."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.launches: dict[str, int] = {"forward": 0, "backward": 0}
        self.bytes: dict[str, int] = {"forward": 0, "backward": 0}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] not in _FREE:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.launches[self.phase] += 1
            self.bytes[self.phase] += sum(t.numel() * t.element_size() for t in tensors)
        return out


def _count(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None], pixels: int) -> dict:
    forward()  # warm-up: ActNorm init and lazy state happen outside the count
    with OpCensus() as census:
        loss = forward()
        census.phase = "backward"
        backward(loss)
    row: dict[str, Any] = {}
    for phase in ("forward", "backward"):
        row[f"{phase}_launches"] = census.launches[phase]
        row[f"{phase}_values_per_pixel"] = round(census.bytes[phase] / 4 / pixels, 1)
    return row


def _flowstep(reversible: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    chain = FlowSequential(FlowStep(12, hidden=512), reversible=reversible).to(device).train()
    x = torch.randn(2, 12, 16, 16, device=device, requires_grad=True)

    def forward() -> torch.Tensor:
        y, logdet = chain(x)
        return y.square().sum() + logdet.sum()

    return _count(forward, lambda loss: loss.backward(), 2 * 16 * 16)


def _training_step(reversible: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = Glow(3, 32, levels=3, steps=8, hidden=64, reversible=reversible).to(device).train()
    x = torch.rand(8, 3, 32, 32, device=device) - 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def backward(loss: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _count(lambda: model.bits_per_dim(x).mean(), backward, 8 * 32 * 32)


def census_rows(device: torch.device) -> list[dict[str, Any]]:
    """Launches and fp32 values moved per pixel, forward and backward, of both cases in both modes, on the
    backend :mod:`fastflow.backend` picks for ``device`` (Triton kernels on CUDA, eager on the CPU)."""
    backend = resolve_backend(torch.empty(0, device=device))
    rows = []
    for case, run in (("flowstep B2 C12 16x16 h512", _flowstep), ("glow step L3 K8 h64 32x32 b8", _training_step)):
        for mode in ("eager", "reversible"):
            rows.append({"case": case, "mode": mode, "backend": backend, **run(mode == "reversible", device)})
    return rows
