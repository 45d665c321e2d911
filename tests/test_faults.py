"""Faults short of a kill (issue 18): a full disk, temporaries left by killed writes, the lock a kill leaves, progress
lines in a rule's log. The kill -9 suite itself is tests/test_crash.py (slow)."""

import errno
import logging
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
from test_calibration import counting_score_fn, make_key

from esr import io
from esr.calibration import CalibrationCache, run_calibration_shard
from esr.progress import Progress, format_duration, progress
from esr.recovery import cache_dirs, clean_after_kill
from esr.stages import stage_logging

# ------------------------------------------------------------------------------------------------ disk full


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _no_temporaries(folder):
    return [p.name for p in folder.iterdir() if io.TEMP_NAME.match(p.name) or io.BACKUP_NAME.match(p.name)]


def test_enospc_keeps_previous_file_removes_temporary_and_names_path(tmp_path, monkeypatch):
    out = tmp_path / "results" / "summary.json"
    io.write_json(out, {"n": 1})
    table = tmp_path / "results" / "trials.parquet"
    io.write_parquet(table, pd.DataFrame({"a": [1, 2]}))

    def half_then_full(self, data, *args, **kwargs):  # part of the bytes land, then the disk is full
        with open(self, "w") as f:
            f.write(data[: len(data) // 2])
        _enospc()

    monkeypatch.setattr(type(out), "write_text", half_then_full)
    with pytest.raises(OSError, match="summary.json") as info:
        io.write_json(out, {"n": 2, "pad": "x" * 1000})
    assert info.value.errno == errno.ENOSPC and str(out) in str(info.value) and info.value.filename == str(out)
    monkeypatch.undo()
    assert io.read_json(out) == {"n": 1}

    monkeypatch.setattr(
        pd.DataFrame, "to_parquet", lambda self, path, **kw: (open(path, "wb").write(b"PAR1"), _enospc())
    )
    with pytest.raises(OSError, match="trials.parquet") as info:
        io.write_parquet(table, pd.DataFrame({"a": [3]}))
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert pd.read_parquet(table)["a"].tolist() == [1, 2]
    assert _no_temporaries(out.parent) == []


def test_enospc_in_a_folder_write_keeps_the_previous_folder(tmp_path):
    store = tmp_path / "acts-0.zarr"
    with io.atomic_path(store) as tmp:
        tmp.mkdir()
        (tmp / "chunk").write_text("old")
    with pytest.raises(OSError, match="acts-0.zarr") as info, io.atomic_path(store) as tmp:
        tmp.mkdir()
        (tmp / "chunk").write_text("new, half")
        _enospc()
    assert info.value.errno == errno.ENOSPC
    assert (store / "chunk").read_text() == "old" and _no_temporaries(tmp_path) == []


def test_other_errors_keep_their_type_and_name_the_path_in_a_note(tmp_path):
    with pytest.raises(KeyError), io.atomic_path(tmp_path / "x.json"):
        raise KeyError("boom")
    with pytest.raises(FileNotFoundError) as info, io.atomic_path(tmp_path / "y.json"):
        open(tmp_path / "missing-input.csv")
    assert any("y.json" in note for note in info.value.__notes__)
    assert _no_temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------------ temporaries of killed jobs


def _leftovers(root):
    """What a kill leaves: a temp file, a temp Zarr folder, a folder backup (target present / missing)."""
    res = root / "results" / "exp1" / "m"
    res.mkdir(parents=True)
    tmp_file = res / ".trials.parquet.ab12cd_9.tmp"
    tmp_file.write_bytes(b"PAR1 half")
    tmp_zarr = res / ".acts-1.zarr.k2j4x9ab.tmp"
    (tmp_zarr / "acts").mkdir(parents=True)
    (tmp_zarr / "acts" / "c0").write_bytes(b"chunk")
    (res / "acts-0.zarr").mkdir()
    backup_with_target = res / ".acts-0.zarr.old"
    backup_with_target.mkdir()
    backup_alone = res / ".sae.old"
    backup_alone.mkdir()
    (backup_alone / "cfg.json").write_text("{}")
    checkpoint = res / "trials-0.parquet.partial" / "0123456789abcdef" / "batch-000000.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"resume state")
    keep = res / "trials.parquet"
    keep.write_bytes(b"PAR1 done")
    return res, [tmp_file, tmp_zarr, backup_with_target], backup_alone, [checkpoint, keep]


def test_remove_stale_temporaries_removes_only_what_a_kill_left(tmp_path):
    res, stale, backup_alone, kept = _leftovers(tmp_path)
    cutoff = time.time() + 1
    fresh = res / ".summary.json.zz99yy88.tmp"  # a job writing it right now (after the cutoff): kept
    fresh.write_text("live")
    os.utime(fresh, (cutoff + 5, cutoff + 5))
    assert io.remove_stale_temporaries([tmp_path], older_than=cutoff, dry_run=True) == sorted([*stale, backup_alone])
    assert all(p.exists() for p in stale)
    acted = io.remove_stale_temporaries([tmp_path / "results", tmp_path / "nowhere"], older_than=cutoff)
    assert acted == sorted([*stale, backup_alone])
    assert not any(p.exists() for p in stale) and not backup_alone.exists()
    assert (res / "sae" / "cfg.json").exists()  # a backup without its target is put back, not deleted
    assert all(p.exists() for p in kept) and fresh.exists()


def _lock(workdir, name):
    locks = workdir / ".snakemake" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (locks / name).write_text(str(workdir / "results" / "x") + "\n")
    return locks / name


def test_clean_after_kill_only_when_this_run_holds_the_only_locks(tmp_path):
    res, stale, _, kept = _leftovers(tmp_path)
    cache = tmp_path / "judge_cache" / "ab"
    cache.mkdir(parents=True)
    cache_tmp = cache / ".abcdef.json.q1w2e3r4.tmp"
    cache_tmp.write_text('{"half')
    past = time.time() - 60
    for p in [*stale, cache_tmp]:
        os.utime(p, (past, past))
    msgs = []
    assert clean_after_kill(workdir=tmp_path, own_locks=None, report=msgs.append) == []
    assert "no lock file" in msgs[-1]
    mine = [_lock(tmp_path, "0.input.lock"), _lock(tmp_path, "0.output.lock")]
    other = _lock(tmp_path, "1.output.lock")  # another Snakemake on other targets: its temporaries may be live
    assert clean_after_kill(workdir=tmp_path, own_locks=mine, report=msgs.append) == []
    assert "another Snakemake" in msgs[-1] and all(p.exists() for p in stale)
    other.unlink()
    roots = cache_dirs({"judge": {"cache_dir": "judge_cache"}, "cross_judge": {"judges": {"x": {"cache_dir": "c2"}}}})
    assert roots == ["judge_cache", "c2"]
    removed = clean_after_kill(workdir=tmp_path, own_locks=mine, extra_roots=roots, report=msgs.append)
    assert cache_tmp in removed and all(p in removed for p in stale)
    assert not cache_tmp.exists() and all(p.exists() for p in kept)
    assert any(".acts-1.zarr.k2j4x9ab.tmp" in m for m in msgs)


def test_after_a_kill_the_run_waits_for_unlock_then_cleans_the_temporaries(repo_root, tmp_path):
    """What kill -9 leaves: a lock in .snakemake/locks naming this run's outputs, and temporaries of killed writes.
    The next run is refused, naming --unlock, and deletes nothing; after `snakemake --unlock` the run's onstart hook
    (Snakefile -> esr.recovery) removes the temporaries (results/ and the configured judge cache), keeps generation
    checkpoints. (The live two-invocation lock runs in tests/test_crash.py.) One cheap job: fetch_prompts."""
    from esr.testing import write_tiny_workflow

    config = write_tiny_workflow(tmp_path)
    res, stale, backup_alone, kept = _leftovers(tmp_path)
    cache_tmp = tmp_path / "judge_cache" / "ab" / ".abcdef.json.q1w2e3r4.tmp"
    cache_tmp.parent.mkdir(parents=True)
    cache_tmp.write_text('{"half')
    past = time.time() - 60
    for p in [*stale, backup_alone, cache_tmp]:
        os.utime(p, (past, past))
    _lock(tmp_path, "0.output.lock").write_text("resources/prompts/prompts.txt\n")
    target = "resources/prompts/prompts.txt"

    def smk(*args):
        cmd = [sys.executable, "-m", "snakemake", "-s", str(repo_root / "Snakefile"), "--directory", str(tmp_path)]
        cmd += ["--configfile", str(config), "--cores", "1", *args]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    refused = smk(target)
    assert refused.returncode != 0 and not (tmp_path / target).exists()
    assert "Directory cannot be locked" in refused.stderr and "--unlock" in refused.stderr, refused.stderr[-2000:]
    assert all(p.exists() for p in [*stale, cache_tmp])  # a refused run touches nothing
    assert smk("--unlock").returncode == 0 and not list((tmp_path / ".snakemake" / "locks").glob("*.lock"))
    done = smk(target)
    assert done.returncode == 0 and (tmp_path / target).exists(), done.stderr[-3000:]
    assert not any(p.exists() for p in [*stale, cache_tmp]) and (res / "sae" / "cfg.json").exists()
    assert all(p.exists() for p in kept)
    assert ".acts-1.zarr.k2j4x9ab.tmp (left by a killed job)" in done.stderr


# ------------------------------------------------------------------------------------------------ progress


def test_progress_lines_give_rate_and_eta(caplog):
    now = [100.0]
    meter = Progress(total=4, desc="calibrating latents", unit="latents", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="esr.progress"):
        now[0] += 10
        meter.update(1)
        now[0] += 10
        meter.update(1)
    assert caplog.messages == [
        "calibrating latents: 1/4 latents (25%), 0.1 latents/s, elapsed 10.0 s, ETA 30.0 s",
        "calibrating latents: 2/4 latents (50%), 0.1 latents/s, elapsed 20.0 s, ETA 20.0 s",
    ]
    assert meter.eta_s() == 20.0 and Progress(total=1, desc="d", unit="u").eta_s() == float("inf")
    assert format_duration(245) == "4 min 05 s" and format_duration(7380) == "2 h 03 min"
    with pytest.raises(ValueError, match="total"):
        Progress(total=-1, desc="d", unit="u")
    limited = Progress(total=3, desc="d", unit="u", min_interval_s=60, clock=lambda: now[0])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="esr.progress"):
        for _ in range(3):
            limited.update(1)
        assert list(progress(["a", "b"], desc="batches", unit="batches")) == ["a", "b"]
    assert [m.split(":")[1].split()[0] for m in caplog.messages] == ["1/3", "3/3", "1/2", "2/2"]


def test_a_stopped_meter_logs_its_last_rate_limited_count_once(caplog):
    now = [0.0]
    meter = Progress(total=5, desc="d", unit="u", min_interval_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="esr.progress"):
        meter.update(1)
        now[0] += 1
        meter.update(2)  # rate-limited: not logged
        meter.close()
        meter.close()
    assert caplog.messages[0].startswith("d: 1/5 u") and caplog.messages[1].startswith("d: 3/5 u")
    assert caplog.messages[1].endswith("(stopped)") and len(caplog.messages) == 2


def test_calibration_writes_a_progress_line_per_latent_batch_and_step_to_the_rule_log(tmp_path):
    log_file = tmp_path / "logs" / "calibrate_boosts" / "m" / "shard-0.log"
    batch, _ = counting_score_fn()
    keys = [make_key(latent=j) for j in range(5)]
    with stage_logging(log_file):
        run_calibration_shard(keys, batch, CalibrationCache(tmp_path / "cache"), batch_size=2)
    lines = log_file.read_text().splitlines()
    latents = [ln for ln in lines if "calibrating latents:" in ln]
    assert [ln.split("calibrating latents: ")[1].split()[0] for ln in latents] == ["2/5", "4/5", "5/5"]
    assert all("latents/s" in ln and "ETA" in ln for ln in latents)
    steps = [ln for ln in lines if "calibration steps (2 latents together):" in ln]
    assert len(steps) == 2 * keys[0].settings.n_steps  # one line per bisection step of each batch of two
