"""The paper plan (config/paper.yaml) as a SLURM cluster sees it, without a cluster (issue 12):

* the sbatch line of each job kind, built by the real SLURM executor plugin from the user profile
  (workflow/profiles/slurm): Snakemake runs with ``--profile workflow/profiles/slurm`` and a fake ``sbatch`` on PATH
  that records its arguments (and refuses the job, so nothing runs); the 70B generation job must be ONE task holding
  4 GPUs on one node (it starts ``torchrun --nproc_per_node 4`` itself), grading no GPU;
* which rules run on the login node (``localrule``: downloads, and API grading unless ``grading.run_on: cluster``);
* how many grade jobs the plan has (one per experiment, model and condition by default).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "config/paper.yaml"
BIG = "llama-3.3-70b"
NETWORK_RULES = {"fetch_prompts", "download_model", "fetch_sae", "download_labels"}


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE" and not k.startswith("SLURM_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])))
    if extra_path:
        env["PATH"] = f"{extra_path}{os.pathsep}{env['PATH']}"
    return env


def _paper_config(tmp_path: Path, judge: dict | None = None, **grading) -> Path:
    """config/paper.yaml with ``grading`` keys (and the ``judge`` block) replaced, written under ``tmp_path``."""
    cfg = yaml.safe_load(PAPER.read_text())
    cfg.setdefault("grading", {}).update(grading)
    if judge is not None:
        cfg["judge"] = judge
    out = tmp_path / "paper.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


# --- sbatch lines through the real executor plugin ----------------------------------------------------------------

FAKE_SBATCH = """#!{python}
import json, os, sys
with open(os.environ["ESR_SBATCH_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.stderr.write("fake sbatch: recorded, not submitted\\n")
sys.exit(1)
"""


def _fake_slurm(bin_dir: Path) -> None:
    """``sbatch`` records its arguments and refuses the job; ``sinfo`` names a default partition; the other query
    tools the plugin may call fail politely."""
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    for tool in ("sacct", "sacctmgr", "sshare", "squeue", "scontrol", "scancel"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho PARTITION; echo 'debug*'\n")  # `sinfo -o %P`: the default
    for p in bin_dir.iterdir():
        p.chmod(0o755)


def _touch(work: Path, rel: str, mtime: float, content: bytes = b"") -> None:
    path = work / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))


def _ready_inputs(work: Path) -> list[str]:
    """Make the 70B's upstream outputs exist (oldest first), so that its exp1 generation shard 0 and the grading of
    its exp8 answers are the only jobs to run. Returns those two targets."""
    from safetensors.torch import save_file
    from torch import zeros

    t = 1_700_000_000.0
    model = work / f"resources/models/{BIG}"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    save_file({"w": zeros(1)}, str(model / "model.safetensors"))  # the preflight check reads its header
    for p in (model, model / "config.json", model / "model.safetensors"):
        os.utime(p, (t, t))
    ups = [
        "resources/prompts/prompts.txt",
        f"resources/sae_manifests/{BIG}.json",
        f"resources/labels/{BIG}.csv",
        f"resources/labels/{BIG}.manifest.json",
        f"results/selection/{BIG}/selection.json",
        f"results/detectors/{BIG}/detectors.json",
        f"results/detectors/{BIG}/unsteered_answers.parquet",
        *[f"results/calibration/{BIG}/shard-{s}.json" for s in range(10)],
        f"results/calibration/{BIG}/thresholds.parquet",
        f"results/calibration/{BIG}/summary.json",
        *[f"results/exp8/{BIG}/shards/no_steering/gen-{s}.parquet" for s in range(10)],
    ]
    for i, rel in enumerate(ups, start=1):
        _touch(work, rel, t + i)
    return [
        f"results/exp1/{BIG}/shards/steered/gen-0.parquet",
        f"results/exp8/{BIG}/shards/no_steering/graded-0.parquet",
    ]


def _sbatch_calls(tmp_path: Path, config: Path) -> dict[str, list[str]]:
    """{rule name: sbatch argv} of the jobs Snakemake submitted through the profile for the targets of
    ``_ready_inputs``."""
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir)
    log = tmp_path / "sbatch.jsonl"
    targets = _ready_inputs(work)
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(work),
         "--configfile", str(config), "--profile", str(REPO / "workflow/profiles/slurm"),
         "--retries", "0", "--slurm-init-seconds-before-status-checks", "1", "--rerun-triggers", "mtime", "--", *targets],
        capture_output=True, text=True, timeout=300, env={**_env(bin_dir), "ESR_SBATCH_LOG": str(log)},
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert log.is_file(), f"no sbatch call (rc {res.returncode})\n{out[-4000:]}"
    calls = {}
    for line in log.read_text().splitlines():
        argv = json.loads(line)
        comment = argv[argv.index("--comment") + 1]
        calls[re.match(r"rule_([a-z_0-9]+?)_wildcards", comment).group(1)] = argv
    return calls


def _flags(argv: list[str]) -> dict[str, str]:
    """sbatch options as {name: value} (``--x=v``, ``--x v`` and ``-t v`` forms)."""
    out, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            out[k] = v
        elif a.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out[a] = argv[i + 1]
            i += 1
        elif a.startswith("-"):
            out[a] = ""
        i += 1
    return out


def _tasks(flags: dict[str, str]) -> int:
    """How many tasks SLURM starts for these options (one unless asked otherwise)."""
    if "--ntasks-per-gpu" in flags:
        return int(flags["--ntasks-per-gpu"]) * int(flags.get("--gpus", "0").split(":")[-1] or 0)
    if "--ntasks" in flags or "-n" in flags:
        return int(flags.get("--ntasks", flags.get("-n")))
    if "--ntasks-per-node" in flags:
        return int(flags["--ntasks-per-node"]) * int(flags.get("--nodes", "1"))
    return 1


GROUP_TOY = """
rule all:
    input: expand("out/{i}.txt", i=range(3))

rule summarise:
    output: "out/{i}.txt"
    threads: 1
    resources: mem_mb=4000, runtime=60
    shell: "echo {wildcards.i} > {output}"
"""


def test_a_group_job_is_one_task_on_one_node(tmp_path):
    """The users' profile groups summarise jobs (``groups``/``group-components``). Three independent summarise jobs
    become one group job whose sbatch line asks ONE node and ONE task, the members' largest memory and CPUs and
    their times added (they run one after another), not --nodes=3 --ntasks=3 (Snakemake's sum over members that
    could run side by side; on the rehearsal's one-node cluster such a job never starts)."""
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["groups"]["summarise"] and profile["group-components"][profile["groups"]["summarise"]] >= 3
    (tmp_path / "Snakefile").write_text(GROUP_TOY)
    bin_dir = tmp_path / "bin"
    _fake_slurm(bin_dir)
    log = tmp_path / "sbatch.jsonl"
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--profile", str(REPO / "workflow/profiles/slurm"), "--retries", "0",
         "--slurm-init-seconds-before-status-checks", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**_env(bin_dir), "ESR_SBATCH_LOG": str(log)},
    )  # fmt: skip
    assert log.is_file(), res.stdout[-3000:] + res.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 1, calls  # one sbatch job for the three summarise jobs
    argv = calls[0]
    assert argv[argv.index("--comment") + 1].startswith(f"rule_{profile['groups']['summarise']}")
    flags = _flags(argv)
    assert flags["--nodes"] == "1" and _tasks(flags) == 1 and flags["--cpus-per-task"] == "1", flags
    assert flags["--mem"] == "4000" and flags["-t"] == "180", flags
    assert not any(k in flags for k in ("--gpus", "--gres", "--gpus-per-node")), flags


def test_70b_generation_is_one_task_with_four_gpus_and_grading_has_no_gpu(tmp_path):
    config = _paper_config(tmp_path, run_on="cluster")  # grading as a cluster job, to see its sbatch line too
    calls = _sbatch_calls(tmp_path, config)
    assert set(calls) == {"generate", "grade"}, calls
    gen = _flags(calls["generate"])
    assert gen["--gpus"] == "4", calls["generate"]
    assert _tasks(gen) == 1 and "--ntasks-per-gpu" not in gen and "--gpus-per-task" not in gen, calls["generate"]
    assert gen["--nodes"] == "1"
    assert gen["--cpus-per-task"] == "4"  # the rule's threads, for the one task
    assert gen["--mem"] == "400000" and gen["-t"] == "1440"  # models.llama-3.3-70b.resources
    grade = _flags(calls["grade"])
    assert not any(k in grade for k in ("--gpus", "--gres", "--gpus-per-task")), calls["grade"]
    assert _tasks(grade) == 1 and grade["--ntasks"] == "1", calls["grade"]


def test_task_count_reading_counts_tasks_per_gpu():
    """The check above can fail: the plugin's old default (one task per GPU) reads as 4 tasks."""
    assert _tasks(_flags(shlex.split("--gpus=4 --ntasks-per-gpu=1 --cpus-per-task=4"))) == 4
    assert _tasks(_flags(shlex.split("--gpus=4 --cpus-per-task=4"))) == 1
    assert _tasks(_flags(shlex.split("--ntasks=2"))) == 2


# --- login-node rules and job counts (a dry run that also lists Snakemake's local rules) ---------------------------


def _plan(tmp_path: Path, config: Path) -> tuple[set[str], dict[str, int]]:
    """(local rules, {rule: planned jobs}) of a ``-n --forceall`` plan. The local rules are read where Snakemake
    keeps them (``workflow._localrules``, what ``Workflow.is_local`` consults) by a Snakefile including ours."""
    work = tmp_path / "plan"
    work.mkdir()
    wrapper = work / "Snakefile"
    wrapper.write_text(
        f"include: {str(REPO / 'Snakefile')!r}\n\n\n"
        "print('ESR_LOCALRULES ' + ' '.join(sorted(workflow._localrules)), flush=True)\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(wrapper), "--directory", str(work), "-n", "--forceall",
         "--cores", "1", "all", "--configfile", str(config)],
        capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + "\n" + res.stderr
    line = next(x for x in out.splitlines() if x.startswith("ESR_LOCALRULES"))
    local = set(line.split()[1:])
    stats = out[out.index("Job stats:") :].split("\n\n", 1)[0]  # the table, up to its blank line
    counts = {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)\s*$", stats, re.MULTILINE)}
    return local, counts


def test_paper_plan_runs_network_rules_on_the_login_node(tmp_path):
    local, counts = _plan(tmp_path, PAPER)
    assert local == NETWORK_RULES | {"grade", "cross_judge"}, local  # the paper grades with API judges
    # one grade job per (experiment, model, condition): generation has latent_shards (10) jobs per condition
    assert counts["generate"] == 10 * counts["grade"], counts
    assert counts["grade"] == 83 and counts["total"] < 1100, counts


def test_grading_on_the_cluster_and_offline_judges_are_cluster_jobs(tmp_path):
    local, counts = _plan(tmp_path, _paper_config(tmp_path, run_on="cluster", shards=3))
    assert local == NETWORK_RULES, local
    assert counts["grade"] == 3 * counts["generate"] // 10, counts  # grading.shards groups per condition
    # an offline judge grades as compute work, never on the login node (the API cross-judges still do)
    (tmp_path / "offline").mkdir()
    offline = _paper_config(tmp_path / "offline", judge={"backend": "offline_minilm", "anchors": "auto"})
    local, counts = _plan(tmp_path / "offline", offline)
    assert local == NETWORK_RULES | {"cross_judge"}, local
    assert counts["anchor_judge"] == 5, counts
