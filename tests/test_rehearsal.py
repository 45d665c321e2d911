"""The rehearsal of the paper plan (issue 12): ``config/paper.yaml`` itself, plus one override that only lowers n and
points the endpoints at loopback fixtures (``esr.rehearsal.write_override``), end to end through Snakemake's real
SLURM executor plugin on a single-node SLURM cluster on localhost (tests/slurm/slurm-up.sh).

* The node advertises fake resources (32 CPUs, 2 TB, 8 GPUs: ``SLURM_CI_*``; bookkeeping only, no cgroups), so the
  paper's real requests are accepted: the 70B's model jobs ask ``--gpus=4 --mem=400000``.
* The profile is the users' ``workflow/profiles/slurm`` plus only what this cluster needs (``derive_profile``):
  squeue as status command (no slurmdbd), a 1 s first status check, a short latency wait, more concurrent jobs.
  The resources users get are not touched; the test asserts them on the recorded sbatch lines.
* ``sbatch`` is a recording shim first on PATH (its argv as a JSON line, then the real sbatch).
* The five models are tiny random-weight models in an offline HF cache under their real repo ids, revisions and layer
  counts, with fake GemmaScope/Goodfire SAE files loaded through sae-lens (``esr.rehearsal.build_rehearsal_assets``);
  prompts and Neuronpedia label exports come from a loopback file server, the judges from the loopback judge server
  (tests/judge_server.py) in this process.

Asserts: exit 0; every job of the plan's dry run ran (by rule); the network rules and API grading ran on the login
node (never submitted); the 70B's tensor-parallel generation ran as 4 gloo ranks; the report, the audit and the
cross-model statistics exist; each job kind's sbatch resources (group jobs: one task, no GPU); the profile's job
groups took effect (fewer sbatch jobs than grouped jobs); the judge server was asked.
Marker ``slurm`` (root only, Debian SLURM packages; ``make rehearse-paper``, ``make test-slow``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from judge_server import ScriptedServer
from test_cluster_plan import BIG, NETWORK_RULES, _flags, _tasks
from test_slurm import copy_repo, local_slurm, run, snakemake_env, squeue_all

REPO_ROOT = Path(__file__).resolve().parents[1]
USER_PROFILE = REPO_ROOT / "workflow/profiles/slurm/config.yaml"
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
#: What the fake node advertises (tests/slurm/slurm-up.sh): room for the 70B's 4-GPU, 400 GB, 4-CPU job next to four
#: 1-GPU model jobs (up to 128 GB each) and CPU jobs. With only 4 GPUs every 70B job waits for all others to drain and
#: then runs alone (SLURM's backfill cannot move the 1-GPU jobs past it: their time limits are hours), which made the
#: first rehearsal run model stage by model stage.
FAKE_NODE = {"SLURM_CI_CPUS": "32", "SLURM_CI_MEM_MB": "2000000", "SLURM_CI_GPUS": "8", "SLURM_CI_MIN_JOB_AGE": "86400"}
#: Rules that load the model: they ask for the model's GPUs (models.<name>.resources.gpu).
MODEL_RULES = {"select_latents", "discover_detectors", "calibrate_boosts", "generate", "sequential"}
#: On the login node (localrules): downloads, and API grading (paper.yaml: grading.run_on: login).
LOGIN_RULES = NETWORK_RULES | {"grade", "cross_judge"}
#: The whole snakemake run (measured ~N s on an idle 2-core machine; see the report printed by the test).
RUN_TIMEOUT_S = 3000
CONCURRENT_JOBS = 24
#: The users' profile batches these rules' jobs, several to one sbatch job: {rule: group}. The plugin files a group
#: job's sbatch comment and SLURM log under the group's name.
GROUPS: dict[str, str] = yaml.safe_load(USER_PROFILE.read_text()).get("groups") or {}


def derive_profile(dst: Path, *, jobs: int = CONCURRENT_JOBS) -> Path:
    """The users' SLURM profile (workflow/profiles/slurm/config.yaml) plus only what the localhost cluster needs,
    written to ``dst``/config.yaml. Returns ``dst``.

    * ``slurm-status-command: squeue``: no slurmdbd here, and the plugin would otherwise poll ``sacct`` forever;
    * ``slurm-init-seconds-before-status-checks: 1`` (plugin default 40 s per dependent layer);
    * ``latency-wait: 5`` (one machine, no shared-filesystem lag);
    * ``jobs``: concurrent jobs (the node has 32 fake CPUs, 8 fake GPUs).
    No partition: the cluster's only partition is the default (``sinfo``)."""
    profile = yaml.safe_load(USER_PROFILE.read_text())
    profile.update(
        {
            "slurm-status-command": "squeue",
            "slurm-init-seconds-before-status-checks": 1,
            "latency-wait": 5,
            "jobs": jobs,
        }
    )
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dst


