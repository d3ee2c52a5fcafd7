# Every target does its own set-up: a .venv with CPU torch 2.13.0 (never a multi-GB CUDA wheel) and
# fastflow installed editable. Re-running is quick: the install step is skipped while pyproject.toml is
# unchanged.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastflow-installed

BENCH_STAMP := $(VENV)/.fastflow-bench-installed

.PHONY: demo test bench bench-targets gpu-check gpu-install gpu-test gpu-bench aot-old-tritons lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fastflow.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The benchmarks' extra (normflows, the peer the digits demo is timed against) on top of the test set-up.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(BENCH_STAMP)

# Quick rows go to their own folder: written to benchmarks/results they would replace the committed full runs.
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks --device cpu --quick --out benchmarks/results/quick
	$(PY) -m pytest -q benchmarks/test_cpu_timings.py --benchmark-only --benchmark-columns=min,median,max,rounds

# Issue 13's CPU targets measured in one run: the census (eager vs compiled launches and bytes), the
# reference step eager vs compiled vs reversible, and the digits demo against normflows' Glow.
bench-targets: $(BENCH_STAMP)
	$(PY) -m benchmarks --device cpu --cases census,train_step_cpu,peers_glow

# On a CUDA machine, with its own torch and triton. gpu-check: in one command within GPU_CHECK_S seconds
# (under 8 minutes with the install), each step time-boxed: the gpu-marked tests (TF32 on), the coupling
# and FlowStep kernels, the training step eager vs compiled vs CUDA graph, the largest batches that fit,
# then max-autotune with any time left (benchmarks/gpu_check.py). Results go to benchmarks/results/<device>.*
# as each case finishes; with OUT set, $OUT/gpu-check.tar.gz holds the logs, a summary and copies of the results.
# gpu-test and gpu-bench run the tests or the benchmarks alone: BENCH_ARGS="--cases coupling,flowstep" runs a
# subset; results of earlier cases stay in the results file, so the suite can be split over commands.
GPU_PY ?= python3
BENCH_ARGS ?=
GPU_CHECK_S ?= 460
gpu-check: gpu-install
	$(GPU_PY) -m benchmarks.gpu_check --total-s $(GPU_CHECK_S)

gpu-install:
	$(GPU_PY) -m pip install --quiet --no-deps --no-build-isolation -e .

gpu-test: gpu-install
	$(GPU_PY) -m benchmarks.gpu_tests

gpu-bench: gpu-install
	$(GPU_PY) -m benchmarks --device cuda $(BENCH_ARGS)

# Ahead-of-time compile + register-spill check (tests/kernels/aot_compile.py) under the oldest supported
# Triton and the GPU machine's, each in a throwaway venv (.venv-triton-*; CPU torch, no GPU needed): make
# test checks only the installed Triton, and codegen (so register use) differs between releases. Pairing
# an old Triton with torch 2.13 relies on the CPU torch wheel this project's machines carry (PyPI's Linux
# torch wheels pin their own Triton).
OLD_TRITONS ?= 3.2.0 3.6.0
aot-old-tritons:
	for v in $(OLD_TRITONS); do \
		test -x .venv-triton-$$v/bin/python || $(PYTHON) -m venv .venv-triton-$$v || exit 1; \
		.venv-triton-$$v/bin/python -m pip install --quiet torch==2.13.0 numpy triton==$$v || exit 1; \
		.venv-triton-$$v/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . || exit 1; \
		echo "triton $$v:"; \
		TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1 .venv-triton-$$v/bin/python tests/kernels/aot_compile.py 80 90 \
			> .venv-triton-$$v/aot.log || { tail -40 .venv-triton-$$v/aot.log; exit 1; }; \
		tail -2 .venv-triton-$$v/aot.log; \
	done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-triton-* runs .pytest_cache
