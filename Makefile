# make demo: set up .venv and run the benchmark; make test: set up .venv and run the tests.
# Needs only Python 3.10+ (python3 on PATH, or PYTHON=/path/to/python3.10+).

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test clean

demo: $(STAMP)
	$(VENV)/bin/tensorized-attention bench

test: $(STAMP)
	$(VPY) -m pytest -q

# The environment, set up once (again only when pyproject.toml changes). torch is pinned
# to the CPU build first, so that the editable install finds it already satisfied.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is needed, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install torch==2.13.0
	$(VPY) -m pip install -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) results
