# calcinosis-cds — `make run` (service on embedded defaults) and `make test` (whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint lint-helm lint-compose typecheck run evaluate bench clean

# Helm checks need Python >= 3.12 (helm-sdkpy): a separate venv from pyenv's 3.12.1 (or any python3.12).
HELM_VENV := .venv-helm
HELM_PY := $(HELM_VENV)/bin/python
HELM_PKGS := helm-sdkpy==0.1.32 helm-python-sdk==0.2.2 jsonschema==4.26.0 pyyaml==6.0.3
HELM_STAMP := $(HELM_VENV)/.installed-sdkpy-0.1.32-hps-0.2.2

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

$(HELM_STAMP):
	@py="$$(pyenv prefix 3.12.1 2>/dev/null)/bin/python"; \
	[ -x "$$py" ] || py="$$(command -v python3.12 || true)"; \
	[ -n "$$py" ] || { echo "lint-helm needs Python 3.12 (pyenv install 3.12.1)" >&2; exit 1; }; \
	rm -rf $(HELM_VENV) && "$$py" -m venv $(HELM_VENV)
	$(HELM_PY) -m pip install -q --upgrade pip
	$(HELM_PY) -m pip install -q $(HELM_PKGS)
	touch $(HELM_STAMP)

lint-helm: $(HELM_STAMP)
	$(HELM_PY) scripts/helm_lint.py

lint-compose: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/ops/test_compose.py tests/ops/test_dockerfile.py tests/ops/test_env_example.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy service workers

test: $(STAMP) lint-helm lint-compose
	bash scripts/ensure-services.sh
	$(MAKE) lint
	$(MAKE) typecheck
	$(PY) -m pytest -q -p no:cacheprovider

evaluate: $(STAMP)
	$(VENV)/bin/calcinosis-cds evaluate tests/data/synthea --now 2020-06-01T00:00:00Z

run: $(STAMP)
	mkdir -p var
	bash scripts/run-local.sh

bench: $(STAMP)
	$(PY) bench/evaluate.py

clean:
	rm -rf $(VENV) $(HELM_VENV) var .pytest_cache .mypy_cache .ruff_cache
