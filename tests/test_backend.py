"""fastflow.backend: the choice of backend when Triton is missing or broken."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import subprocess
import sys
import types

import pytest

backend_module = importlib.import_module("fastflow.backend")  # the module: fastflow.backend is also a function


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


def test_a_triton_older_than_the_kernels_need_counts_as_absent(monkeypatch):
    """torch 2.4 and 2.5 pin Triton 3.0 and 3.1, which the kernels (built for >= 3.2) would fail on at their first
    launch: such a Triton counts as absent, with a warning, and the ops run their eager twins."""
    old = types.ModuleType("triton")
    old.__version__ = "3.0.0"
    old.__spec__ = importlib.machinery.ModuleSpec("triton", None)
    monkeypatch.setitem(sys.modules, "triton", old)
    with pytest.warns(RuntimeWarning, match="fastflow's kernels need triton >= 3.2, found 3.0.0"):
        assert not backend_module._triton_imports()
    old.__version__ = "3.2.0"
    assert backend_module._triton_imports()
