"""fastflow.backend: the choice of backend when Triton is missing or broken."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_triton_that_does_not_import_warns_and_leaves_the_eager_ops(tmp_path):
    """An installed Triton that fails to import (a missing driver library) counts as absent, with one warning
    naming the error, and the models run on the eager ops; before, ``find_spec`` alone said it was there."""
    package = tmp_path / "triton"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("libcuda.so.1: cannot open shared object file")\n')
    code = (
        "import torch, fastflow\n"
        "from fastflow.backend import triton_available\n"
        "from fastflow.models import Glow\n"
        "print('available', triton_available())\n"
        "print('shape', tuple(Glow(3, 8, levels=1, steps=1, hidden=8).log_prob(torch.rand(2, 3, 8, 8) - 0.5).shape))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout and "shape (2,)" in done.stdout
    warning = "triton is installed but does not import (ImportError: libcuda.so.1: cannot open shared object file)"
    assert done.stderr.count(warning) == 1, done.stderr
