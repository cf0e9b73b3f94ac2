# The README's two commands: `make demo` and `make test`. Both create .venv from nothing when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_DEPS := pytest pytest-benchmark hypothesis expecttest "transformers==5.18.0" timm tokenizers matplotlib
BUILD_DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja
JOBS ?= $(shell nproc)
# VLFUSE_CUDA=0/1 forces the CUDA kernels off/on; unset builds them when nvcc and a CUDA torch are present.
export VLFUSE_CUDA
export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)

.PHONY: all venv install inplace demo test test-cuda test-asan fuzz bench clean

all: install

$(VENV)/.deps: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q $(BUILD_DEPS) numpy safetensors pillow pyyaml $(TEST_DEPS)
	touch $@

venv: $(VENV)/.deps

# A regular (non-editable) install: what users get from `pip install --no-build-isolation .`.
install: $(VENV)/.deps
	$(PIP) install --no-build-isolation --no-deps -q .
	$(PY) -m vlfuse info

# Developer build: compiles into build/inplace and drops _C next to the sources (use PYTHONPATH=python).
inplace: $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B build/inplace -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) \
	  -DVLFUSE_CUDA=$${VLFUSE_CUDA:-AUTO} -DVLFUSE_SANITIZE=$${VLFUSE_SANITIZE:-OFF}
	$(VENV)/bin/cmake --build build/inplace
	cp build/inplace/_C*.so python/vlfuse/

demo: install
	$(PY) -m vlfuse demo --json demo.json

test: install
	$(PY) -m pytest tests -q -p no:cacheprovider

test-cuda: install
	$(PY) -m pytest tests -q -m cuda

fuzz: install
	VLFUSE_FUZZ_EXAMPLES=2000 $(PY) -m pytest tests/test_fuzz.py -q

bench: install
	$(PY) -m vlfuse bench

clean:
	rm -rf build python/vlfuse/_C*.so dist *.egg-info
