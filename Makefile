# Quickstart targets. Everything installs into .venv from PyPI; the C++ (and, where nvcc is
# found, CUDA) library is built by `pip install` through scikit-build-core.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup build demo demo-ops study test test-isa test-slow test-mutants test-peers lint bench \
	check-aarch64 clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Build requirements are installed into the venv and the package is built without isolation,
# so jax (whose headers the C++ build uses) is downloaded once.
$(STAMP): $(PY) pyproject.toml CMakeLists.txt $(wildcard xla_ffi/*)
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja "jax>=0.10,<0.13"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)
build: $(STAMP)

# The main job on the embedded default: generate digits_deformed (first run only), train the
# small ResNet with local deformable kernels, evaluate the final checkpoint. Writes
# runs/digits_deformed/{summary.json, curves.png, metrics.jsonl}. Re-running resumes.
demo: $(STAMP)
	$(PY) -m train --config digits_deformed
	$(PY) -m train.evaluate --checkpoint runs/digits_deformed

# The scale study (studies/, 42 min on a 2-core CPU): does a deformable layer's effective
# receptive field follow the object's scale? Writes digits_scaled (first run only), trains the
# small ResNet on it for 4 arms x 5 seeds, measures the ERFs with their controls, applies the
# pre-registered decision rule (plus an exploratory ERF measurement on a larger canvas) and
# writes docs/RESULTS.md and docs/study/*.png. Runs go to runs/scale_study/; re-running skips
# finished runs and analyses.
# matplotlib is the `study` extra (already there when `make setup` installed the test extra).
study: $(STAMP)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PIP) install -q "matplotlib>=3.7"
	$(PY) -m studies.scale --explore-pad 16

# A short tour of the three operators (ffi against the reference, with timings).
demo-ops: $(STAMP)
	$(PY) scripts/demo_ops.py

# The test files are spread over TEST_WORKERS processes (pytest-xdist; a file stays in one
# process, so its module fixtures are built once). TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The operator suite under each build of the CPU loops this CPU runs (AVX-512, AVX2, baseline):
# `make test` runs the best build, and compares all of them on every kernel family
# (tests/test_build.py); this runs every operator test under each.
test-isa: $(STAMP)
	for isa in $$($(PY) -c "import dk_jax; print(' '.join(dk_jax.cpu_isas()))"); do \
	  echo "== DK_JAX_CPU_ISA=$$isa"; \
	  DK_JAX_CPU_ISA=$$isa $(PY) -m pytest -q tests/test_ops.py tests/test_grads.py \
	    tests/test_cols.py tests/test_higher_order.py tests/test_build.py || exit 1; \
	done

# Cross-compiles the CPU library for aarch64 (needs Debian's g++-aarch64-linux-gnu).
check-aarch64: $(STAMP)
	bash scripts/cross_check_aarch64.sh

# Long tests kept out of `make test` (see pyproject's markers).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Mutation check of the suite: plants each bug listed in scripts/mutants.py (Python rules and
# C++ handlers, the latter in a scratch build) and expects the tests guarding it to fail.
test-mutants: $(STAMP)
	$(PY) scripts/mutants.py

# Cross-checks against torch/torchvision (a large download).
test-peers: $(STAMP)
	$(PIP) install -q --no-build-isolation -e ".[test,peers]"
	$(PY) -m pytest -q -m peers

# Operator and model benchmarks on this machine, then docs/BENCHMARKS.md from all results
# (GPU rows come from scripts/gpu_check.sh runs saved in benchmarks/results/).
bench: $(STAMP)
	$(PY) -m benchmarks.ops --isa
	$(PY) -m benchmarks.ops --json benchmarks/results/ops_cpu.json
	$(PY) -m benchmarks.models --json benchmarks/results/models_cpu.json
	$(PY) -m benchmarks.second_order --json benchmarks/results/second_order_cpu.json
	$(PY) -m benchmarks.report

lint: $(STAMP)
	$(VENV)/bin/ruff check dk_jax train studies tests benchmarks scripts

clean:
	rm -rf build $(VENV)
