# The two commands of the README: `make demo` and `make test`.
# Both create .venv with the machine's python3 (3.11-3.13), install parloop
# into it, and run; nothing else needs to be on the machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# the browser tests drive Debian's Chromium (installed when missing)
CHROMIUM := /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test test-fast lint test-browser chromium bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) notebooks/run.py notebooks/quickstart.ipynb

chromium:
	@test -x $(CHROMIUM) || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

# the linter (rules in pyproject.toml) and the type checker, then the tests
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks notebooks/run.py
	$(PY) -m ruff format --check src tests benchmarks notebooks/run.py
	$(PY) -m mypy

test: $(STAMP) chromium lint
	$(PY) -m pytest -q tests

# while developing: no cluster, browser or slow test, and no lint (make test runs them all)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not cluster and not browser and not slow" tests

test-browser: $(STAMP) chromium
	$(PY) -m pytest -q -s tests/test_browser.py

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) build dist .pytest_cache labextension/lib labextension/dist labextension/node_modules
