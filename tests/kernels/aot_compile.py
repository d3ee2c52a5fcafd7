"""Compile every ``aot_specs()`` entry of every ``fastflow.kernels`` module for CUDA targets, without a GPU.

Usage: ``python tests/kernels/aot_compile.py [CC ...]`` (default 80 90). Exits non-zero, naming the kernel,
its constexprs and the error, on the first failure. Must run with ``TRITON_INTERPRET`` unset or ``0``:
under the interpreter ``@triton.jit`` does not produce compilable functions.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import fastflow.kernels
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def kernel_modules() -> Iterator[ModuleType]:
    """Every module under ``fastflow.kernels`` that defines ``aot_specs()``."""
    for info in pkgutil.iter_modules(fastflow.kernels.__path__, prefix="fastflow.kernels."):
        module = importlib.import_module(info.name)
        if callable(getattr(module, "aot_specs", None)):
            yield module


def compile_spec(fn: Any, signature: dict[str, str], constexprs: dict[str, Any], cc: int) -> None:
    """Compile one spec; ASTSource's third parameter is ``constants`` in triton 3.2, ``constexprs`` later."""
    source = ASTSource(fn, signature, constexprs)
    triton.compile(source, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("needs TRITON_INTERPRET=0: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    ccs = [int(a) for a in argv] or [80, 90]
    count, start = 0, time.perf_counter()
    for module in kernel_modules():
        for fn, signature, constexprs in module.aot_specs():
            for cc in ccs:
                try:
                    compile_spec(fn, signature, constexprs, cc)
                except Exception as err:  # any compiler error fails the spec
                    name = f"{module.__name__}.{fn.__name__}"
                    print(f"FAILED {name} sm_{cc} {constexprs}: {err!r}", file=sys.stderr)
                    return 1
                count += 1
    print(f"compiled {count} kernel specs for sm_{ccs} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
