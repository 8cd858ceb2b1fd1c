# Meshkeeper: `make test` and `make demo` work on a fresh Debian machine with Python 3.11
# (DESIGN §8): they create the virtualenv, install the package and ZooKeeper, then run.

PYTHON     ?= python3.11
VENV       ?= .venv
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed
BENCH_ARGS ?=
PYTEST_ARGS ?=
ZK_ENSEMBLE ?=

# sudo only when not root (CI and containers run as root and often have no sudo).
SUDO       := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
APT_GET    := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get
APT_INSTALL := $(APT_GET) install -y --no-install-recommends

.PHONY: help venv zookeeper test lint demo bench bench-tools proto console-vendor clean distclean

help:
	@echo "targets: venv zookeeper test lint demo bench proto console-vendor clean distclean"
	@echo "  make test PYTEST_ARGS='-k harness'   make bench BENCH_ARGS='--only haproxy,nginx --duration 5'"
	@echo "  make demo ZK_ENSEMBLE=3   (ZooKeeper as a 3-server ensemble on this machine)"

# --------------------------------------------------------------------------- environment

venv: $(STAMP)

# Rebuilt whenever pyproject.toml changes; `pip install -e` is idempotent.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv (ensurepip is missing)"; \
	  $(APT_GET) update && $(APT_INSTALL) python3-venv; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# xds-protos overwrites files of opentelemetry-proto and googleapis-common-protos whichever
	@# order pip picked: put them back over it, then check (DESIGN §4a, meshkeeper/deps.py).
	$(BIN)/meshkeeper doctor --fix
	touch $@

zookeeper:
	@if [ ! -d /usr/share/zookeeper ]; then \
	  echo "installing ZooKeeper from the distribution's packages"; \
	  $(APT_GET) update && $(APT_INSTALL) zookeeper; \
	fi

# --------------------------------------------------------------------------- the two commands

lint: venv
	$(BIN)/ruff check

test: venv zookeeper
	$(BIN)/ruff check
	$(BIN)/pytest -q $(PYTEST_ARGS)

# ZK_ENSEMBLE=3: ZooKeeper as an ensemble of three servers (meshkeeper demo --zk-ensemble 3).
demo: venv zookeeper
	$(BIN)/meshkeeper demo $(if $(ZK_ENSEMBLE),--zk-ensemble $(ZK_ENSEMBLE))

# --------------------------------------------------------------------------- benchmark

bench-tools:
	@missing=""; \
	for tool in /usr/sbin/nginx:nginx /usr/sbin/haproxy:haproxy /usr/bin/wrk:wrk /usr/bin/h2load:nghttp2-client; do \
	  [ -x "$${tool%%:*}" ] || missing="$$missing $${tool##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  $(APT_GET) update && $(APT_INSTALL) $$missing; \
	fi

bench: venv zookeeper bench-tools
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# --------------------------------------------------------------------------- code generation

# The admin API's Python code (meshkeeper/admin/v1/) from proto/meshkeeper/admin/v1/admin.proto, with
# the grpcio-tools pinned in pyproject.toml. The output is committed; tests/unit/test_proto_generated.py
# fails when it is stale.
proto: venv
	$(BIN)/python proto/generate.py

# --------------------------------------------------------------------------- console assets

# The console's vendored front-end libraries (controlplane/console/static/vendor/): minified releases
# from the npm registry with their licences, recorded in VERSIONS. Needs npm; run it to upgrade
# (change the version here), then commit the files. Nothing is fetched at `make demo` time.
CYTOSCAPE_VERSION ?= 3.35.0
CONSOLE_VENDOR := controlplane/console/static/vendor

console-vendor:
	@command -v npm >/dev/null || { echo "console-vendor needs npm (apt-get install npm)"; exit 1; }
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  (cd "$$tmp" && npm pack --silent cytoscape@$(CYTOSCAPE_VERSION) >/dev/null && tar xzf cytoscape-$(CYTOSCAPE_VERSION).tgz) && \
	  cp "$$tmp/package/dist/cytoscape.min.js" $(CONSOLE_VENDOR)/cytoscape.min.js && \
	  cp "$$tmp/package/LICENSE" $(CONSOLE_VENDOR)/cytoscape.LICENSE && \
	  license=$$(cd "$$tmp/package" && node -p 'require("./package.json").license') && \
	  { echo "# The console's vendored libraries: name version licence file sha256 (make console-vendor)"; \
	    echo "cytoscape $(CYTOSCAPE_VERSION) $$license cytoscape.min.js $$(sha256sum $(CONSOLE_VENDOR)/cytoscape.min.js | cut -d' ' -f1)"; \
	  } > $(CONSOLE_VENDOR)/VERSIONS
	@cat $(CONSOLE_VENDOR)/VERSIONS

# --------------------------------------------------------------------------- cleanup

clean:
	rm -rf build bench/out bench/out-interleaved .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
