# Two commands for a fresh machine: `make run` and `make test`.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
PYTEST_ARGS ?=

.PHONY: install run flow test test-fast mlflow-ui clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install  ## the whole pipeline on the embedded default (dvc repro under one MLflow parent run)
	kdpipe run

flow: install  ## the same DAG as a Prefect flow (ephemeral Prefect server)
	python -m flows.pipeline

test: install  ## the whole suite, slow end-to-end tests included
	python -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## skip the slow end-to-end tests
	python -m pytest -q -m "not slow" $(PYTEST_ARGS)

mlflow-ui: install
	mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:  ## run products only (keeps .venv)
	rm -rf data/prepared data/teacher data/baseline data/synthetic data/student data/reports data/export mlflow.db mlartifacts mlruns
