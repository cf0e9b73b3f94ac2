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

.PHONY: all venv install inplace demo test test-hf4 test-cuda test-asan fuzz bench gpu-check clean

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

# vlfuse.patch against transformers 4.57 (the venv holds 5.x): pip --target puts 4.57.6 and the hub/tokenizers
# versions it pins into build/hf4, first on PYTHONPATH, so the venv's torch is reused instead of a second venv.
HF4_DEPS := "transformers==4.57.6" "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0" requests urllib3 idna charset_normalizer certifi
test-hf4: install
	$(PIP) install -q --no-deps --upgrade --target build/hf4 $(HF4_DEPS)
	PYTHONPATH=build/hf4 $(PY) -m pytest tests/test_patch.py -q -p no:cacheprovider

test-cuda: install
	$(PY) -m pytest tests -q -m cuda

# CPU kernels built with AddressSanitizer + UndefinedBehaviorSanitizer, loaded into an unsanitized Python/torch
# (so the ASan runtime is preloaded); the op tests run against that build. Suppressions: tests/asan.supp.
ASAN_TESTS ?= tests/test_rope.py tests/test_patchify.py tests/test_merge.py tests/test_errors.py
test-asan: $(VENV)/.deps
	$(VENV)/bin/cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) \
	  -DVLFUSE_CUDA=OFF -DVLFUSE_SANITIZE=ON
	$(VENV)/bin/cmake --build build/asan
	rm -rf build/asan-pkg && mkdir -p build/asan-pkg && cp -r python/vlfuse build/asan-pkg/ \
	  && rm -f build/asan-pkg/vlfuse/_C*.so && cp build/asan/_C*.so build/asan-pkg/vlfuse/
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:abort_on_error=1:suppressions=$(abspath tests/asan.supp) \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=$(abspath tests/ubsan.supp) \
	  PYTHONPATH=build/asan-pkg $(PY) -m pytest $(wildcard $(ASAN_TESTS)) -q -p no:cacheprovider -m "not cuda"

fuzz: install
	VLFUSE_FUZZ_EXAMPLES=2000 $(PY) -m pytest tests/test_fuzz.py -q

bench: install
	$(PY) -m vlfuse bench

# The GPU check in one command, with the python3 on PATH and no venv (a GPU machine may have no network):
# builds in place for the present GPU only, then the CUDA tests, compute-sanitizer, Nsight Compute, the benchmark
# and a CUDA-graph capture, each time-boxed (8 minutes in all). Writes gpu-check.json, gpu-check.log and the
# benchmark's JSON into OUT. GPU_CHECK_ARGS=--dry-run runs it without a GPU (tests/test_gpu_check.py does).
OUT ?= build/gpu-check-report
gpu-check:
	PYTHONPATH=python$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) -m vlfuse gpu-check --out $(OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build python/vlfuse/_C*.so dist *.egg-info
