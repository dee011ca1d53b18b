# `make demo` and `make test` need nothing but python3 (3.11+): each creates or reuses .venv
# with the exact versions in constraints.txt.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CHECKED := pipeline models data tests benchmarks tools run_pipeline.py

.PHONY: venv demo test test-fast lint typecheck unit contracts clean

$(STAMP): setup.cfg constraints.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) run_pipeline.py demo --output demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check $(CHECKED)
	$(VENV)/bin/ruff format --check $(CHECKED)

# mypy does not run the editable install's import hook: it checks the corona_ct namespace
# through a folder of links that mirrors the installed layout.
typecheck: $(STAMP)
	mkdir -p build/typecheck/corona_ct
	for pkg in pipeline models data; do ln -sfn ../../../$$pkg build/typecheck/corona_ct/$$pkg; done
	$(VENV)/bin/mypy

# The layers written in setup.cfg [importlinter]: no module imports from a layer above its own.
contracts: $(STAMP)
	$(VENV)/bin/lint-imports

# Every test, on two workers (a test module stays on one worker: its fixtures are built once).
unit: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile

test: lint typecheck contracts unit

# The inner loop: no slow tests, no real data, two workers (CI and `make test` run everything).
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -n 2 --dist loadfile -m "not slow and not realdata"

clean:
	rm -rf $(VENV) build demo_out .mypy_cache .ruff_cache .pytest_cache
