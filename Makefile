# Two commands on a fresh machine: `make run` (the main job, embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/breast_cancer.yaml

.PHONY: install run test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,serve,dev]"
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m studies.run $(CONFIG)

# Starts PostgreSQL checks, the S3 endpoint and the MLflow server, runs every test, stops what it started.
test: install
	scripts/services.sh up
	set -a; eval "$$(scripts/services.sh env)"; set +a; \
	  $(PY) -m pytest; status=$$?; scripts/services.sh down; exit $$status

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .workbench
