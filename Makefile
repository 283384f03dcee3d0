# kangaroo-kernels. `make demo` runs the main job, `make test` the test suite; each sets up .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: all venv build test test-fast demo bench bench-gpu compile-report lint native-check clean

all: build

# What the package and the demo need; the test tools (pytest, scipy, ruff) come with `make test` / `make lint`.
$(VENV)/.deps: Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)" numpy ninja tqdm transformers tokenizers safetensors matplotlib
	touch $@

$(VENV)/.test-deps: $(VENV)/.deps
	$(PIP) install -q scipy pytest ruff
	touch $@

venv: $(VENV)/.deps $(VENV)/.test-deps

# Native build (C++ CPU ops; CUDA ops when nvcc + CUDA torch are present). Editable install of both packages.
# A stamp per kind (cpu: KANGAROO_FORCE_CPU=1; full: whatever nvcc allows) redoes it only when a native source,
# setup.py or the environment changed: `pip install -e .` recompiles everything (~3 minutes on 2 cores) each time.
NATIVE_SRC := setup.py pyproject.toml $(shell find csrc -type f)
BUILD_KIND = $(if $(filter 1,$(KANGAROO_FORCE_CPU)),cpu,full)
$(VENV)/.build-cpu $(VENV)/.build-full: $(VENV)/.deps $(NATIVE_SRC)
	rm -f $(VENV)/.build-cpu $(VENV)/.build-full
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.deps
	$(MAKE) --no-print-directory $(VENV)/.build-$(BUILD_KIND)
	$(PY) -c "import kangaroo_kernels as k; print('kangaroo_kernels build:', k.build_info())"

test: build $(VENV)/.test-deps
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: build $(VENV)/.test-deps
	$(PY) -m pytest -q -x -m "not slow" tests

# Without a GPU the demo needs only the C++ CPU ops: skip compiling the CUDA kernels (minutes on 2 cores).
HAVE_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
demo: export KANGAROO_FORCE_CPU := $(if $(HAVE_GPU),0,1)
demo: build
	$(PY) -m kangaroo.cli demo

bench: build
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

GPU_OUT ?= bench/results/gpu_suite
bench-gpu: build
	bash bench/run_gpu_suite.sh $(GPU_OUT)

# Compile every Triton kernel for sm_90 and sm_80 without a GPU; ptxas registers / spills / shared memory.
compile-report: $(VENV)/.deps
	$(PY) bench/compile_report.py --arch 90 80

lint: $(VENV)/.test-deps
	$(VENV)/bin/ruff check kangaroo_kernels python bench tests setup.py

# Torch-free compile check of the CUDA kernels (CMakeLists.txt), for sm_80 and sm_90.
native-check:
	cmake -S . -B build/native -DCMAKE_BUILD_TYPE=Release && cmake --build build/native -j $(MAX_JOBS)

clean:
	rm -rf build *.egg-info kangaroo_kernels/_C*.so kangaroo_kernels/_build_info.py $(VENV)/.build-cpu $(VENV)/.build-full
