# The two commands of the README: `make demo` (the main job on the default models) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU wheel on disk; an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/synthgen serve

demo: install
	$(BIN)/synthgen generate --model models/mnist-cgan --per-class 10 --seed 0 --out out/mnist-cgan.png
	$(BIN)/synthgen generate --model models/mnist-cvae --per-class 10 --seed 0 --out out/mnist-cvae.png
	$(BIN)/synthgen generate --model models/mnist-cgan --per-class 100 --seed 0 --out out/mnist-cgan.zip

test: install
	$(BIN)/ruff check app tests
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check app tests

clean:
	rm -rf $(VENV) out
