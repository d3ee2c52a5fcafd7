"""Peak memory of one coupling's reversible backward, in hidden-width tensors per pixel: the measurement
behind :data:`fastflow.nn.tiling.ACTIVE_HIDDEN_TENSORS` (the automatic tile size's cost model).

``python -m benchmarks.tile_memory`` runs :func:`measure` in a fresh subprocess per size (peak RSS, VmHWM,
above the RSS before the call, with glibc serving allocations of 16 KiB and more by mmap so that freed
memory leaves the RSS) and prints ``peak / (batch * hidden * side^2 * element size)``. Measured on the CPU
(2026-11-25, float32, one coupling of 12 channels, the image one tile): 4.28 at batch 2, hidden 256,
64x64; 4.50 at batch 4, hidden 128, 64x64; 4.13 at batch 1, hidden 512, 96x96; 4.51 at batch 2, hidden
128, 48x48 (the size ``tests/nn/test_tiling.py`` checks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from benchmarks.train_step import _reset_peak_rss_kb, _status_kb
from fastflow.nn import AffineCoupling

SIZES = ((2, 256, 64), (4, 128, 64), (1, 512, 96))


def measure(batch: int, hidden: int, side: int, channels: int = 12) -> float:
    """Peak bytes of the second ``backward_from_output`` of an ``AffineCoupling(channels, hidden)`` on a
    ``side x side`` image (one tile), over ``batch * hidden * side^2 * 4``; in this process."""
    torch.set_num_threads(1)
    layer = AffineCoupling(channels, hidden=hidden)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)
    y = torch.randn(batch, channels, side, side)
    grad_y, grad_logdet = torch.randn_like(y), torch.randn(batch)
    layer.backward_from_output(y, grad_y, grad_logdet)  # warm-up: gradients and thread pools exist
    base_kb = _reset_peak_rss_kb()
    layer.backward_from_output(y, grad_y, grad_logdet)
    return (_status_kb("VmHWM") - base_kb) * 1024 / (batch * hidden * side * side * 4)


def measure_isolated(batch: int, hidden: int, side: int) -> float:
    """:func:`measure` in a fresh subprocess (so earlier allocations cannot hide this one's)."""
    code = f"from benchmarks.tile_memory import measure; print(measure({batch}, {hidden}, {side}))"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Print the hidden-width tensors per pixel at each of :data:`SIZES`."""
    argparse.ArgumentParser(prog="python -m benchmarks.tile_memory", description=__doc__).parse_args(argv)
    rows = [
        {"batch": b, "hidden": h, "side": s, "hidden_tensors_per_pixel": measure_isolated(b, h, s)} for b, h, s in SIZES
    ]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
