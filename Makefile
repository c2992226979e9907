# The two commands a new user needs: `make up` (install + run the demo stack) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: deploy-assets image lock up test test-py313 lint typecheck unit e2e bench envoy-config api clean

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

# buf (protobuf linter) and the real agents for tests/clients (Claude Code, Codex) come from the npm registry;
# their tests skip with a note when npm is absent.
node_modules/.installed: package.json
	@if command -v npm >/dev/null 2>&1; then npm install --no-audit --no-fund --no-package-lock --silent && \
	touch $@; else echo "npm not found: buf lint and the real-client tests will be skipped"; fi

test: $(STAMP) lint typecheck node_modules/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15
	$(MAKE) --no-print-directory test-py313

# The unit and component tiers again on the newest supported Python (pyenv's 3.13 where it exists), from the
# same lock. Missing 3.13 skips with a note, or fails under NEXUS_REQUIRE_TOOLS (CI).
PY313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) $(shell command -v python3.13 2>/dev/null))
VENV313 := .venv-3.13
test-py313: $(STAMP)
	@if [ -z "$(PY313)" ]; then \
	  if [ "$$NEXUS_REQUIRE_TOOLS" = 1 ]; then echo "python3.13 not found"; exit 1; fi; \
	  echo "python3.13 not found: the 3.13 tier is skipped"; exit 0; fi; \
	[ -x $(VENV313)/bin/python ] || $(BIN)/uv venv -q --python $(PY313) $(VENV313); \
	VIRTUAL_ENV=$(abspath $(VENV313)) $(BIN)/uv sync -q --frozen --inexact --extra dev --active && \
	$(VENV313)/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/component

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
	rm -rf $(VENV) $(VENV313) build .mypy_cache .ruff_cache .pytest_cache nexus-demo-ledger.db*

# The runtime image (Containerfile): the wheel and the locked runtime wheels for this venv's Python, then an
# offline build. BASE must carry the same CPython minor version (3.11 for the default and for Debian bookworm).
IMAGE ?= localhost/nexus-extproc:0.1.0
BASE ?= docker.io/library/python:3.11-slim-bookworm
image: $(STAMP)
	$(BIN)/python -m nexus_dev.image build/wheels
	buildah bud --isolation chroot --format docker --build-arg BASE=$(BASE) -t $(IMAGE) -f Containerfile .
