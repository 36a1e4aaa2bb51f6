# The README's commands: `make serve` and `make test` (what CI runs); `make demo` writes sample grids and a zip to
# out/ without a server.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve demo test lint docker-check browser postgres clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first: it is the CPU wheel on disk; an unpinned torch would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e ./clients/python
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/synthgen serve

demo: install
	$(BIN)/synthgen generate --model models/mnist-cgan --per-class 10 --seed 0 --out out/mnist-cgan.png
	$(BIN)/synthgen generate --model models/mnist-cvae --per-class 10 --seed 0 --out out/mnist-cvae.png
	$(BIN)/synthgen generate --model models/mnist-cgan --per-class 100 --seed 0 --out out/mnist-cgan.zip

test: install docker-check browser postgres
	$(BIN)/ruff check app tests clients
	$(BIN)/python -m pytest -q

# The job-store tests need a PostgreSQL server (a throw-away cluster per test session); as root (CI) Debian's package
# is installed, else those tests skip.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
		else echo "PostgreSQL missing and not root: the PostgreSQL tests will skip"; fi; \
	fi

# The browser tests need Debian's chromium and chromedriver; as root (CI) they are installed, else the tests skip.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
		else echo "chromium/chromedriver missing and not root: the browser tests will skip"; fi; \
	fi

# No Docker engine here: lint the Dockerfile, then replay its install script in a fresh virtual environment
# and smoke-test the result (serve the models, generate a grid from each).
docker-check: install
	$(BIN)/hadolint Dockerfile
	rm -rf .docker-replay && $(PYTHON) -m venv .docker-replay
	. .docker-replay/bin/activate && TORCH=cpu sh deploy/install.sh . >/dev/null
	sh deploy/smoke.sh .docker-replay/bin/python models
	rm -rf .docker-replay && $(PYTHON) -m venv .docker-replay
	# the CUDA image's branch: torch comes with the base image (here the CPU wheel stands in for it) and the
	# install must keep it
	.docker-replay/bin/python -m pip install --quiet torch==2.13.0
	. .docker-replay/bin/activate && TORCH=preinstalled sh deploy/install.sh . | grep "keeps the preinstalled torch"
	sh deploy/smoke.sh .docker-replay/bin/python models
	rm -rf .docker-replay

lint: install
	$(BIN)/ruff check app tests clients

clean:
	rm -rf $(VENV) out
