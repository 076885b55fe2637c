# calcinosis-cds — `make run` (service on embedded defaults) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint typecheck run evaluate bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy service workers

test: $(STAMP)
	bash scripts/ensure-services.sh
	$(MAKE) lint
	$(PY) -m pytest -q -p no:cacheprovider

evaluate: $(STAMP)
	$(VENV)/bin/calcinosis-cds evaluate tests/data/synthea --now 2020-06-01T00:00:00Z

run: $(STAMP)
	$(VENV)/bin/calcinosis-cds evaluate tests/data/synthea --now 2020-06-01T00:00:00Z

bench: $(STAMP)
	$(PY) bench/evaluate.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
