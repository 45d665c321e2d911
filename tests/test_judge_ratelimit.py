"""One judge rate limit shared by every process that grades with the same cache directory (esr.judge.ratelimit):
several grading processes against the loopback judge server together start at most ``rate_limit_per_s`` calls per
second, as one process would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from judge_server import ScriptedServer

from esr.judge import JudgeRequest, build_judge
from esr.judge.ratelimit import RateLimiter, SharedRateLimiter, limit_file, make_rate_limiter

ROOT = Path(__file__).resolve().parents[1]
ON = "To bake bread, mix flour, water, yeast and salt, knead, let it rise, shape and bake at 220 C."


class TimedServer(ScriptedServer):
    """The scripted judge server, recording when (wall clock) each request arrived and its marker."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.arrivals: list[tuple[float, str]] = []

    def _handle(self, handler, body):
        user = json.dumps(body)
        with self._lock:
            self.arrivals.append((time.time(), user))
        super()._handle(handler, body)


@pytest.fixture
def server():
    srv = TimedServer().start()
    yield srv
    srv.stop()


def _config(server, cache_dir: Path, rate: float | None) -> dict:
    return {
        "backend": "openai_compat",
        "model": "judge-model",
        "base_url": server.root + "/v1",
        "api_key_env": None,
        "timeout_s": 5,
        "max_retries": 0,
        "concurrency": 4,
        "rate_limit_per_s": rate,
        "cache_dir": str(cache_dir),
    }


# Each process: build the judge, say it is ready, wait for the others, then grade its requests (unique answers: no
# cache hits) with 4 concurrent connections.
WORKER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from esr.judge import build_judge, JudgeRequest
    cfg, name, n, ready_dir, n_procs = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
    judge = build_judge(cfg, show_progress=False)
    (ready_dir / name).touch()
    deadline = time.time() + 60
    while len(list(ready_dir.iterdir())) < n_procs and time.time() < deadline:
        time.sleep(0.01)
    results = judge.grade_batch([JudgeRequest("Explain how to bake bread.", f"{ON} #{name}-{i}", "dogs") for i in range(n)])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
""").replace("{ON}", ON)


def _grade_in_processes(server, tmp_path, *, rate, n_procs, n_each, cache_dirs):
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                json.dumps(_config(server, cache_dirs[k], rate)),
                f"p{k}",
                str(n_each),
                str(ready),
                str(n_procs),
            ],
            env=env,
        )
        for k in range(n_procs)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * n_procs
    server.wait_idle()
    return sorted(server.arrivals)


def test_grading_processes_share_one_rate_limit(server, tmp_path):
    rate, n_procs, n_each = 5.0, 3, 5
    arrivals = _grade_in_processes(
        server, tmp_path, rate=rate, n_procs=n_procs, n_each=n_each, cache_dirs=[tmp_path / "cache"] * n_procs
    )
    times = [t for t, _ in arrivals]
    n = n_procs * n_each
    assert len(times) == n
    # the processes graded at the same time (their calls interleave), yet together kept one schedule:
    owners = [next(f"p{k}" for k in range(n_procs) if f"#p{k}-" in user) for _, user in arrivals]
    assert len(set(owners[: n // 2])) > 1, owners
    # n starts span at least (n - 1) / rate seconds (3 processes with their own 5/s would need only 1 s), and every 5
    # consecutive starts at least 4 / rate (a little slack for loopback latency on a busy machine)
    assert times[-1] - times[0] >= (n - 1) / rate - 0.15, times
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(times[i + 4] - times[i] >= 4 / rate - 0.15 for i in range(n - 4)), gaps
    assert sorted(gaps)[len(gaps) // 2] >= 0.8 / rate, gaps  # the median gap is about 1 / rate
    assert limit_file(
        tmp_path / "cache", backend="openai_compat", base_url=server.root + "/v1", model="judge-model"
    ).is_file()


def test_separate_cache_dirs_do_not_share_a_limit(server, tmp_path):
    """The control (in threads, to keep it fast): three judges grading at once with their own cache directories
    each keep only their own limit, so together they start calls three times as fast."""
    rate, n_judges, n_each = 5.0, 3, 6
    judges = [build_judge(_config(server, tmp_path / f"cache{k}", rate), show_progress=False) for k in range(n_judges)]

    def grade(k):
        reqs = [JudgeRequest("Explain how to bake bread.", f"{ON} #t{k}-{i}", "dogs") for i in range(n_each)]
        assert all(r.ok for r in judges[k].grade_batch(reqs))

    with ThreadPoolExecutor(n_judges) as pool:
        list(pool.map(grade, range(n_judges)))
    server.wait_idle()
    times = sorted(t for t, _ in server.arrivals)
    assert len(times) == n_judges * n_each
    assert times[-1] - times[0] < (n_judges * n_each - 1) / rate - 1.0, times


def test_shared_reservations_are_spaced_across_limiters(tmp_path):
    """Two limiters on one file (two processes, in effect) reserve alternating slots 1/rate apart."""
    path = tmp_path / "limit.next"
    a, b = SharedRateLimiter(10.0, path), SharedRateLimiter(10.0, path)
    t0 = time.time()
    delays = [lim.reserve() + (time.time() - t0) for lim in (a, b, a, b)]
    assert delays[0] <= 0.01
    assert [d2 - d1 for d1, d2 in zip(delays, delays[1:])] == [pytest.approx(0.1, abs=0.02)] * 3
    assert float(path.read_text()) == pytest.approx(t0 + 0.4, abs=0.05)
    # a stored schedule an hour ahead (a clock jump) is reset, not waited for
    path.write_text(repr(time.time() + 7200))
    assert a.reserve() <= 0.01
    with pytest.raises(ValueError, match="rate_per_s"):
        SharedRateLimiter(0, path)


def test_limiter_is_shared_only_with_a_cache_dir(server, tmp_path):
    assert type(make_rate_limiter(3, cache_dir=None, backend="a", base_url="u", model="m")) is RateLimiter
    assert type(make_rate_limiter(None, cache_dir=tmp_path, backend="a", base_url="u", model="m")) is RateLimiter
    judge = build_judge(_config(server, tmp_path / "cache", 3), show_progress=False)
    assert isinstance(judge.limiter, SharedRateLimiter)
    assert judge.limiter.path.parent == tmp_path / "cache" / "ratelimit"
    # the limit file is not a cache entry
    assert len(judge.cache) == 0
    # the concreteness grader on the same endpoint and model shares the judge's schedule (one API key's limit)
    from esr.judge.factory import build_concreteness_grader

    grader = build_concreteness_grader(_config(server, tmp_path / "cache", 3), show_progress=False)
    assert isinstance(grader.limiter, SharedRateLimiter) and grader.limiter.path == judge.limiter.path
    no_cache = build_concreteness_grader({**_config(server, tmp_path, 3), "cache_dir": None}, show_progress=False)
    assert type(no_cache.limiter) is RateLimiter
