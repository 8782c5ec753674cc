# Fresh machine: `make run` (the main job on the bundled example) and
# `make test` (the test suite) set everything up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STATE ?= .lbc-demo

.PHONY: setup sysdeps scorecard-deps run test scorecard bench bench-config bench-data docs lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(STAMP)

# Debian packages the tests need: redis-server (the sticky store tests run a
# real one), keepalived and iproute2 (the virtual IP failover test, in network
# namespaces). Installed with apt-get when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
sysdeps:
	@command -v redis-server >/dev/null && { command -v keepalived || test -x /usr/sbin/keepalived; } >/dev/null \
		&& command -v ip >/dev/null || { echo "installing redis-server, keepalived and iproute2 with apt-get"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			redis-server keepalived iproute2 >/dev/null; }

# What `make scorecard` drives besides the tests' own clients: slowhttptest
# and hey, from Debian's packages.
scorecard-deps:
	@command -v slowhttptest >/dev/null && command -v hey >/dev/null || { \
		echo "installing slowhttptest and hey with apt-get"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slowhttptest hey >/dev/null; }

# The main job: the example backends and lbc in front of them on
# examples/pool.yaml, in the foreground; Ctrl-C drains and stops everything.
run: setup
	$(BIN)/python examples/demo.py --state $(DEMO_STATE)

test: setup sysdeps
	$(BIN)/python -m pytest

# Hostile clients and faults: every test marked with a scorecard row, the
# long ones included (about 10 minutes); prints one line per row and writes
# bench/SCORECARD.md. The quick rows run in `make test` too.
scorecard: setup sysdeps scorecard-deps
	$(BIN)/python -m pytest -m row --scorecard

# Both benchmarks: the control plane's (validate + compile + plan of a big
# config) and the data plane's (lbc vs HAProxy vs direct on NGINX, about
# 10 minutes; installs haproxy, nginx-light and wrk with apt-get when missing,
# writes bench/RESULTS.md). BENCH_ARGS is passed to bench/run (see --help).
bench: bench-config bench-data

bench-config: setup
	$(BIN)/python bench/config_speed.py

bench-data: setup
	LBC_BENCH_COMMAND="make $(or $(MAKECMDGOALS),bench-data)$(if $(BENCH_ARGS), BENCH_ARGS='$(BENCH_ARGS)')" \
		bench/run $(BENCH_ARGS)

# Regenerate the README's config and CLI references (a test checks them).
docs: setup
	$(BIN)/python -m lbc.docgen --write README.md

lint: setup
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check lbc workers tests bench

clean:
	rm -rf $(VENV) $(DEMO_STATE) build *.egg-info
