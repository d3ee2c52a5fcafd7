"""Compile every ``aot_specs()`` entry of every ``fastflow.kernels`` module for CUDA targets, without a GPU,
and check that no configuration spills registers (float64 ones excepted).

Usage: ``python tests/kernels/aot_compile.py [CC ...] [MODULE ...]`` (default 80 90, every module; a module
is named as under ``fastflow.kernels``, e.g. ``channel_mix``). Exits non-zero, naming the kernel,
its constexprs and the error, on the first compile failure, and after the loop if any configuration held to
``AotSpec.spill_free`` spills under register pressure (local-memory loads or stores in the SASS of the
cubin, ``cuobjdump -sass``, at the register ceiling or in numbers: see :func:`spills_under_pressure`; a
memory-bound kernel that spills moves extra bytes per element).
Prints registers per thread of every configuration. Must run with ``TRITON_INTERPRET`` unset or ``0``:
under the interpreter ``@triton.jit`` does not produce compilable functions.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import fastflow.kernels
import triton
from fastflow.kernels.aot import AotSpec
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def kernel_modules(names: list[str]) -> Iterator[ModuleType]:
    """Every module under ``fastflow.kernels`` that defines ``aot_specs()``, or only those in ``names``."""
    for info in pkgutil.iter_modules(fastflow.kernels.__path__):
        if names and info.name not in names:
            continue
        module = importlib.import_module(f"fastflow.kernels.{info.name}")
        if callable(getattr(module, "aot_specs", None)):
            yield module


def divisibility_attrs(kernel: object, divisible: list[str]) -> object:
    """ASTSource ``attrs`` marking the ``divisible`` arguments as multiples of 16, in the installed Triton's
    format: ``{(index,): [["tt.divisibility", 16]]}`` from 3.3 on, an ``AttrsDescriptor`` in 3.2."""
    indices = sorted(kernel.arg_names.index(name) for name in divisible)
    try:
        from triton.backends.compiler import AttrsDescriptor  # triton 3.2
    except ImportError:
        return {(i,): [["tt.divisibility", 16]] for i in indices}
    properties = {"tt.divisibility": indices, "tt.equal_to": []}
    return AttrsDescriptor.from_dict({"arg_properties": properties, "cls": AttrsDescriptor.__name__})


def compile_spec(spec: AotSpec, cc: int) -> bytes:
    """The cubin of one spec, specialised as a real launch is (:meth:`AotSpec.specialised`); ASTSource's third
    parameter is ``constants`` in triton 3.2, ``constexprs`` later."""
    signature, constexprs, divisible = spec.specialised()
    source = ASTSource(spec.kernel, signature, constexprs, divisibility_attrs(spec.kernel, divisible))
    compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options={"num_warps": spec.num_warps})
    return compiled.asm["cubin"]


def find_cuobjdump() -> str | None:
    """The cuobjdump that ships with Triton's NVIDIA backend, else one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.is_file() else shutil.which("cuobjdump")


def widest_global_load(sass: str) -> int:
    """The widest global load in a SASS listing, in bits: ``LDG.E.128`` is 128, ``LDG.E.64`` 64,
    ``LDG.E.U16`` 16, a plain ``LDG.E`` 32 (0 without global loads)."""
    widths = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
    loads = [suffix.split(".") for suffix in re.findall(r"\bLDG((?:\.[A-Z0-9_]+)*)", sass)]
    return max((next((widths[p] for p in parts if p in widths), 32) for parts in loads), default=0)


def resource_usage(cubin: bytes, cuobjdump: str) -> tuple[int, int, int]:
    """``(registers per thread, local-memory instructions, widest global load in bits)`` of the one kernel in
    ``cubin``, from ``cuobjdump -res-usage`` and ``-sass``.

    The kernels hold no local arrays and make no calls, so every ``STL`` / ``LDL`` in the SASS is a register
    spill or its reload (a reserved but unused stack frame, which ptxas sometimes leaves, costs nothing).
    """
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True)
    match = re.search(r"REG:(\d+)", usage.stdout)
    if match is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {usage.stdout[:500]}")
    spill_ops = len(re.findall(r"\b(?:STL|LDL)\b", sass.stdout))
    return int(match.group(1)), spill_ops, widest_global_load(sass.stdout)


REGISTER_CEILING = 255
MANY_SPILL_INSTRUCTIONS = 32


def spills_under_pressure(registers: int, spill_ops: int) -> bool:
    """Whether a kernel spills because its tile does not fit in registers: any spill at the register
    ceiling, or many spill instructions at any register count. ptxas also trades a handful of spills for
    occupancy at a low register count (seen: 2 to 6 local-memory instructions at 32 to 128 registers,
    varying between Triton releases and launch sizes); that is its choice, not a tile that is too big."""
    return spill_ops > 0 and (registers >= REGISTER_CEILING or spill_ops >= MANY_SPILL_INSTRUCTIONS)


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("needs TRITON_INTERPRET=0: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    ccs = [int(a) for a in argv if a.isdigit()] or [80, 90]
    cuobjdump = find_cuobjdump()
    count, spills, start = 0, [], time.perf_counter()
    for module in kernel_modules([a for a in argv if not a.isdigit()]):
        for spec in module.aot_specs():
            name = f"{module.__name__}.{spec.kernel.__name__}"
            for cc in ccs:
                try:
                    cubin = compile_spec(spec, cc)
                except Exception as err:  # any compiler error fails the spec
                    print(f"FAILED {name} sm_{cc} {spec.constexprs}: {err!r}", file=sys.stderr)
                    return 1
                count += 1
                if cuobjdump is None or not spec.spill_free:
                    continue
                registers, spill_ops, load_bits = resource_usage(cubin, cuobjdump)
                pointers = sorted({t for t in spec.signature.values() if t.startswith("*")})
                launch = "real launch" if spec.int_args else "pointers aligned"
                line = (
                    f"{name} sm_{cc} {pointers} warps={spec.num_warps} {spec.constexprs} ({launch}): "
                    f"{registers} registers, loads up to {load_bits} bits"
                )
                print(line + (f", {spill_ops} local-memory instructions" if spill_ops else ""))
                if spills_under_pressure(registers, spill_ops):
                    spills.append(line)
    print(f"compiled {count} kernel specs for sm_{ccs} in {time.perf_counter() - start:.1f}s")
    if cuobjdump is None:
        print("spill check skipped: no cuobjdump")
    elif spills:
        print(f"{len(spills)} configurations spill under register pressure:\n" + "\n".join(spills), file=sys.stderr)
        return 1
    else:
        print("no configuration spills under register pressure")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
