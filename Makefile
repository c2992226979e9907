# The two commands a new user needs: `make up` (install + run the demo stack) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: deploy-assets image lock up test lint typecheck unit e2e bench envoy-config api clean

# Installs exactly what uv.lock pins (uv itself comes from PyPI into the venv); `make lock` re-resolves.
$(STAMP): pyproject.toml uv.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'uv>=0.9,<1'
	VIRTUAL_ENV=$(abspath $(VENV)) $(BIN)/uv sync -q --frozen --inexact --extra dev --active
	touch $(STAMP)

lock: $(STAMP)
	$(BIN)/uv lock

# `make up ARGS=--fresh` starts from an empty demo ledger; any `python -m nexus_dev --help` flag works.
up: $(STAMP)
	$(BIN)/python -m nexus_dev $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check nexus_extproc nexus_dev tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# buf (protobuf linter) comes from the npm registry; skipped with a note when npm is absent.
node_modules/.bin/buf: package.json
	@if command -v npm >/dev/null 2>&1; then npm install --no-audit --no-fund --no-package-lock --silent; \
	else echo "npm not found: buf lint will be skipped"; fi

test: $(STAMP) lint typecheck node_modules/.bin/buf
	$(BIN)/python -m pytest -q -p no:cacheprovider

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/component

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/budgets.py
	$(BIN)/python bench/accuracy.py

api: $(STAMP)
	$(BIN)/python -m nexus_extproc.api.generate

# deploy/kubernetes/base, the redis-ha config and the mesh manifests, rendered from the Helm chart.
deploy-assets: $(STAMP)
	$(BIN)/python -m nexus_dev.deploy_assets

envoy-config: $(STAMP)
	$(BIN)/python -m nexus_dev.envoy_config > envoy/nexus.yaml

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache nexus-demo-ledger.db*

# The runtime image (Containerfile): the wheel and the locked runtime wheels for this venv's Python, then an
# offline build. BASE must carry the same CPython minor version (3.11 for the default and for Debian bookworm).
IMAGE ?= localhost/nexus-extproc:0.1.0
BASE ?= docker.io/library/python:3.11-slim-bookworm
image: $(STAMP)
	$(BIN)/python -m nexus_dev.image build/wheels
	buildah bud --isolation chroot --format docker --build-arg BASE=$(BASE) -t $(IMAGE) -f Containerfile .
