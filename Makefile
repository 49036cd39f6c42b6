# The README's set-up commands. Everything runs from the project's own virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EPOCHS ?= 20
DATASET ?= mnist
# The cluster on the running compose stack (docs/scaling-out.md, "A cluster on the team stack").
WORKERS ?= 2
RUN_ID ?=
STUDY ?= cluster-sweep
TRIALS ?=
SEARCH ?= --learning-rate 3e-4,1e-3,3e-3 --dropout 0.0,0.2,0.4
ARGS ?=

.PHONY: setup run test test-fast test-compose mutants lint mlproject server cluster-train cluster-sweep

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

## Train once with MLflow Projects, in this environment (DATASET=path for an offline machine).
run: setup
	PATH="$(abspath $(BIN)):$$PATH" mlflow run . --env-manager local -P epochs=$(EPOCHS) -P dataset=$(DATASET)

## The team tracking server on this machine, without Docker (Ctrl-C stops it).
server: setup
	$(BIN)/python -m mlflow_project server

## One multi_worker training of WORKERS containers on the running stack, recorded as one run (RUN_ID=id
## continues that run); DATASET may be a file here (mounted into every container). ARGS: more `train` options.
cluster-train:
	WORKERS=$(WORKERS) docker/cluster.sh train --epochs $(EPOCHS) --dataset $(DATASET) \
		$(if $(RUN_ID),--run-id $(RUN_ID)) $(ARGS)

## One sweep of WORKERS containers on the running stack: study STUDY (in the stack's PostgreSQL), one parent
## run, SEARCH the swept values (a grid by default), TRIALS the budget. ARGS: more `sweep` options.
cluster-sweep:
	WORKERS=$(WORKERS) docker/cluster.sh sweep --study $(STUDY) --epochs $(EPOCHS) --dataset $(DATASET) \
		$(if $(TRIALS),--trials $(TRIALS)) $(SEARCH) $(ARGS)

## The whole test suite (what CI runs), on two workers: most tests wait on real processes. Longest first, a module
## with a module-scoped training kept on one worker (tests/conftest.py, docs/tests.md "Time").
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup

## Everything but the end-to-end process tests.
test-fast: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow"

## The team stack for real (docker compose up, train, register, serve, down/up; the cluster on it): Docker with
## Compose v2.
test-compose: setup
	$(BIN)/python -m pytest -m compose

## Mutation testing (mutmut, docs/tests.md): config, search space, data validation, ranking, the registry's decision
## and the retry rule mutated in a fresh copy (mutants/, git-ignored), each mutant against the fast tests that reach
## it ([tool.mutmut] in pyproject.toml); prints every mutant that no test killed. A few minutes on one core.
mutants: setup
	rm -rf mutants
	$(BIN)/mutmut run --max-children 1
	$(BIN)/mutmut results | { grep -v ': no tests$$' || true; }

lint: setup
	$(BIN)/ruff check .

## Regenerate MLproject from pipeline/config.py.
mlproject: setup
	$(BIN)/python -m mlflow_project mlproject > MLproject
