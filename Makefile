# The two commands of the README: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
BUF     := .tools/node_modules/.bin/buf
BUF_VERSION := 1.75.0

.PHONY: setup demo test lint typecheck protos-check buf services pytest bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

setup: $(VENV)/.installed $(BUF)
	@# Dovecot for the IMAP tests (started privately by the tests, never as a service).
	@test -x /usr/sbin/dovecot || dpkg -s dovecot-imapd >/dev/null 2>&1 || { s=$$([ "$$(id -u)" = 0 ] || echo sudo); $$s apt-get update -q && $$s apt-get install -y -q --no-install-recommends dovecot-imapd; }

services:
	bash scripts/ensure_services.sh

demo: setup services
	$(BIN)/channel-gateway demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy gateway connectors

protos-check: setup
	$(BIN)/python scripts/gen_protos.py --check

buf: setup
	cd proto && ../$(BUF) lint
	bash scripts/buf_breaking.sh $(BUF)

pytest: setup services
	$(BIN)/python -m pytest -q

test: lint typecheck protos-check buf pytest

bench: setup services
	$(BIN)/python -m benchmarks.sms_webhooks
	$(BIN)/python -m benchmarks.voice_answer

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
