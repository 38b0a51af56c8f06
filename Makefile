# Two commands from a fresh clone: `make train` (the embedded default run) and `make test`.
# Both bootstrap .venv. torch is installed first, pinned (constraints.txt), only when the venv
# has none: an unpinned torch pulls several GB of CUDA packages on a CPU machine. On a GPU
# machine, install your CUDA torch into .venv first (or set PYTHON to an env that has it).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,deepspeed,bnb,torchao,trackers,bench,peft,plot
GPU_OUT ?= runs/test-gpu

.PHONY: train test test-gpu lint venv clean bench

$(VENV)/.stamp-base: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-base
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.stamp-base

train: $(VENV)/.stamp-base  ## the embedded default run (no network, ~3 min on 2 CPU cores)
	$(PY) dtrain/train.py $(ARGS)

test: $(VENV)/.stamp-dev  ## the whole suite, multi-process cases included
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

bench: $(VENV)/.stamp-dev  ## dtrain beside Trainer and minimal loops, one run (bench/run.py; ARGS=--quick or --gpu)
	$(PY) bench/run.py $(ARGS)

# tests/gpu (skipped without CUDA), then the GPU benchmark where CUDA is, then one table (docs/gpu.md);
# the report's exit status is the verdict
test-gpu: $(VENV)/.stamp-dev  ## every GPU-only path in one command (budget: 8 min on one H100/H200; never run on a GPU yet)
	rm -rf $(GPU_OUT)
	-DTRAIN_GPU_REPORT=$(GPU_OUT)/gpu_checks.json $(PY) -m pytest -q tests/gpu $(PYTEST_ARGS)
	-if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) bench/run.py --gpu --out $(GPU_OUT)/bench_gpu.json; fi
	$(PY) tests/gpu/report.py $(GPU_OUT)

lint: $(VENV)/.stamp-dev  ## ruff check, ruff format --check, mypy (versions pinned in the dev extra)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
