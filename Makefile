# make test: create .venv if missing, install everything, run the tests.
# make demo: the main job (see README).
# make gpu-check: on a machine with an NVIDIA GPU, every fused kernel checked and timed there
#   (benchmarks/gpu_check.py, about 8 minutes); anywhere else one line, exit 0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo
# Pinned CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench gpu-check clean

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

GPU_CHECK_ARGS ?=
gpu-check:
	@if $(PYTHON) benchmarks/gpu_check.py --probe; then \
		$(MAKE) --no-print-directory install && $(PY) benchmarks/gpu_check.py --require-gpu $(GPU_CHECK_ARGS); fi

clean:
	rm -rf $(VENV) runs build *.egg-info
