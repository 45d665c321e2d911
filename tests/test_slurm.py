"""The SLURM path: Snakemake's SLURM executor plugin against a real single-node SLURM on localhost.

``test_workflow_through_slurm`` (marker ``slurm``, run by ``make test-slow``) starts slurmctld + slurmd + munge with
tests/slurm/slurm-up.sh (installing the Debian packages if needed; root only), then runs a representative part of
the embedded workflow with ``--profile tests/slurm/profile``: ``fetch_prompts`` and the dependency chain
``download_model -> build_corpus`` (the real SmolLM2 conversion and the real corpus builder, at a small corpus size).
It runs in a copy of the repo's git files, so the developer's resources/, results/ and .snakemake/ are untouched;
the jobs use this interpreter (the plugin submits ``sys.executable -m snakemake``). ~2.5 min on 2 cores.

The dry runs of the user-facing profile (workflow/profiles/slurm) need no SLURM and run in ``make test``.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO_ROOT / "tests" / "slurm"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
MODEL = "smollm2-135m"
TARGETS = ["resources/prompts/prompts.txt", f"resources/corpus/{MODEL}"]
RULES = ("fetch_prompts", "download_model", "build_corpus")
#: Network rules run on the login node (``localrule``: compute nodes often have no internet); the rest via sbatch.
LOCAL_RULES = ("fetch_prompts", "download_model")
RUN_TIMEOUT_S = 480  # the whole snakemake run (measured ~135 s on a busy 2-core machine)


def copy_repo(dst: Path) -> Path:
    """Copy the repo's git files (tracked, plus untracked-but-not-ignored, as they are in the working tree)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"needs a git checkout to copy the workflow ({err})")
    for rel in filter(None, out.decode().split("\0")):
        src = REPO_ROOT / rel
        if src.is_file():  # skips tracked files deleted in the working tree
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def snakemake_env(workdir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    env.update(
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(workdir / "src"), env.get("PYTHONPATH")])),
    )
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """Run under coreutils `timeout -k 30` as well: a snakemake stuck polling SLURM ignores SIGTERM."""
    return subprocess.run(
        ["timeout", "-k", "30", str(timeout), *cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )


# --- no SLURM needed: the profiles parse, and plan the right jobs -------------------------------------------------


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("repo"))


