# Two commands on a fresh machine: `make run` (the main job, embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/breast_cancer.yaml
ARGS ?=

.PHONY: install run test lint lock clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -c constraints.txt -e ".[train,serve,batch,dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m studies.run $(CONFIG) $(ARGS)

# Starts compose.yaml's services up to the MLflow server natively (PostgreSQL, S3, bucket, MLflow),
# runs the integration tests in two processes, then the few that restart or stop shared services
# (marker `exclusive`; the whole-stack test brings up and tears down the stack) one after another
# in one process while the unit tests (no shared service) run in the other (tests/conftest.py's
# scheduler), stops what it started.
# `pytest` alone runs every test in one process, the exclusive ones last.
test: install
	scripts/stack.sh up mlflow
	eval "$$(scripts/stack.sh env --tests)"; \
	  $(PY) -m pytest -n 2 --dist worksteal -m "integration and not exclusive" --durations=15; status=$$?; \
	  $(PY) -m pytest -n 2 --integration-in-one-process -m "exclusive or not integration" --durations=10 || status=$$?; \
	  scripts/stack.sh down; exit $$status

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Re-resolve every dependency from pyproject.toml into constraints.txt (a scratch venv, newest versions).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip setuptools wheel
	.lock-venv/bin/pip install --quiet -e ".[train,serve,batch,dev]"
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable --all; } > constraints.new
	mv constraints.new constraints.txt && rm -rf .lock-venv

clean:
	rm -rf .workbench
