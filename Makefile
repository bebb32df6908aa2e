# fewstep: `make demo` runs the main job, `make test` the whole test suite.
# Both create .venv on first use: torch==2.13.0 first (on our machines a local
# CPU wheel; never the CUDA build), then fewstep and its dependencies.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fewstep-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fewstep demo --out demo_out

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo_out .pytest_cache
