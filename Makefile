# Two commands do everything on a fresh Linux machine with Python 3.11:
#   make main   set up, then train CycleGAN on the built-in sample data and benchmark the ops
#   make test   set up, then run the test suite (the same command CI runs)
# Set-up (idempotent): a virtualenv in .venv, the pinned dependencies, and ganengine built in
# place with its C++ (and, when nvcc is present, CUDA) kernels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2 -q

.PHONY: setup main test aot gpu-check gpu-bundle bench benchmarks clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# (a failed build stops here: the log's tail, and exit 1; and unless GANENGINE_SKIP_EXT=1 the
# extension must load: `import ganengine` alone succeeds without it, from the source tree)
$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)
	MAX_JOBS=2 $(BIN)/pip install --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 || { tail -n 30 $(VENV)/build.log; exit 1; }
	tail -n 3 $(VENV)/build.log
	$(BIN)/python -c "import os, ganengine, ganengine.backends as b; s = b.status(); print(s); \
	assert b.available()['cpu'] or os.environ.get('GANENGINE_SKIP_EXT') == '1', 'the C++ extension did not load: ' + s['cpu']"
	touch $@

setup: $(VENV)/.built

# the main job: train CycleGAN for 300 steps on the built-in sample data (checkpoints, PNG
# sample grids and a loss CSV under ./checkpoints/cyclegan_sample), then the quick benchmark
main: setup
	$(BIN)/ganengine info
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/ganengine train cyclegan --max_steps 300
	$(BIN)/ganengine bench --quick --output bench_results

test: setup aot
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# regenerate BENCHMARKS.md: every table measured now, on this machine (~40 min on 2 cores; keep
# the machine otherwise idle)
benchmarks: setup
	$(BIN)/python benchmarks/make_benchmarks_md.py

# compile every Triton kernel for sm_80 and sm_90 (no GPU needed); fails on register spills
aot: setup
	$(BIN)/python -m ganengine.tools.aot_report --markdown $(VENV)/aot_report.md

# the first command to run on a GPU machine (under 8 minutes on one H100/H200; build with
# `make setup` beforehand, it needs no GPU): one OK/FAIL/figure line per check, never stopping at
# the first failure; reports in gpu_check_report/ (report.md, report.json, logs). docs/gpu.md says
# what it checks. GANENGINE_GPU_CHECK_DRY=1 runs it on CPU tensors under the Triton interpreter.
gpu-check: setup
	$(BIN)/python -m ganengine.tools.gpu_check --out gpu_check_report

# The lent GPU machine has no package index and its own Python and torch (docs/gpu.md): build
# the extension for them here, then carry ganengine/$(DEVICE_SO) there and run
#   ln -sfn ../kernels ganengine/kernels; PYTHONPATH=$$PWD python3 -m ganengine.tools.gpu_check
DEVICE_PYTHON ?= $(firstword $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12))
DEVICE_TORCH ?= 2.11.0
DEVICE_TRITON ?= 3.6.0
DEVICE_SO := _C.cpython-312-x86_64-linux-gnu.so
gpu-bundle:
	@test -n "$(DEVICE_PYTHON)" || { echo "gpu-bundle: set DEVICE_PYTHON to a Python 3.12 (the GPU machine's version)"; exit 1; }
	test -x .venv-device/bin/python || $(DEVICE_PYTHON) -m venv .venv-device
	.venv-device/bin/pip install -q torch==$(DEVICE_TORCH) triton==$(DEVICE_TRITON) numpy pybind11 ninja setuptools
	PATH=$(CURDIR)/.venv-device/bin:$$PATH GANENGINE_BUILD_CUDA=1 GANENGINE_CUDA_ARCH=9.0 GANENGINE_CPU_ARCH=avx2 \
		MAX_JOBS=2 python setup.py build_ext --inplace > build-device.log 2>&1 || { tail -n 20 build-device.log; exit 1; }
	strip --strip-debug ganengine/$(DEVICE_SO)   # under the device tool's 64 MiB carry limit
	@ls -la ganengine/$(DEVICE_SO)

bench: setup
	$(BIN)/python -m benchmarks.bench_norm_act

clean:
	rm -rf build $(VENV) ganengine/_C*.so *.egg-info
