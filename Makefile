# make test: create .venv if missing, install everything, run the tests.
# make demo: the main job (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo
# Pinned CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q

# The whole pipeline: search -> distill the winner, uniform and last -> GLUE table (<= 15 min on 2 cores).
demo: install
	$(VENV)/bin/fastkd demo --data-dir $(DATA) --output $(DEMO_OUT)

bench: install
	$(VENV)/bin/fastkd bench

clean:
	rm -rf $(VENV) runs build *.egg-info
