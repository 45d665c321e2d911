"""Per-job fixed cost of the workflow: the imports of each rule script and of the Snakefile's ``common.smk``.

Every Snakemake job runs ``workflow/scripts/<rule>.py`` in a fresh Python process, whose first lines import the
rule's stage function; every job (and a SLURM job twice) also parses the Snakefile, whose ``common.smk`` imports
part of ``esr``. This script measures, in fresh processes, for each distinct import line:

* ``wall_s``: median over ``--repeats`` runs of the wall seconds of ``python -c "<import line>"``;
* ``import_ms``: the cumulative import time ``python -X importtime`` reports for the top-level modules it loads
  (less sensitive to a loaded machine than wall time);
* ``heavy``: which heavy third-party packages end up in ``sys.modules``.

Usage: ``python tests/benchmarks/job_overhead.py [--repeats 3] [--json out.json]``. Prints one row per import line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "transformers",
    "sae_lens",
    "deepspeed",
    "peft",
    "accelerate",
    "scipy",
    "pandas",
    "statsmodels",
    "sklearn",
    "anthropic",
    "openai",
    "httpx",
    "matplotlib",
    "xarray",
    "zarr",
    "numpy",
    "snakemake",
)
COMMON_SMK = (
    "from esr.config import ConfigError, model_specs, validate_config; from esr.experiments import REGISTRY; "
    "from esr.judge.factory import API_BACKENDS; from esr.preflight import check_inputs, local_inputs"
)
_PROBE = "import sys; {stmt}; print(','.join(sorted(m for m in {heavy!r} if m in sys.modules)))"


def rule_imports(scripts: Path = ROOT / "workflow" / "scripts") -> dict[str, str]:
    """``{rule: "from esr.stages.X import f"}`` for every ``workflow/scripts/<rule>.py`` that imports a stage."""
    found: dict[str, str] = {}
    for path in sorted(scripts.glob("*.py")):
        for line in path.read_text().splitlines():
            if re.match(r"from esr\.stages\.\w+ import \w+", line):
                found[path.stem] = "from esr.stages import run_rule; " + line.strip()
    return found


def measure(stmt: str, *, repeats: int) -> dict[str, object]:
    """Wall seconds (median of ``repeats``), cumulative ``-X importtime`` ms of top-level imports, heavy modules."""
    probe = _PROBE.format(stmt=stmt, heavy=HEAVY)
    walls = []
    heavy = ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
        heavy = out.stdout.strip()
    timed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", stmt], capture_output=True, text=True, check=True, cwd=ROOT
    )
    total_us = 0
    for line in timed.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S*)$", line)
        if m and not m.group(2).startswith(" "):
            total_us += int(m.group(1))
    return {"wall_s": round(statistics.median(walls), 3), "import_ms": round(total_us / 1000), "heavy": heavy}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--only", nargs="*", default=None, help="rule names to measure (default: all)")
    args = ap.parse_args(argv)
    targets = {"<python -c pass>": "pass", "<common.smk>": COMMON_SMK}
    targets.update(rule_imports())
    if args.only:
        targets = {k: v for k, v in targets.items() if k in args.only or k.startswith("<")}
    rows = {}
    print(f"{'rule':24s} {'wall_s':>7s} {'import_ms':>9s}  heavy modules loaded")
    for name, stmt in targets.items():
        row = measure(stmt, repeats=args.repeats)
        rows[name] = row
        print(f"{name:24s} {row['wall_s']:7.3f} {row['import_ms']:9d}  {row['heavy']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
