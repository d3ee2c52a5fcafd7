"""Host-side launch helpers of ``fastflow.kernels.launch``: every launch runs on its tensors' CUDA device."""

from __future__ import annotations

import ast
import contextlib
import pkgutil
from pathlib import Path

import fastflow.kernels
import pytest
import torch
from fastflow.kernels.launch import launch_device


class _OnDevice:
    """Stands in for a CUDA tensor on a machine without one: ``launch_device`` reads only these."""

    def __init__(self, index: int) -> None:
        self.is_cuda, self.device = True, torch.device("cuda", index)


def test_launch_device_makes_the_tensors_device_current_only_where_it_is_not(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with launch_device(_OnDevice(1)):
        pass
    with launch_device(_OnDevice(0)):
        pass
    with launch_device(torch.zeros(1)):
        pass
    assert entered == [torch.device("cuda", 1)]


def _launches_outside_launch_device(tree: ast.AST) -> list[int]:
    """Lines of ``wrap_triton(kernel)[grid](...)`` calls not inside a ``with launch_device(...)`` block."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "launch_device"
            for item in node.items
        ):
            guarded.update(id(inner) for inner in ast.walk(node))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Subscript)
        and isinstance(node.func.value, ast.Call)
        and getattr(node.func.value.func, "id", "") == "wrap_triton"
        and id(node) not in guarded
    ]


@pytest.mark.parametrize("module", [name for _, name, _ in pkgutil.iter_modules(fastflow.kernels.__path__)])
def test_every_launch_runs_on_its_tensors_device(module):
    """Triton launches on the current CUDA device, not the tensors': each launcher enters ``launch_device``."""
    source = (Path(fastflow.kernels.__path__[0]) / f"{module}.py").read_text()
    assert _launches_outside_launch_device(ast.parse(source)) == []


def test_the_launch_scan_finds_an_unguarded_launch():
    unguarded = "def f(u):\n    wrap_triton(k)[grid](u)\n    with launch_device(u):\n        wrap_triton(k)[grid](u)\n"
    assert _launches_outside_launch_device(ast.parse(unguarded)) == [2]
