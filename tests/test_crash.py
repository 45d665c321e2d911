"""kill -9 anywhere loses nothing and repeats no judge call (issue 18).

One uninterrupted reference run of the tiny workflow, then ONE chained sequence on a second copy: a run refused by
an HTTP 401 (the key echoed back by the server), then kill -9 of the whole Snakemake process group during
calibration, during generation after a checkpoint, during a Zarr write, during grading after some calls and during
the audit, each followed by the README's "After a crash" commands (the plain rerun is refused by the lock;
``snakemake --unlock``; ``snakemake --cores 2 --rerun-incomplete``). The judge is the anthropic HTTP backend on the
loopback server of tests/judge_server.py, which records every request body.

Asserted: every trials table (row for row, every column but provenance and judge metadata), every summary and the
audit table equal the reference run's; a request body reached the judge more often than in the reference run only
when it was in flight at a kill (sent, and its answer not yet written to the judge cache: at most ``concurrency``
bodies per grading job) or refused by the 401 (or cancelled beside it); no temporary file,
folder backup or generation checkpoint is left; no secret (API keys, HF token) is in any file under results/, logs/,
resources/, .snakemake/, the judge cache, the report or the runs' output. While the reference run runs, a second
invocation on its directory is refused by the lock.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from judge_server import CountingServer, answered_not_stored, body_hash

from esr.io import BACKUP_NAME, TEMP_NAME
from esr.testing import write_tiny_workflow

CONCURRENCY = 4
SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-ESRLEAKCHECK-4f1d2a9c",
    "OPENAI_API_KEY": "sk-ESRLEAKCHECK-openai-77b3e0",
    "HF_TOKEN": "hf_ESRLEAKCHECKhuggingface5c21",
    "OPENROUTER_API_KEY": "sk-or-ESRLEAKCHECK-router-913a",
}
LOCK_MESSAGE = "Directory cannot be locked"
#: Columns that legitimately differ between runs (timestamps, cache hit flags); everything else must match.
VOLATILE_COLUMNS = ("provenance", "judge_metadata")
VOLATILE_KEYS = ("provenance", "created_utc")


def make_config(root: Path, server: CountingServer) -> Path:
    """The tiny workflow (every stage) with the anthropic HTTP judge on ``server``, generation batches of 2 (several
    checkpoints per shard)."""
    path = write_tiny_workflow(root)
    cfg = yaml.safe_load(path.read_text())
    judge = {
        "backend": "anthropic",
        "model": "judge-model",
        "base_url": server.root,
        "api_key_env": "ANTHROPIC_API_KEY",
        "timeout_s": 10,
        "max_retries": 2,
        "backoff_base_s": 0.01,
        "rate_limit_per_s": None,
        "concurrency": CONCURRENCY,
        "cache_dir": str(root / "judge_cache"),
    }
    cfg["judge"], cfg["threshold_judge"] = dict(judge), dict(judge)
    cfg["generation"]["batch_size"] = 2
    # CI time: drop the experiments that add only more of the same jobs (exp2 sweep, exp5 meta-prompts, exp10
    # random controls); every stage the kills target stays (calibration, generation, Zarr, grading, audit)
    cfg["experiments"]["boost_sweep"]["enabled"] = False
    cfg["experiments"]["meta_prompts"]["variants"] = []
    cfg["experiments"]["random_control"] = False
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake_cmd(repo_root: Path, work: Path, config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "--directory", str(work)] + [
        "--configfile",
        str(config),
        *args,
    ]


RESUME = ("--cores", "2", "--rerun-incomplete")  # the README's "After a crash" command


class Runs:
    """Every Snakemake invocation of one working directory, its output kept for the secrets check."""

    def __init__(self, repo_root: Path, work: Path, config: Path):
        self.repo_root, self.work, self.config = repo_root, work, config
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **SECRETS}
        self.outputs: list[str] = []

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        res = subprocess.run(
            snakemake_cmd(self.repo_root, self.work, self.config, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        self.outputs += [res.stdout, res.stderr]
        return res

    def start(self, *args: str) -> subprocess.Popen:
        """In its own process group (``start_new_session``): the group is Snakemake and every job it started. Output
        goes to a file (a pipe nobody reads would block Snakemake)."""
        out = self.work.parent / f"{self.work.name}-run-{len(self.outputs)}.out"
        with open(out, "w") as fh:
            proc = subprocess.Popen(
                snakemake_cmd(self.repo_root, self.work, self.config, *args),
                stdout=fh,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env,
                start_new_session=True,
            )
        proc.out_path = out
        self.outputs.append("")
        return proc

    def collect(self, proc: subprocess.Popen) -> str:
        proc.wait()
        out = proc.out_path.read_text()
        self.outputs.append(out)
        return out


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (from /proc)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(Path(stat).parent.name))
    return pids


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group (Snakemake and its jobs) and wait until no member is alive."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while group_members(proc.pid):
        assert time.monotonic() < deadline, f"process group {proc.pid} survived SIGKILL: {group_members(proc.pid)}"
        time.sleep(0.05)


def newer(pattern: str, since: float) -> bool:
    for p in glob.glob(pattern, recursive=False):
        try:
            if os.stat(p).st_mtime >= since:
                return True
        except FileNotFoundError:
            continue
    return False


def kill_points(work: Path, server: CountingServer):
    """(name, condition(phase_start, hits_at_phase_start) -> bool), in the order the stages run."""
    w = str(work)

    def calibration(t0, h0):
        return len(server.hits) - h0 >= 6 and newer(f"{w}/logs/calibrate_boosts/*/shard-*.log", t0)

    def generation(t0, h0):  # a checkpoint of this run, i.e. a generate job between two batches
        return newer(f"{w}/results/*/*/shards/*/gen-*.parquet.partial/*/batch-*.pt", t0)

    def zarr(t0, h0):  # the temporary folder of an atomic Zarr write (a generate shard's store or the gathered one)
        return newer(f"{w}/results/*/*/shards/*/.acts-*.zarr.*.tmp", t0) or newer(
            f"{w}/results/activations/*/.*.zarr.*.tmp", t0
        )

    grading_started: list[int] = []

    def grading(t0, h0):  # some judge calls of a grade job answered
        if not grading_started:
            if newer(f"{w}/logs/grade/*/*/*.log", t0):
                grading_started.append(len(server.hits))
            return False
        return len(server.hits) - grading_started[0] >= 2 * CONCURRENCY

    def audit(t0, h0):
        return newer(f"{w}/logs/audit.log", t0)

    return [
        ("calibration", calibration),
        ("generation", generation),
        ("zarr", zarr),
        ("grading", grading),
        ("audit", audit),
    ]


def leftovers(work: Path) -> list[str]:
    found = []
    for root in ("results", "resources", "logs", "judge_cache"):
        for dirpath, dirnames, filenames in os.walk(work / root):
            for name in dirnames + filenames:
                if TEMP_NAME.match(name) or BACKUP_NAME.match(name) or name.endswith(".partial"):
                    found.append(os.path.join(dirpath, name))
    return found


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def trials_equal(a: Path, b: Path) -> None:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    keep = [c for c in x.columns if c not in VOLATILE_COLUMNS]
    assert list(x.columns) == list(y.columns), a
    x = x[keep].sort_values("trial_id").reset_index(drop=True)
    y = y[keep].sort_values("trial_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(x.astype(str), y.astype(str), obj=str(a))


@pytest.mark.slow
def test_kill_9_anywhere_loses_nothing_and_repeats_no_judge_call(repo_root, tmp_path):
    t_start = time.monotonic()
    ref_server, chain_server = CountingServer(delay_s=0.05).start(), CountingServer(delay_s=0.05).start()
    try:
        _run(repo_root, tmp_path, ref_server, chain_server, t_start)
    finally:
        ref_server.stop()
        chain_server.stop()


def _run(repo_root, tmp_path, ref_server, chain_server, t_start):
    report: list[str] = []
    # ---------------------------------------------------------------- reference: one uninterrupted run
    ref = tmp_path / "reference"
    ref_runs = Runs(repo_root, ref, make_config(ref, ref_server))
    t0 = time.monotonic()
    proc = ref_runs.start(*RESUME)
    while not glob.glob(f"{ref}/logs/**/*.log", recursive=True) and proc.poll() is None:
        time.sleep(0.05)
    second = ref_runs.run(*RESUME, timeout=300)  # a second invocation on a running directory: refused
    assert second.returncode != 0 and LOCK_MESSAGE in second.stderr, second.stderr[-2000:]
    out = ref_runs.collect(proc)
    assert proc.returncode == 0, out[-4000:]
    t_reference = time.monotonic() - t0
    ref_counts = ref_server.counts()
    # long steps log a progress line (rate, ETA) per unit of work in the rule's log
    for pattern, line in [
        ("logs/calibrate_boosts/tiny-llama/shard-*.log", "calibrating latents: "),
        ("logs/generate/exp1/tiny-llama/steered-*.log", "generate exp1/steered shard "),
        ("logs/discover_detectors/tiny-llama.log", "normal pairs: "),
    ]:
        text = "".join(p.read_text() for p in ref.glob(pattern))
        assert line in text and "/s, elapsed" in text and "ETA" in text, (pattern, text[-2000:])
    report.append(f"reference run {t_reference:.0f} s, {len(ref_server.hits)} judge requests, {len(ref_counts)} bodies")

    # ---------------------------------------------------------------- the chained crash sequence
    work = tmp_path / "crashed"
    runs = Runs(repo_root, work, make_config(work, chain_server))
    allowed_extra: dict[str, int] = {}  # body -> repeats a kill (or the 401) may cost
    t_chain = time.monotonic()

    # a refused key (401, the server echoes it back) stops the run with a message naming the key's variable
    chain_server.plan = {"": ["401echo"]}
    auth = runs.run(*RESUME)
    assert auth.returncode != 0
    h401 = [h for h in chain_server.hits if h.action == "401echo"]
    sent = h401[0].headers.get("x-api-key", "") + h401[0].headers.get("authorization", "") if h401 else ""
    assert len(h401) == 1 and SECRETS["ANTHROPIC_API_KEY"] in sent  # the key reached the server (SDK: Bearer)
    allowed_extra[body_hash(h401[0].body)] = 1
    # the requests sent beside the refused one (the judge's concurrency) are cancelled when the 401 stops the batch:
    # answered by the server, never cached, so sent again by the next run
    chain_server.wait_idle()
    beside = answered_not_stored(chain_server.hits, work / "judge_cache") - {body_hash(h401[0].body)}
    assert len(beside) < 2 * CONCURRENCY, len(beside)  # two calibration jobs may run at once (--cores 2)
    for h in beside:
        allowed_extra[h] = 1
    messages = "\n".join(Path(p).read_text() for p in glob.glob(f"{work}/logs/**/*.log", recursive=True))
    assert "401" in messages and "ANTHROPIC_API_KEY" in messages, messages[-3000:]
    chain_server.plan = {}
    report.append(f"401: run stopped, {len(chain_server.hits)} requests sent")

    pending = kill_points(work, chain_server)
    first_kill = True
    while pending:
        t0, h0 = time.time(), len(chain_server.hits)
        proc = runs.start(*RESUME)
        hit = None
        while hit is None and proc.poll() is None:
            for i, (_name, cond) in enumerate(pending):
                if cond(t0, h0):
                    hit = i
                    break
            else:
                time.sleep(0.005)
        if hit is None:  # the run ended before any pending point was seen
            out = runs.collect(proc)
            raise AssertionError(
                f"run ended (rc {proc.returncode}) before kill points {[n for n, _ in pending]}: {out[-3000:]}"
            )
        in_flight = chain_server.snapshot_in_flight()
        n_snap = len(chain_server.hits)
        kill_group(proc)
        runs.collect(proc)
        # a request already on the wire at the kill reaches the server after it (the client is gone): in flight too
        chain_server.wait_idle()
        in_flight |= {body_hash(h.body) for h in chain_server.hits[n_snap:]}
        # answered by the server but killed before the client wrote the answer to its cache: lost at the kill too
        in_flight |= answered_not_stored(chain_server.hits[h0:], work / "judge_cache")
        name = pending[hit][0]
        missed = [n for n, _ in pending[:hit]]
        assert not missed, f"kill points {missed} passed unseen before {name}"
        assert len(in_flight) <= CONCURRENCY * 2, (name, len(in_flight))  # two jobs may grade at once (--cores 2)
        for h in in_flight:
            allowed_extra[h] = allowed_extra.get(h, 0) + 1
        partial = glob.glob(f"{work}/results/*/*/shards/*/gen-*.parquet.partial/*/batch-*.pt")
        temps = leftovers(work)
        report.append(
            f"kill during {name} after {time.time() - t0:.0f} s: {len(chain_server.hits) - h0} requests in this run, "
            f"{len(in_flight)} in flight, "
            f"{len(partial)} checkpoints and {len(temps)} temporaries left"
        )
        pending = pending[hit + 1 :]
        if first_kill:  # after a kill the plain rerun is refused by the lock until --unlock
            refused = runs.run(*RESUME, timeout=300)
            assert refused.returncode != 0 and LOCK_MESSAGE in refused.stderr and "--unlock" in refused.stderr
            first_kill = False
        unlock = runs.run("--unlock", timeout=300)
        assert unlock.returncode == 0, unlock.stderr[-2000:]

    t_final = time.monotonic()
    final = runs.run(*RESUME, timeout=1200)
    assert final.returncode == 0, final.stderr[-4000:]
    t_whole = time.monotonic() - t_chain
    report.append(
        f"final resume {time.monotonic() - t_final:.0f} s; whole chain {t_whole:.0f} s "
        f"(reference {t_reference:.0f} s: recovering from 1 refused key + {5} kills cost {t_whole - t_reference:.0f} s)"
    )

    # ---------------------------------------------------------------- results equal the reference's
    ref_tables = sorted(p.relative_to(ref) for p in ref.glob("results/*/*/trials.parquet"))
    assert ref_tables and ref_tables == sorted(p.relative_to(work) for p in work.glob("results/*/*/trials.parquet"))
    for rel in ref_tables:
        trials_equal(ref / rel, work / rel)
    for pattern in ("results/*/*/summary.json", "results/comparisons/*.json", "results/audit/paper_numbers.json"):
        ref_files = sorted(p.relative_to(ref) for p in ref.glob(pattern))
        assert ref_files, pattern
        for rel in ref_files:
            a, b = json.loads((ref / rel).read_text()), json.loads((work / rel).read_text())
            assert strip(a) == strip(b), rel

    # ---------------------------------------------------------------- no repeated judge call but those in flight
    counts = chain_server.counts()
    over = {h: n - ref_counts.get(h, 0) for h, n in counts.items() if n > ref_counts.get(h, 0)}
    not_allowed = {h: n for h, n in over.items() if n > allowed_extra.get(h, 0)}
    assert not not_allowed, f"{len(not_allowed)} bodies re-sent that were not in flight at a kill"
    assert set(counts) == set(ref_counts), "a body sent in one run only"
    report.append(
        f"judge: {len(chain_server.hits)} requests (reference {len(ref_server.hits)}), {sum(over.values())} repeats, "
        f"all in flight at a kill or at the 401 ({sum(allowed_extra.values())} allowed)"
    )

    # ---------------------------------------------------------------- nothing left behind
    assert leftovers(work) == []

    # ---------------------------------------------------------------- no secret anywhere
    rep = runs.run("--report", "results/report.html", timeout=600)
    assert rep.returncode == 0, rep.stderr[-2000:]
    blobs = list(runs.outputs) + list(ref_runs.outputs)
    files = [
        p
        for base in (work, ref)
        for root in ("results", "logs", "resources", ".snakemake", "judge_cache")
        for p in (base / root).rglob("*")
        if p.is_file()
    ]
    assert (work / "results/report.html").is_file()
    leaks = [str(p) for p in files if any(v.encode() in p.read_bytes() for v in SECRETS.values())]
    leaks += [f"run output {i}" for i, b in enumerate(blobs) if any(v in b for v in SECRETS.values())]
    assert not leaks, leaks

    report.append(f"test {time.monotonic() - t_start:.0f} s")
    print("\n".join(report))
    Path(os.environ.get("ESR_CRASH_REPORT", tmp_path / "crash_report.txt")).write_text("\n".join(report) + "\n")


def test_harness_pieces_offline(tmp_path):
    """The harness's own bookkeeping (fast): body hashing, in-flight tracking, leftover detection."""
    srv = CountingServer(delay_s=0.3).start()
    try:
        import urllib.request

        def post():
            req = urllib.request.Request(
                srv.root + "/v1/messages", data=json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
            )
            urllib.request.urlopen(req).read()

        t = threading.Thread(target=post)
        t.start()
        time.sleep(0.15)
        assert len(srv.snapshot_in_flight()) == 1
        t.join()
        assert srv.snapshot_in_flight() == set() and list(srv.counts().values()) == [1]
    finally:
        srv.stop()
    (tmp_path / "results" / "x.zarr.partial").mkdir(parents=True)
    (tmp_path / "results" / ".a.json.abcdefgh.tmp").write_text("")
    assert len(leftovers(tmp_path)) == 2 and strip({"a": 1, "provenance": {}, "b": [{"created_utc": 1}]}) == {
        "a": 1,
        "b": [{}],
    }
