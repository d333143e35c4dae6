# pretrain-kernels: two commands on a fresh machine (Python 3.10+, a C++ compiler):
#   make demo   set up (virtualenv, torch, the package with its extension), run the main job
#   make test   same set-up, then the C++ and Python test suites
# Knobs: PYTHON (the interpreter that creates .venv), TORCH_SPEC (which torch to install),
# PK_BUILD_CUDA / TORCH_CUDA_ARCH_LIST / MAX_JOBS (see setup.py), PYTEST_ARGS.

PYTHON ?= python3
TORCH_SPEC ?= torch>=2.5
EXTRAS ?= test,train
PYTEST_ARGS ?=
# Skips the Python tests may make (tests/conftest.py's skip audit): any other skip, or a run in
# which no test passed, fails test-py. Empty to switch the audit off (e.g. for a -k subset).
PK_EXPECTED_SKIPS ?= tests/expected_skips.txt

# Use the active virtualenv if there is one, else ./.venv (created on demand).
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
VENV_DEP :=
else
PY := $(CURDIR)/.venv/bin/python
VENV_DEP := .venv/bin/python
endif

SOURCES := $(shell find csrc python -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.py') setup.py pyproject.toml
STAMP := build/.installed-$(notdir $(PY))

.PHONY: setup demo test test-py test-cpp sanitize bench device-check clean

.venv/bin/python:
	$(PYTHON) -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip setuptools wheel

# torch first (the extension builds against it), then the package without build isolation.
$(STAMP): $(VENV_DEP) $(SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q ninja "setuptools>=77" wheel
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@mkdir -p build && touch $@

setup: $(STAMP)

demo: setup
	$(PY) -m pretrain_kernels.demo

test: setup test-cpp test-py

test-py: setup
	PK_EXPECTED_SKIPS=$(PK_EXPECTED_SKIPS) $(PY) -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

# Header-only C++ tests (RNG known answers) through CMake/ctest.
test-cpp:
	cmake -S . -B build/cmake -DPK_WITH_TORCH=OFF -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/cmake > /dev/null
	ctest --test-dir build/cmake --output-on-failure

# make sanitize: the CPU kernels under AddressSanitizer + UBSan. Builds libpretrain_kernels_ops.so
# with -DPK_SANITIZE=ON (CMake, build/cmake-sanitize; cmake, ninja and g++'s libasan needed) and
# runs the CPU tests of masking, sampling, denoising, attention and the property tests against
# it, the ASan runtime preloaded into python, then the attention tests again on the generic and
# AVX-512 paths (scripts/sanitize.sh says how; PYTEST_ARGS replaces the selection). Any ASan or
# UBSan report fails the target. About 8 minutes on 2 cores (build ~4, tests ~3.5), so not part
# of `make test` / CI: run it after changing a CPU kernel. Needs torch, pytest and hypothesis in
# the interpreter (the package is imported from python/, the extension is not needed).
sanitize: $(VENV_DEP)
	PYTHON=$(PY) bash scripts/sanitize.sh $(PYTEST_ARGS)

# make bench: pk-bench (python/pretrain_kernels/bench) on this machine, every family, against every
# alternative installed here; the table, plot and machine description go to build/bench/.
# BENCH_ARGS passes options (e.g. BENCH_ARGS="masking sampling --quick"); BENCH_ALTERNATIVES are
# installed first where they install (a failure only means pk-bench skips them and says so).
BENCH_ARGS ?=
BENCH_ALTERNATIVES ?= numba transformers diffusers
bench: setup
	$(PY) -m pip install -q "pytest-benchmark>=4" matplotlib
	-$(PY) -m pip install -q $(BENCH_ALTERNATIVES)
	$(PY) -m pretrain_kernels.bench --out build/bench $(BENCH_ARGS)

device-check:
	bash scripts/device_check.sh

clean:
	rm -rf build python/pretrain_kernels/_C*.so *.egg-info python/*.egg-info