@pytest.mark.parametrize("configfile", [None, "config/paper.yaml"])
def test_user_slurm_profile_dry_run(repo_copy, configfile):
    """`snakemake -n --profile workflow/profiles/slurm` (the README's cluster command) works without sbatch."""
    extra = ["--configfile", configfile] if configfile else []
    res = run(
        [*SNAKEMAKE, "-n", "--profile", "workflow/profiles/slurm", *extra],
        repo_copy,
        snakemake_env(repo_copy),
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Using profile workflow/profiles/slurm" in res.stdout + res.stderr
    assert re.search(r"^download_model\s+\d+\s*$", res.stdout, re.MULTILINE), res.stdout[-3000:]


def test_ci_slurm_profile_dry_run(repo_copy):
    res = run(
        [*SNAKEMAKE, "-n", *TARGETS, "--profile", "tests/slurm/profile"],
        repo_copy,
        snakemake_env(repo_copy),
        timeout=180,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rule in RULES:
        assert re.search(rf"^{rule}\s+1\s*$", res.stdout, re.MULTILINE), res.stdout[-3000:]


# --- a real SLURM ------------------------------------------------------------------------------------------------


def local_slurm(tmp_path_factory, **node: str):
    """Start a single-node SLURM on localhost (tests/slurm/slurm-up.sh; state in a temp dir; ``node``: its
    ``SLURM_CI_*`` settings, e.g. fake resources) and yield the env a client needs; always stopped afterwards. Skips
    where no test cluster can run here (not root, no Debian packages, another SLURM set-up)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("the local SLURM test cluster needs root (it installs and starts slurmctld/slurmd/munged)")
    if not shutil.which("slurmctld") and not (shutil.which("apt-get") and Path("/etc/debian_version").exists()):
        pytest.skip("SLURM is not installed and this is not a Debian/Ubuntu machine with apt-get to install it")
    if not shutil.which("timeout"):
        pytest.skip("needs coreutils `timeout`")
    state = tmp_path_factory.mktemp("slurm-state")
    env = {**os.environ, "SLURM_CI_STATE": str(state), **node}
    try:
        up = subprocess.run(
            ["bash", str(SLURM_DIR / "slurm-up.sh")], env=env, capture_output=True, text=True, timeout=600
        )
        if up.returncode in (2, 3):
            pytest.skip(f"local SLURM cluster not started: {up.stderr.strip()}")
        assert up.returncode == 0, f"slurm-up.sh failed (rc {up.returncode}):\n{up.stdout}\n{up.stderr}"
        yield {"SLURM_CI_STATE": str(state)}
    finally:
        subprocess.run(["bash", str(SLURM_DIR / "slurm-down.sh")], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The machine's real resources (CPUs from `slurmd -C`, no GPUs)."""
    yield from local_slurm(tmp_path_factory)


def squeue_all(slurm_env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{job id: (state, job name)} for every job squeue still knows (finished ones stay for MinJobAge)."""
    res = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T|%j"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **slurm_env},
    )
    assert res.returncode == 0, res.stderr
    rows = [line.strip().split("|", 2) for line in res.stdout.splitlines() if line.strip()]
    return {job_id: (state, name) for job_id, state, name in rows}


@pytest.mark.slurm
@pytest.mark.timeout(RUN_TIMEOUT_S + 300)
def test_workflow_through_slurm(slurm_cluster, tmp_path):
    work = copy_repo(tmp_path / "repo")
    # The embedded config with a small corpus (the real builder, ~20k tokens instead of 1.1M).
    cfg = yaml.safe_load((work / "config/config.yaml").read_text())
    cfg["embedded_sae"].update(train_tokens=20_000, heldout_tokens=2_000)
    (work / "ci_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = snakemake_env(work, slurm_cluster)
    before = set(squeue_all(slurm_cluster))

    res = run(
        [*SNAKEMAKE, *TARGETS, "--profile", "tests/slurm/profile", "--configfile", "ci_config.yaml"],
        work,
        env,
        timeout=RUN_TIMEOUT_S,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"snakemake rc {res.returncode} (124: timed out)\n{out[-6000:]}"

    # Outputs of the real rules.
    assert (work / "resources/prompts/prompts.txt").read_text().strip()
    assert (work / f"resources/models/{MODEL}/config.json").is_file()
    corpus = work / f"resources/corpus/{MODEL}"
    assert (corpus / "rows.safetensors").stat().st_size > 0 and (corpus / "manifest.json").is_file()

    # Every cluster rule went through sbatch: one SLURM log per job, named by its SLURM job id ...
    submitted = dict(re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", out))
    assert sorted(submitted.values()) == sorted(set(RULES) - set(LOCAL_RULES)), out[-6000:]
    # ... the network rules ran on the login node, before the first sbatch (the dependency chain)
    for rule in LOCAL_RULES:
        assert f"localrule {rule}:" in out, out[-6000:]
        assert out.index(f"localrule {rule}:") < out.index("submitted with SLURM jobid"), rule
    logs = {p.stem: p for p in (work / "logs/slurm").rglob("*.log")}
    assert set(logs) == set(submitted), (sorted(logs), submitted)
    for job_id, rule in submitted.items():
        assert f"rule_{rule}" in logs[job_id].parts, logs[job_id]
    # ... and SLURM itself ran them to completion, as one run (the plugin names every job by the run's uuid).
    jobs = squeue_all(slurm_cluster)
    assert set(submitted) <= set(jobs) - before, (submitted, jobs)
    assert {jobs[j][0] for j in submitted} == {"COMPLETED"}, jobs
    assert len({jobs[j][1] for j in submitted}) == 1, jobs
    shutil.rmtree(work / "resources/models", ignore_errors=True)  # 0.5 GB; kept only when the test fails
