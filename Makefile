# Two commands do everything on a fresh machine: `make demo` and `make test`.
# On a GPU machine, `make gpu-check` runs what only a GPU can verify (under 8 minutes; runs/gpu-check/).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Tests run on 2 workers (CI has 2 cores); override with `make test PYTEST_ARGS=...`.
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test gpu-check browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

browser:
	bash scripts/install-browser.sh

demo: setup
	$(VENV)/bin/workbench demo

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

gpu-check: setup
	$(VENV)/bin/workbench gpu-check

clean:
	rm -rf $(VENV) runs test-output
