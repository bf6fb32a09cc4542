# SSB: the two commands are `make demo` (the main job on the CPU with the small model) and `make test`.
# Everything installs itself on first use into .venv (pip, not uv: uv would fetch a CUDA torch instead of the local CPU wheel).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SSB_HOME ?= $(HOME)/.cache/ssb
export SSB_HOME

.PHONY: setup model test test-fast demo bench redis clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c "import vllm, transformers, peft, math_verify, rq"
	touch $(STAMP)

model: setup
	$(BIN)/ssb model pull

test: setup model
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not engine"

demo: setup model
	$(BIN)/ssb data arith --n 200 --seed 0 --out runs/demo/train.jsonl
	$(BIN)/ssb curate --data runs/demo/train.jsonl --out runs/demo/pairs --worked-example

bench: setup model
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf runs .pytest_cache