SBATCH_SHIM = """#!{python}
# Recording sbatch (tests/test_rehearsal.py): appends its argv as a JSON line, then runs the real sbatch.
import json, os, sys
with open(os.environ["ESR_SBATCH_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
os.execv({real!r}, [{real!r}, *sys.argv[1:]])
"""


def install_sbatch_shim(bin_dir: Path) -> Path:
    """Write the recording ``sbatch`` into ``bin_dir`` (to be put first on PATH). Returns the shim's path."""
    real = shutil.which("sbatch")
    assert real, "sbatch not on PATH"
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "sbatch"
    shim.write_text(SBATCH_SHIM.format(python=sys.executable, real=real))
    shim.chmod(0o755)
    return shim


def read_sbatch_log(log: Path) -> list[tuple[str, str, dict[str, str]]]:
    """[(rule, job comment, sbatch flags)] of every recorded call (the plugin's ``--comment rule_<rule>[_wildcards_..]``)."""
    calls = []
    for line in log.read_text().splitlines():
        argv = json.loads(line)
        comment = argv[argv.index("--comment") + 1]
        rule = re.match(r"rule_([a-z_0-9]+?)(?:_wildcards_|$)", comment).group(1)
        # a group job's comment is rule_<group>_<its rules>: count it under the group
        rule = next((g for g in set(GROUPS.values()) if rule == g or rule.startswith(f"{g}_")), rule)
        calls.append((rule, comment, _flags(argv)))
    return calls


def job_model(comment: str, models: list[str]) -> str | None:
    """The model a job's wildcards name (longest match first: no model id is then mistaken for a prefix of another)."""
    for m in sorted(models, key=len, reverse=True):
        if re.search(rf"(?<![A-Za-z0-9.-]){re.escape(m)}(?![A-Za-z0-9.])", comment):
            return m
    return None


def assert_sbatch_resources(calls: list[tuple[str, str, dict[str, str]]], paper: dict) -> None:
    """Every job is one task on one node; model jobs ask the model's GPUs, memory and time (``models.<name>.resources``;
    the 70B: 4 GPUs in ONE task, 400,000 MB), CPU jobs no GPU. Prints one sbatch line per job kind."""
    models = list(paper["models"])
    for rule, comment, flags in calls:
        assert flags.get("--nodes") == "1", (comment, flags)
        assert _tasks(flags) == 1 and "--ntasks-per-gpu" not in flags and "--gpus-per-task" not in flags, flags
        if rule in MODEL_RULES:
            res_m = paper["models"][job_model(comment, models)]["resources"]
            assert flags.get("--gpus") == str(res_m["gpu"]), (comment, flags)
            assert flags["--mem"] == str(res_m["mem_mb"]), flags
            if rule == "generate":  # the generation jobs get the model's stated wall time
                assert flags["-t"] == str(res_m["runtime_min"]), flags
            assert flags["--cpus-per-task"] == "4", flags  # the rules' threads, for the one task
        else:
            assert not any(k in flags for k in ("--gpus", "--gres", "--gpus-per-node")), (comment, flags)
            assert flags.get("--ntasks") == "1", (comment, flags)
    big_gen = [f for r, c, f in calls if r == "generate" and job_model(c, models) == BIG]
    assert big_gen and all(f["--gpus"] == "4" and f["--mem"] == "400000" for f in big_gen), big_gen
    print("sbatch, one line per job kind:")
    for kind in sorted({(r, job_model(c, models) == BIG) for r, c, _ in calls}):
        flags = next(f for r, c, f in calls if (r, job_model(c, models) == BIG) == kind)
        shown = {k: v for k, v in flags.items() if k not in ("--wrap", "--job-name", "--output", "-D", "--comment")}
        print(f"  {kind[0]}{' (70B)' if kind[1] else ''}: {shown}")


