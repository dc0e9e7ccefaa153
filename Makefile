# make test : set everything up and run the test suite (real PostgreSQL).
# make sqlalchemy-suite : SQLAlchemy's dialect compliance suite, in full.
# make docs : rewrite etc/poolbroker.toml and README's settings table from
#             the settings declared in broker/config.py.
# make soak : the long soak (1,000,000 requests, clients killed at random).
# make run  : set everything up and run the broker under supervisord,
#             against $POOLBROKER_DSN or an embedded cluster under var/.
# make run-flask : the same with the Flask example (etc/flaskapp) under
#             gunicorn beside a broker capped at 4, on http://127.0.0.1:8000.

PYTHON  ?= python3
VENV    := .venv
BIN     := $(CURDIR)/$(VENV)/bin
VAR     := $(CURDIR)/var
PG_PORT ?= 5432
export PATH := $(BIN):$(PATH)

.PHONY: setup docs test sqlalchemy-suite soak run run-flask supervised-postgres postgres-binaries clean

setup: $(VENV)/.installed postgres-binaries

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# PostgreSQL server binaries: the tests and the embedded cluster need them.
# PgBouncer: the bench compares against it (its column says so when absent).
postgres-binaries:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null \
	    || missing="postgresql"; \
	command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || missing="$$missing pgbouncer"; \
	if [ -z "$$missing" ]; then \
	    exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing (apt-get)"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	elif [ "$$missing" = " pgbouncer" ]; then \
	    echo "pgbouncer not found: poolbroker bench will skip it (apt-get install pgbouncer)" >&2; \
	else \
	    echo "PostgreSQL server binaries not found: install the 'postgresql' package" \
	         "(sudo apt-get install postgresql) or set POOLBROKER_PG_BINDIR" >&2; \
	    exit 1; \
	fi

docs: setup
	$(BIN)/python -m broker.settings_docs .

# Test files run on $(TEST_WORKERS) pytest-xdist workers, each a file at a time
# (--dist loadgroup, a group a file: a module's tests in order, its module
# fixtures once; the machine-loading files one after another, HEAVY_FILES)
# with its own session PostgreSQL cluster and brokers (tests/conftest.py).
# Most tests wait on the broker, the server or a timeout: on the 2-core box
# the suite took 518 s serial, 290 s on 2 workers.  3 workers took 185-300 s
# but starved timing windows of tests beside them (2 failures in 7 runs:
# test_logging's 2 s connect_timeout, test_bounds' retry after max_clients).
# PYTEST_ARGS="-n 0": one process.
TEST_WORKERS ?= 2

test: setup
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# SQLAlchemy's whole dialect compliance suite through a broker (make test runs a subset).
sqlalchemy-suite: setup
	POOLBROKER_SQLA_SUITE=full $(BIN)/pytest -q -s tests/test_sqlalchemy_suite.py

# 1,000,000 requests from 32 client processes killed at random (SOAK_ARGS=--help).
soak: setup
	cd tests && $(BIN)/python soak.py $(SOAK_ARGS)

# var/ for supervisord, and the embedded cluster's program when
# POOLBROKER_DSN is unset (both supervisord configs include var/supervisord.d).
supervised-postgres: setup
	mkdir -p $(VAR)/log $(VAR)/supervisord.d
	rm -f $(VAR)/supervisord.d/postgres.conf
	@if [ -z "$$POOLBROKER_DSN" ]; then \
	    $(BIN)/poolbroker embedded-postgres init --datadir $(VAR)/pgdata \
	        --socket-dir $(VAR)/run --port $(PG_PORT) && \
	    printf '%s\n' '[program:postgres]' \
	        'command=$(BIN)/poolbroker embedded-postgres serve --datadir $(VAR)/pgdata --socket-dir $(VAR)/run --port $(PG_PORT)' \
	        'priority=100' 'autorestart=true' 'stopsignal=INT' 'stopwaitsecs=30' \
	        'redirect_stderr=true' 'stdout_logfile=$(VAR)/log/postgres.log' \
	        > $(VAR)/supervisord.d/postgres.conf; \
	fi

EMBEDDED_DSN = $$($(BIN)/poolbroker embedded-postgres dsn --socket-dir $(VAR)/run --port $(PG_PORT))

run: supervised-postgres
	POOLBROKER_DSN="$${POOLBROKER_DSN:-$(EMBEDDED_DSN)}" \
	    exec $(BIN)/supervisord -n -c etc/supervisord.conf

# The broker and the app share POOLBROKER_ENDPOINT (or the default endpoint):
# stop `make run` first, one broker serves an endpoint.
run-flask: supervised-postgres
	POOLBROKER_DSN="$${POOLBROKER_DSN:-$(EMBEDDED_DSN)}" \
	    exec $(BIN)/supervisord -n -c etc/flaskapp/supervisord.conf

clean:
	rm -rf $(VENV) $(VAR) *.egg-info
