# The verbs a newcomer types: `make run` and `make test`. Everything they need is
# installed here, into .venv (PyPI) and node_modules (npm), on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
# checkov pins packaging<24, pytest 9 needs >=24: it gets a venv of its own.
CHECKOV_VERSION := 3.3.30
CHECKOV := .tools/checkov-$(CHECKOV_VERSION)/bin/checkov

.DEFAULT_GOAL := help
.PHONY: help install debian-tools patroni generate check-generated lint format typecheck test run bench chaos clean release-contract

help:
	@echo "make run       the whole stack on embedded defaults, in the foreground (Ctrl-C stops it); TLS=1: every hop over TLS"
	@echo "make test      lint, types, generated-code drift, buf lint, and the test suite"
	@echo "make generate  regenerate service/gen and the descriptor set from protos/"
	@echo "make format    apply ruff and buf formatting"
	@echo "make release-contract  take protos/ as the released contract (a deliberate breaking change)"
	@echo "make chaos     every fault scenario at full size: webhook storm, Creates under Stripe faults, Postgres faults under Patroni, restarts"
	@echo "make bench     the benchmark at BENCH_INVOICES (default 1,000,000); results/ has JSON and a chart"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(CHECKOV):
	rm -rf .tools/checkov-$(CHECKOV_VERSION)
	$(PYTHON) -m venv .tools/checkov-$(CHECKOV_VERSION)
	.tools/checkov-$(CHECKOV_VERSION)/bin/python -m pip install --quiet checkov==$(CHECKOV_VERSION)

install: $(BIN)/.installed $(BUF) $(CHECKOV)

# From Debian: wrk (HTTP load) for the benchmark and its small run in `make test`,
# pgbouncer for the test of the service behind a transaction-mode pooler, and etcd and
# python3-venv for the failover scenario's Patroni cluster.
debian-tools:
	@(command -v wrk && test -x /usr/sbin/pgbouncer && command -v etcd && /usr/bin/python3 -m ensurepip --version) \
		>/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq wrk pgbouncer etcd-server python3-venv)

# Patroni for the failover scenario: a venv on Debian's python3 under .tools/ (it runs as
# the unprivileged Postgres user, who cannot read root's pyenv); tools/patroni.py pins it.
patroni: $(BIN)/.installed debian-tools
	$(BIN)/python -m tools.patroni

generate: install
	$(BIN)/python -m tools.generate

# Regenerates into a temporary folder and fails if the committed code differs; it also
# writes the build files (descriptor set, googleapis imports) that buf and Envoy read.
check-generated: install
	$(BIN)/python -m tools.generate --check

# The contract as released: `buf breaking` compares protos/ with it, so a wire- or
# JSON-breaking change (a renumbered field, a renamed RPC) fails here. A deliberate one is
# made with `make release-contract` in the same commit, saying why.
RELEASED_CONTRACT := protos/released.binpb

lint: check-generated
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BUF) lint
	$(BUF) format --diff --exit-code
	$(BUF) build -o .build/contract.binpb
	$(BUF) breaking .build/contract.binpb --against $(RELEASED_CONTRACT)

release-contract: check-generated
	$(BUF) build -o $(RELEASED_CONTRACT)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BUF) format -w

typecheck: install
	$(BIN)/mypy

test: lint typecheck debian-tools patroni
	$(BIN)/pytest

run: check-generated
	TLS=$(TLS) $(BIN)/python -m tools.stack

bench: check-generated debian-tools
	$(BIN)/python -m bench.run

# Full size; `make test` runs the same scenarios reduced (tests/test_chaos.py, test_restart.py, test_rolling.py).
chaos: check-generated debian-tools patroni
	$(BIN)/python -m chaos

clean:
	rm -rf .build .mypy_cache .ruff_cache .pytest_cache
