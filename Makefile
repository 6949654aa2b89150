# The two commands a fresh machine needs: `make dev` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test check lint format bench clean lock

# Exactly the versions in the lock (hash-checked), then Postlane itself, editable, with no
# dependency of its own left to resolve. `make lock` rewrites the locks from pyproject.toml.
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "make lock"
$(STAMP): pyproject.toml requirements/dev.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# requirements/production.lock: what `pip install postlane` needs (the Dockerfile's set);
# requirements/dev.lock: that plus the [dev], [testing] and [ci] extras (this Makefile's).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o requirements/production.lock
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) --extra dev --extra testing --extra ci \
	  -o requirements/dev.lock

# Debian packages the tests need: docker-compose only parses docker-compose.yml (no engine);
# chromium loads the Temporal Web UI headless; tmux is the real terminal `postlane top` is
# tested in; dovecot (IMAP) and postfix (SMTP) are servers the tests start themselves, on
# loopback with configuration of their own; prometheus gives promtool (alert rules and
# their unit tests, the exporter's output format) and a Prometheus server the tests start
# themselves; nginx is the TLS-terminating gRPC proxy the mTLS and API-key tests put in
# front of the dev server, which has no TLS of its own (tests/tls_proxy.py), and stunnel4
# the TLS-only tunnel a test shows Temporal's client refusing (no HTTP/2 by ALPN). A test whose
# program is missing fails, naming the package (tests/sysdeps.py). Postfix is installed
# unconfigured ("No configuration": no main.cf, so no system daemon starts on port 25);
# DPkg::Lock::Timeout waits for another apt run instead of failing.
SYSTEM_PACKAGES := docker-compose chromium dovecot-imapd postfix tmux prometheus nginx stunnel4
$(VENV)/.system: $(STAMP) Makefile
	{ command -v docker-compose && command -v chromium && test -x /usr/sbin/dovecot && test -x /usr/sbin/postfix && command -v tmux && command -v promtool && test -x /usr/sbin/nginx && command -v stunnel4; } >/dev/null || { \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections && \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
	    --no-install-recommends $(SYSTEM_PACKAGES); }
	touch $@

# The TypeScript example client (tests/test_foreign_client.py runs it with node): its
# packages come from the npm registry here, at setup, never while the tests run.
TS_EXAMPLE := examples/typescript
$(TS_EXAMPLE)/dist/send.js: $(TS_EXAMPLE)/package-lock.json $(TS_EXAMPLE)/src/send.ts $(TS_EXAMPLE)/tsconfig.json
	command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends nodejs npm; }
	cd $(TS_EXAMPLE) && npm ci --no-audit --no-fund && npm run build
	touch $@

dev: $(STAMP)  ## Temporal dev server + Web UI, SMTP catcher, worker, demo email
	$(BIN)/postlane dev

test: $(STAMP) $(VENV)/.system $(TS_EXAMPLE)/dist/send.js  ## the whole suite, lint and types included (CI runs exactly this)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .postlane
