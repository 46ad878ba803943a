# make test: create .venv if missing, install everything at the locked versions (constraints.txt), run the tests.
# make lock: resolve the newest versions pyproject.toml allows, write constraints.txt, run the tests.
# make demo: the main job (see README).
# make docs: the documentation site (docs/, mkdocs) served at http://127.0.0.1:8000; make test builds it strictly.
# make gpu-check: on a machine with an NVIDIA GPU, every fused kernel checked and timed there
#   (benchmarks/gpu_check.py, about 8 minutes); anywhere else one line, exit 0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo
# Pinned CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
DEFAULT_TORCH := torch==2.13.0
TORCH_SPEC ?= $(DEFAULT_TORCH)
# The exact versions of the last green run (make lock writes it); pyproject.toml keeps the ranges.
LOCK ?= constraints.txt

.PHONY: install test lock machine demo bench docs gpu-check clean

install: $(VENV)/.installed

# Everything installed under the lock (pip -c). Another TORCH_SPEC (a CUDA build) brings its own triton:
# the lock's torch and triton lines are then left out.
$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if [ "$(TORCH_SPEC)" = "$(DEFAULT_TORCH)" ]; then cp $(LOCK) $(VENV)/lock.txt; \
		else grep -vE '^(torch|triton)==' $(LOCK) > $(VENV)/lock.txt; fi
	$(PY) -m pip install -q --upgrade pip -c $(VENV)/lock.txt
	$(PY) -m pip install -q "$(TORCH_SPEC)" -c $(VENV)/lock.txt
	$(PY) -m pip install -q -e ".[dev]" -c $(VENV)/lock.txt
	touch $@

test: install
	$(PY) -m pytest -q

# A fresh resolve within pyproject.toml's ranges (a new venv, no lock), then the whole suite on it;
# only a green suite replaces $(LOCK) with the versions it ran (commit it then).
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	{ echo "# Exact versions of a green \`make test\` (written by \`make lock\` on $$(date -u +%F), $$($(PY) -c \
		'from fastkd.machine import cpu_name; print(cpu_name())')); read by make install as pip -c."; \
	  echo "# Upgrading: \`make lock\` (a fresh resolve within pyproject.toml's ranges, then the tests)."; \
	  $(PY) -m pip freeze --all --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(LOCK).new
	$(PY) -m pytest -q || { echo "make lock: the tests failed on the new versions; $(LOCK) is unchanged ($(LOCK).new holds them)"; exit 1; }
	mv $(LOCK).new $(LOCK)
	cp $(LOCK) $(VENV)/lock.txt
	touch $(VENV)/.installed

# The CPU, its kernel-deciding flags, the torch build and the libraries (what CI prints first).
machine: install
	$(PY) -m fastkd.machine

# The whole pipeline: search -> distill the winner, uniform and last -> GLUE table (<= 15 min on 2 cores).
demo: install
	$(VENV)/bin/fastkd demo --data-dir $(DATA) --output $(DEMO_OUT)

bench: install
	$(VENV)/bin/fastkd bench

docs: install
	$(PY) -m mkdocs serve

GPU_CHECK_ARGS ?=
gpu-check:
	@if $(PYTHON) benchmarks/gpu_check.py --probe; then \
		$(MAKE) --no-print-directory install && $(PY) benchmarks/gpu_check.py --require-gpu $(GPU_CHECK_ARGS); fi

clean:
	rm -rf $(VENV) runs build site *.egg-info
