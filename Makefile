# Two commands on a fresh machine:  `make run` (set up + run the default pipeline)
#                                    `make test` (set up + run the test suite)
# Set-up uses the active virtualenv/conda env if there is one, otherwise creates .venv.
# Where no NVIDIA GPU is present, torch is installed as $(TORCH_CPU) first (a CPU build on these
# machines), so that resolving the other dependencies never pulls a multi-GB CUDA build.
# `make test` also installs transformers 4.x ($(TRANSFORMERS4)) with `pip install --target` into $(TF4) beside the
# environment's transformers 5 (once; again when the pins change): the tests that load a checkpoint's tokenizer and
# remote code with 4.x put it first on PYTHONPATH in a subprocess (SPARSESCALE_TRANSFORMERS4).

PYTHON ?= python3
VENV ?= .venv
TORCH_CPU ?= torch==2.13.0
CORES ?= all
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder
# the newest 4.x with the tokenizers and huggingface_hub it requires (<= 0.23.0, < 1.0); its other deps are shared
TRANSFORMERS4 ?= transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2

ifdef VIRTUAL_ENV
BIN := $(VIRTUAL_ENV)/bin
else ifdef CONDA_PREFIX
BIN := $(CONDA_PREFIX)/bin
else
BIN := $(VENV)/bin
endif
STAMP := $(BIN)/.sparsescale-setup
TF4 := $(abspath $(BIN)/..)/transformers4
# Snakemake's jobs call `sparsescale ...`: the environment's bin/ goes first on PATH for every recipe
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup transformers4 run test smoke lint dryrun-paper gpu-check clean reference-figures

setup: $(STAMP)

$(STAMP): pyproject.toml
	@[ -x "$(BIN)/python" ] || $(PYTHON) -m venv "$(VENV)"
	"$(BIN)/python" -m pip install -q --upgrade pip
	@if "$(BIN)/python" -c "import torch" 2>/dev/null; then \
	  echo "torch already installed: $$("$(BIN)/python" -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "GPU found: installing torch with CUDA"; "$(BIN)/python" -m pip install -q torch; \
	else \
	  echo "no GPU: installing $(TORCH_CPU)"; "$(BIN)/python" -m pip install -q "$(TORCH_CPU)"; \
	fi
	"$(BIN)/python" -m pip install -q -e ".[dev]"
	@touch "$(STAMP)"

## transformers4: transformers 4.x into $(TF4) for the tests (skipped when $(TF4)/.pins already names these pins)
transformers4: setup
	@if [ "$$(cat "$(TF4)/.pins" 2>/dev/null)" != "$(TRANSFORMERS4)" ]; then \
	  echo "installing $(TRANSFORMERS4) into $(TF4) (for the transformers 4.x tests)"; \
	  rm -rf "$(TF4).tmp" && \
	  "$(BIN)/python" -m pip install -q --no-deps --target "$(TF4).tmp" $(TRANSFORMERS4) && \
	  echo "$(TRANSFORMERS4)" > "$(TF4).tmp/.pins" && rm -rf "$(TF4)" && mv "$(TF4).tmp" "$(TF4)"; \
	fi

## run: set up and run the default pipeline (config/default.yaml) end to end
## (profiles/default, next to the Snakefile, is picked up by every plain `snakemake` call)
run: setup
	"$(BIN)/snakemake" --cores $(CORES)

## test: set up and run the test suite (with transformers 4.x beside, for the tests that load checkpoints with it)
test: setup transformers4
	SPARSESCALE_TRANSFORMERS4="$(TF4)" "$(BIN)/python" -m pytest -q $(PYTEST_ARGS) tests

## reference-figures: regenerate the reference figures and tables from results/reference/ alone (no sweep)
REF ?= results/reference
reference-figures: setup
	"$(BIN)/sparsescale" figures --runs $(REF)/tables/runs.csv --curves $(REF)/tables/curves.csv --fit-dir $(REF)/fit --out $(REF)/figures
	"$(BIN)/sparsescale" tables --runs $(REF)/tables/runs.csv --fit-dir $(REF)/fit --out $(REF)/tables

## smoke: the seconds-scale config end to end
smoke: setup
	"$(BIN)/snakemake" --cores $(CORES) --configfile config/smoke.yaml

## gpu-check: the prepared GPU check (<= 8 min on one H100) -> results/bench/gpu/; fails without CUDA.
## Offline: uses the installed environment as is (torch with CUDA, triton), the project from src/.
gpu-check:
	@py="$(BIN)/python"; [ -x "$$py" ] || py="$(PYTHON)"; \
	  PYTHONPATH=src "$$py" -m sparsescale.bench.gpu_check --out results/bench/gpu

lint: setup
	"$(BIN)/snakemake" --lint
	"$(BIN)/snakefmt" --check Snakefile workflow/rules

dryrun-paper: setup
	"$(BIN)/snakemake" -n --configfile config/paper.yaml --workflow-profile profiles/slurm

clean:
	rm -rf results logs .snakemake report.html
