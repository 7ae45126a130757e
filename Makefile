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

test: install
	scripts/services.sh up
	WORKBENCH_TEST_POSTGRES_URL=$${WORKBENCH_TEST_POSTGRES_URL:-postgresql+psycopg2://postgres@127.0.0.1:5432/workbench_test} \
	  $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .workbench