def job_counts(out: str) -> Counter:
    """{rule: finished jobs} from a Snakemake run's output."""
    return Counter(re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", out))


def planned_counts(out: str) -> Counter:
    """{rule: jobs} from the "Job stats" table of a dry run."""
    stats = out[out.index("Job stats:") :].split("\n\n", 1)[0]
    return Counter({m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", stats, re.MULTILINE) if m[0] != "total"})


# --- a SLURM node that can take the paper's requests --------------------------------------------------------------


@pytest.fixture(scope="module")
def big_slurm_node(tmp_path_factory):
    """A single-node SLURM on localhost advertising ``FAKE_NODE``; stopped at the end of the module."""
    yield from local_slurm(tmp_path_factory, **FAKE_NODE)


@pytest.mark.slurm
def test_fake_node_takes_a_four_gpu_400gb_job(big_slurm_node, tmp_path):
    """The node takes the 70B's request (sbatch --gpus=4 --mem=400000) and runs it, with the 4 GPUs booked."""
    out = tmp_path / "job.out"
    res = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--nodes=1", "--gpus=4", "--mem=400000", "--cpus-per-task=4",
         "-o", str(out), "--wrap", "echo CVD=$CUDA_VISIBLE_DEVICES"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip().split(";")[0]
    assert squeue_all(big_slurm_node)[job_id][0] == "COMPLETED"
    assert out.read_text().strip() == "CVD=0,1,2,3"


# --- the rehearsal ------------------------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.rehearsal
@pytest.mark.timeout(RUN_TIMEOUT_S + 600)
def test_paper_plan_rehearsal_through_slurm(big_slurm_node, tmp_path):
    rehearsal = pytest.importorskip("esr.rehearsal")
    t0 = time.monotonic()
    work = copy_repo(tmp_path / "repo")
    paper = yaml.safe_load((work / "config/paper.yaml").read_text())
    profile = derive_profile(tmp_path / "profile")
    user = yaml.safe_load(USER_PROFILE.read_text())
    assert yaml.safe_load((profile / "config.yaml").read_text())["default-resources"] == user["default-resources"]
    sbatch_log = tmp_path / "sbatch.jsonl"
    install_sbatch_shim(tmp_path / "bin")

    assets = rehearsal.build_rehearsal_assets(tmp_path / "assets")
    judge = ScriptedServer().start()
    try:
        with rehearsal.serve_files(assets.files_dir) as files_url:
            override = rehearsal.write_override(tmp_path / "assets", files_url=files_url, judge_url=judge.root,
                                                assets=assets)  # fmt: skip
            env = snakemake_env(work, big_slurm_node)
            extra = assets.env()  # HF_HOME (the offline hub cache), the SAE-directory hook, the dummy judge key
            extra["PYTHONPATH"] = os.pathsep.join([str(assets.pythonpath), env["PYTHONPATH"]])
            env.update(extra)
            env.update(ESR_SBATCH_LOG=str(sbatch_log), PATH=f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}")
            cfg = ["--configfile", "config/paper.yaml", str(override)]
            dry = run([*SNAKEMAKE, "-n", "--cores", "1", *cfg], work, env, timeout=300)
            assert dry.returncode == 0, dry.stdout[-4000:] + dry.stderr[-4000:]
            planned = planned_counts(dry.stdout)
            before = set(squeue_all(big_slurm_node))
            t_run = time.monotonic()
            res = run([*SNAKEMAKE, "--profile", str(profile), *cfg], work, env, timeout=RUN_TIMEOUT_S)
            run_s = time.monotonic() - t_run
            out = res.stdout + res.stderr
            (tmp_path / "snakemake.log").write_text(out)
            assert res.returncode == 0, f"snakemake rc {res.returncode} (124: timed out)\n{out[-8000:]}"
            report = run([*SNAKEMAKE, "--report", "results/report.html", *cfg], work, env, timeout=600)
            assert report.returncode == 0, report.stdout[-4000:] + report.stderr[-4000:]
    finally:
        judge.stop()
    ran = job_counts(out)
    print(f"\nrehearsal: snakemake run {run_s:.0f} s, whole test {time.monotonic() - t0:.0f} s, "
          f"{sum(ran.values())} jobs; by rule: {dict(sorted(ran.items()))}")  # fmt: skip

    # Every job of the plan ran, every rule of the paper DAG among them.
    assert ran == planned, (ran, planned)
    assert {"generate", "calibrate_boosts", "grade", "cross_judge", "audit", "cross_model"} <= set(ran), ran

    # The login node ran the network rules and API grading; everything else went through sbatch.
    calls = read_sbatch_log(sbatch_log)
    submitted = Counter(rule for rule, _, _ in calls)
    assert not set(submitted) & LOGIN_RULES, submitted
    for rule in LOGIN_RULES:
        assert f"localrule {rule}:" in out, rule
    # Ungrouped cluster rules: one sbatch job per job. Grouped rules: fewer sbatch jobs than jobs, all of them ran.
    alone = Counter({r: n for r, n in planned.items() if r not in LOGIN_RULES | {"all"} | set(GROUPS)})
    assert Counter({r: n for r, n in submitted.items() if r not in set(GROUPS.values())}) == alone, submitted
    for group in sorted(set(GROUPS.values())):
        members = sum(n for r, n in planned.items() if GROUPS.get(r) == group)
        assert members == 0 or 0 < submitted[group] < members, (group, submitted[group], members)
    print(f"sbatch jobs: {len(calls)} for {sum(planned.values()) - sum(planned[r] for r in LOGIN_RULES | {'all'})} "
          f"cluster jobs; by rule or group: {dict(sorted(submitted.items()))}")  # fmt: skip

    # The sbatch resources of each job kind: the users' profile and the paper's models.<name>.resources.
    assert_sbatch_resources(calls, paper)

    # SLURM ran every submitted job to completion, as one run (the plugin names all jobs by the run's uuid) ...
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", out)
    assert len(job_ids) == len(calls), (len(job_ids), len(calls))
    jobs = squeue_all(big_slurm_node)
    assert {jobs[j][0] for j in job_ids} == {"COMPLETED"}, {j: jobs[j] for j in job_ids}
    assert len({jobs[j][1] for j in job_ids}) == 1
    assert not set(job_ids) & before, "job ids of an earlier run"
    # ... each with its own kept SLURM log, filed under its rule, and the network rules ran before the first sbatch.
    logs = {p.stem: p for p in (work / "logs/slurm").rglob("*.log")}
    assert set(logs) == set(job_ids), sorted(set(job_ids) ^ set(logs))
    for job_id, rule in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", out):
        assert f"rule_{rule}" in logs[job_id].parts, logs[job_id]
    first_submit = out.index("submitted with SLURM jobid")
    for rule in ("fetch_prompts", "download_model"):
        assert out.index(f"localrule {rule}:") < first_submit, rule

    # The 70B's tensor-parallel generation ran as 4 ranks (torchrun, gloo on CPU).
    tp_logs = list((work / "logs/generate").rglob(f"*/{BIG}/*.log"))
    assert tp_logs and all("launching 4 tensor-parallel ranks" in p.read_text() for p in tp_logs), tp_logs

    # The auditors' artefacts.
    assert (work / "results/report.html").stat().st_size > 0
    assert (work / "results/audit/paper_numbers.json").is_file()
    assert json.loads((work / "results/compare/cross_model.json").read_text())
    # The judges were asked, through the loopback server (Anthropic and OpenAI formats: judge and cross-judges).
    paths = Counter(h.path for h in judge.hits)
    assert any(p.endswith("/v1/messages") for p in paths) and any(p.endswith("/chat/completions") for p in paths), paths
    shutil.rmtree(work / "resources", ignore_errors=True)  # kept only when the test fails
