"""Every ``aot_specs()`` kernel under ``fastflow.kernels`` compiles for sm_80 and sm_90 without spilling
registers (no GPU needed)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import fastflow.kernels
import pytest

triton = pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("aot_compile.py")


KERNEL_MODULES = sorted(
    name for _, name, _ in pkgutil.iter_modules(fastflow.kernels.__path__) if name not in ("aot", "launch")
)
"""The kernel modules under ``fastflow.kernels``, one check each (``aot`` holds the spec type and ``launch`` the
host-side launch arithmetic: no kernels)."""


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_aot_compile_kernels_sm80_sm90(module: str) -> None:
    # conftest sets TRITON_INTERPRET=1 in this process, under which @triton.jit returns interpreter
    # functions that cannot be compiled: compile in a fresh interpreter with TRITON_INTERPRET=0.
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "80", "90", module], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    compiled = re.search(r"compiled (\d+) kernel specs", proc.stdout)
    specs = len(importlib.import_module(f"fastflow.kernels.{module}").aot_specs())
    assert compiled and specs > 0 and int(compiled.group(1)) == 2 * specs, proc.stdout  # every spec, both targets
    # triton's wheels ship cuobjdump: where it is, the spill check must have run
    if (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        assert "no configuration spills under register pressure" in proc.stdout


def test_spills_under_pressure_tells_pressure_from_ptxas_occupancy_trades() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from aot_compile import spills_under_pressure
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert not spills_under_pressure(200, 0)
    assert spills_under_pressure(255, 1)  # at the ceiling: the tile does not fit
    assert spills_under_pressure(32, 8489)  # capped and spilling thousands (a 128 x 512 tile, Triton 3.2)
    assert not spills_under_pressure(128, 6)  # a few spills ptxas chose for occupancy


@pytest.mark.parametrize(("split", "max_registers"), [(False, 48), (True, 64)], ids=["half", "split"])
def test_glow_coupling_launch_compiles_as_launched_with_128_bit_loads(split: bool, max_registers: int) -> None:
    """The AOT check compiles Glow's usual coupling launches with the specialisation a real launch gets
    (aligned pointers, 16-divisible sizes, unit strides as constants): 128-bit loads and few registers,
    not the scalar loads and ~65 registers of an unspecialised compile. With the channel split (the whole NCHW
    activation, channels a run of their own) the transformed-channel mask is constant over 16 elements, so
    shift and raw load 128 bits at a time too."""
    code = "\n".join(
        [
            f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})",
            "import aot_compile as a",
            "from fastflow.kernels import coupling",
            "tool = a.find_cuobjdump()",
            "glow = [s for s in coupling.aot_specs() if s.int_args and s.signature['u_ptr'] == '*fp32']",
            f"launch = [s for s in glow if (s.constexprs['CH'] == 0) == {split}][:2]",
            "assert [s.kernel for s in launch] == [coupling.coupling_fwd_kernel, coupling.coupling_bwd_kernel]",
            "for spec in launch:",
            "    assert spec.constexprs['SCALE'] == coupling.SIGMOID and spec.constexprs['CH'] in (-1, 0), spec",
            "    cubin = a.compile_spec(spec, 90)",
            "    registers, _, load_bits = a.resource_usage(cubin, tool)",
            "    print(registers, load_bits)",
        ]
    )
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").is_file():
        pytest.skip("no cuobjdump in this Triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for line in proc.stdout.split("\n")[:2]:
        registers, load_bits = map(int, line.split())
        assert load_bits == 128 and registers <= max_registers, proc.stdout


def test_widest_global_load_reads_the_sass_width() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from aot_compile import widest_global_load
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert widest_global_load("LDG.E R2, desc[UR4][R2.64] ;\n LDG.E.128 R4, desc[UR4][R6.64] ;") == 128
    assert widest_global_load("LDG.E.U16 R2, [R2.64] ;") == 16
    assert widest_global_load("LDG.E R2, [R2.64] ;") == 32
    assert widest_global_load("STG.E [R2], R3 ;") == 0
