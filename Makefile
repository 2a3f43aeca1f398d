# Everything runs from the project's own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install run test test-peers bench clean

$(BIN)/pacsflow: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

install: $(BIN)/pacsflow ## the development install

run: install ## all services in one process, embedded bus, SQLite state, in ./data
	$(BIN)/pacsflow run

test-peers: ## install and start DCMTK, Orthanc, RabbitMQ and PostgreSQL
	bash scripts/test-peers.sh

test: install test-peers ## the whole test suite against real peers
	$(BIN)/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) data build *.egg-info
