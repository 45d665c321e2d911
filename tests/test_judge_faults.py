"""Judge faults against a real loopback HTTP server (official SDK transports), and damaged or shared caches.

Each fault is scripted per request (``tests/judge_server.py``): 429 with ``Retry-After`` / ``retry-after-ms``, 500,
529, a stall past the client timeout, an unreadable body, a verdict with no attempts, a reply cut at max_tokens. A
fault is retried within a bound, then recorded on its trial with an error kind that the inclusion report counts;
401/403 stops the run; a circuit breaker stops an outage; permanent failures are remembered, not re-sent; identical
requests are sent once; a failing batch cancels what is outstanding; a damaged cache entry (judge or calibration)
is recomputed with a WARNING naming the file; processes sharing a cache directory never tear an entry."""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import time
from pathlib import Path

import httpx2
import pandas as pd
import pytest
from judge_server import ScriptedServer

from esr.judge import (
    JudgeAuthError,
    JudgeCache,
    JudgeCircuitOpen,
    JudgeRequest,
    build_concreteness_grader,
)
from esr.judge.fake import FakeJudge
from esr.judge.http_backends import cap_retry_hint
from esr.metrics import include_trials
from esr.trials import columns, grade_trials

from helpers import graded_row, http_judge

KEY = "sk-test-DO-NOT-LEAK-7f3a9c1e5b"
ON = "To bake bread, mix flour, water, yeast and salt, knead, let it rise, shape and bake at 220 C."
BACKENDS = ["anthropic", "openai_compat"]


@pytest.fixture
def server():
    srv = ScriptedServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("ESR_TEST_KEY", KEY)
    monkeypatch.delenv("ESR_RETRY_FAILED", raising=False)


def judge_for(server, backend: str, tmp_path=None, **extra):
    return http_judge(server, backend, tmp_path, **{"max_retries": 2, "concurrency": 8, **extra})


def req(marker: str = "", response: str = ON, trial_id: str | None = None) -> JudgeRequest:
    return JudgeRequest("Explain how to bake bread.", f"{response} {marker}".strip(), "dogs", trial_id)


# ------------------------------------------------------------------------------------------------ retries, kinds
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdk_transport_is_configured_from_our_settings(server, backend):
    judge = judge_for(server, backend, max_retries=3, timeout_s=7.5)
    session = judge.chat.open_session(concurrency=2, limiter=judge.limiter)
    try:
        assert session.client.max_retries == 3
        timeout = session.client.timeout
        assert (timeout.read if hasattr(timeout, "read") else timeout) == 7.5
        assert session.http.timeout.read == 7.5 and session.http.timeout.connect == 5.0
    finally:
        import asyncio

        asyncio.run(session.aclose())


def test_retry_hints_are_capped():
    """A wait hint longer than ``max_retry_wait_s`` (seconds, milliseconds, HTTP date, or absurd) is cut to it."""
    for headers in ({"retry-after": "3600"}, {"retry-after-ms": "3600000"}, {"retry-after": "inf"}):
        h = httpx2.Headers(headers)
        cap_retry_hint(h, 2.5)
        assert h.get("retry-after-ms") == "2500" and "retry-after" not in h
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 7200))
    h = httpx2.Headers({"retry-after": date})
    cap_retry_hint(h, 1.0)
    assert h.get("retry-after-ms") == "1000"
    short = httpx2.Headers({"retry-after": "0.5"})
    cap_retry_hint(short, 2.5)
    assert dict(short) == {"retry-after": "0.5"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_one_hour_retry_after_waits_at_most_max_retry_wait_s(server, backend):
    server.plan = {"#sec": ["429:3600"], "#msec": ["429ms:3600000"]}
    judge = judge_for(server, backend, max_retry_wait_s=0.4)
    t0 = time.monotonic()
    results = judge.grade_batch([req("#sec"), req("#msec")])
    waited = time.monotonic() - t0
    assert all(r.ok and r.n_calls == 2 for r in results), [r.error for r in results]
    assert 0.4 <= waited < 2.0, waited


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_fault_is_retried_within_a_bound_then_recorded_with_its_kind(server, backend):
    persistent = 10
    server.plan = {
        "#r429": ["429:0.1"] * persistent,
        "#ms429": ["429ms:100"] * persistent,
        "#r500": ["500"] * persistent,
        "#r529": ["529"] * persistent,
        "#stall": ["stall:2.5"] * persistent,
        "#badbody": ["badbody"] * persistent,
        "#none": ["noattempts"] * persistent,
        "#cut": ["cut"] * persistent,
        "#once529": ["529"],  # a transient fault: retried, then graded
    }
    markers = list(server.plan) + ["#fine"]
    max_retries, timeout_s = 1, 1.0
    judge = judge_for(server, backend, max_retries=max_retries, timeout_s=timeout_s, max_parse_retries=1)
    t0 = time.monotonic()
    results = dict(zip(markers, judge.grade_batch([req(m, trial_id=m) for m in markers])))
    elapsed = time.monotonic() - t0
    # the documented bound of one call: (max_retries + 1) * timeout_s + max_retries * max(8 s, max_retry_wait_s)
    assert elapsed < (max_retries + 1) * timeout_s + max_retries * 8.0, elapsed
    kinds = {m: (r.error_kind, r.metadata.get("http_status"), r.n_calls) for m, r in results.items()}
    tries = max_retries + 1
    assert kinds == {
        "#r429": ("http", 429, tries),
        "#ms429": ("http", 429, tries),
        "#r500": ("http", 500, tries),
        "#r529": ("http", 529, tries),
        "#stall": ("timeout", None, tries),
        "#badbody": ("unreadable", 200, tries),
        "#none": (None, None, 1),
        "#cut": ("truncated", None, 2),  # one corrective re-ask (max_parse_retries = 1)
        "#once529": (None, None, 2),
        "#fine": (None, None, 1),
    }
    assert results["#none"].ok and results["#none"].attempts == []
    assert judge.stats.errors_http == 4 and judge.stats.errors_timeout == 1 and judge.stats.errors_unreadable == 1
    assert judge.stats.errors_truncated == 1 and judge.stats.backend_calls == len(server.hits)

    # on the trial: error + kind; the summary's inclusion report says how many were excluded and why
    rows = [
        graded_row(f"t{i}", response=f"{ON} {m}", label="dogs", judge_prompt="Explain how to bake bread.")
        for i, m in enumerate(markers)
    ]
    table = pd.DataFrame(rows)[columns("generated")]
    graded = grade_trials(table, judge)  # the same judge again (no cache): every fault is met again
    got = {t: (k if isinstance(k, str) else None) for t, k in zip(graded["trial_id"], graded["error_kind"])}
    assert got == {f"t{i}": kinds[m][0] for i, m in enumerate(markers)}
    _, report = include_trials(graded)
    assert report.excluded["trial_error"] == 7 and report.excluded["no_attempts"] == 1
    assert report.trial_errors_by_kind == {"http": 4, "timeout": 1, "truncated": 1, "unreadable": 1}
    assert report.n_included == 2 and report.to_dict()["trial_errors_by_kind"]["http"] == 4


# ------------------------------------------------------------------------------------------------ auth, breaker
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("action", ["401echo", "403"])
def test_refused_key_stops_the_run_at_once_naming_the_variable(server, backend, action, caplog):
    server.plan = {"#auth": [action] * 5}
    judge = judge_for(server, backend, concurrency=1)
    with pytest.raises(JudgeAuthError) as info:
        judge.grade_batch([req("#auth")] + [req(f"#after{i}") for i in range(10)])
    message = str(info.value)
    assert backend in message and "'ESR_TEST_KEY'" in message and action[:3] in message
    assert KEY not in message and KEY not in caplog.text
    server.wait_idle()
    assert len(server.hits) == 1  # no retry of a refused key, and nothing after it is sent


def test_refused_key_stops_the_concreteness_grader_and_cancels_its_batches(server):
    server.plan = {"slow label": ["stall:1.0"], "refused label": ["401echo"]}
    grader = build_concreteness_grader(
        {
            "backend": "anthropic",
            "model": "m",
            "base_url": server.root,
            "api_key_env": "ESR_TEST_KEY",
            "batch_size": 1,
            "concurrency": 2,
            "rate_limit_per_s": None,
            "cache_dir": None,
        },
        show_progress=False,
    )
    t0 = time.monotonic()
    with pytest.raises(JudgeAuthError, match="ESR_TEST_KEY"):
        grader.grade_labels(["slow label", "refused label"] + [f"queued label {i}" for i in range(6)])
    assert time.monotonic() - t0 < 0.9  # the stalled batch was cancelled, not awaited
    server.wait_idle()
    assert sorted(h.user.count("refused label") for h in server.hits) == [0, 1] and len(server.hits) == 2


def test_circuit_breaker_stops_an_outage(server, tmp_path):
    server.plan = {f"#o{i}#": ["500"] * 3 for i in range(30)}  # markers end in # (none holds another)
    judge = judge_for(server, "openai_compat", tmp_path, max_retries=0, concurrency=1, max_consecutive_failures=4)
    with pytest.raises(JudgeCircuitOpen, match=r"4 requests failed in a row .*max_consecutive_failures = 4"):
        judge.grade_batch([req(f"#o{i}#") for i in range(30)])
    server.wait_idle()
    assert len(server.hits) == 4 and judge.stats.failures_stored == 0  # an outage is not remembered
    # failures between answers never trip it (the streak resets), and are remembered
    server.hits.clear()
    mixed = [req(f"#o{i}#") if i % 2 else req(f"#ok{i}#") for i in range(10, 22)]
    results = judge_for(server, "openai_compat", tmp_path, max_retries=0, max_consecutive_failures=4).grade_batch(mixed)
    assert sum(r.ok for r in results) == 6 and len(server.hits) == 12
    assert sum(JudgeCache(tmp_path / "cache").get_failure(judge.cache_key(r)) is not None for r in mixed) == 6


def test_a_permanently_failing_request_is_sent_by_one_job_only(server, tmp_path):
    """The issue's case: one request under a persistent 500 drew 28 calls across 7 jobs; now (max_retries + 1)
    calls in the first job and none in the six after it."""
    server.plan = {"#dead": ["500"] * 100}
    items = [req("#dead")] + [req(f"#live{i}") for i in range(3)]
    for job in range(7):
        judge = judge_for(server, "anthropic", tmp_path, max_retries=3)
        results = judge.grade_batch(items)
        assert results[0].error_kind == "http" and all(r.ok for r in results[1:])
        assert judge.stats.backend_calls == (7 if job == 0 else 0)
    assert server.count("#dead") == 4 and len(server.hits) == 7


# ------------------------------------------------------------------------------------------------ duplicates, races
@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_requests_in_a_batch_are_sent_once(server, backend, tmp_path):
    server.plan = {"#slow": ["stall:0.2"] * 5}
    bodies = [req("#a"), req("#b"), req("#slow")]
    batch = [JudgeRequest(r.prompt, r.response, r.latent_label, f"trial-{i}") for i in range(4) for r in bodies]
    judge = judge_for(server, backend, tmp_path)
    results = judge.grade_batch(batch)
    assert len(server.hits) == 3 and {server.count(m) for m in ("#a", "#b", "#slow")} == {1}
    assert [r.trial_id for r in results] == [r.trial_id for r in batch]
    assert all(r.ok for r in results) and sum(r.n_calls for r in results) == 3
    assert judge.stats.duplicates == 9 and judge.stats.cache_misses == 3
    assert [r.scores for r in results[3:6]] == [r.scores for r in results[:3]]
    assert sum(bool(r.metadata.get("duplicate")) for r in results) == 9


def test_identical_requests_are_graded_once_by_every_judge_kind(tmp_path):
    judge = FakeJudge(cache=JudgeCache(tmp_path))
    out = judge.grade_batch([JudgeRequest("p", "same", "dogs", f"t{i}") for i in range(5)])
    assert judge.calls == 1 and [r.trial_id for r in out] == [f"t{i}" for i in range(5)]


def test_a_failing_batch_cancels_its_outstanding_requests(server):
    server.plan = {"#stall": ["stall:1.5"], "#auth": ["401echo"]}
    judge = judge_for(server, "anthropic", concurrency=2)
    t0 = time.monotonic()
    with pytest.raises(JudgeAuthError):
        judge.grade_batch([req("#stall"), req("#auth")] + [req(f"#q{i}") for i in range(10)])
    assert time.monotonic() - t0 < 1.2  # the stalled request was cancelled, not awaited
    server.wait_idle()
    assert sorted(h.action for h in server.hits) == ["401echo", "stall:1.5"]  # the queued ten never left


def test_crash_then_rerun_is_deterministic(server, tmp_path):
    """The fast suite's crash test, many times over: the rerun sends exactly the requests not cached."""

    class CrashingCache(JudgeCache):
        def put(self, key, result, inputs=None):
            if self.counts.writes >= 3:
                raise RuntimeError("simulated crash")
            return super().put(key, result, inputs)

    for round_ in range(5):
        items = [req(f"#c{round_}-{i:02d}-") for i in range(8)]
        judge = judge_for(server, "anthropic", tmp_path, concurrency=3)
        judge.cache = CrashingCache(tmp_path / "cache")
        with pytest.raises(RuntimeError, match="simulated crash"):
            judge.grade_batch(items)
        server.wait_idle()
        server.hits.clear()
        rerun = judge_for(server, "anthropic", tmp_path, concurrency=3)
        assert all(r.ok for r in rerun.grade_batch(items))
        assert rerun.stats.cache_hits == 3 and len(server.hits) == 5, round_


# ------------------------------------------------------------------------------------------------ damaged caches
def _flip_digit(path: Path, pattern: str) -> None:
    text = path.read_text()
    m = re.search(pattern, text)
    assert m, (pattern, text[:300])
    digit = m.group(1)
    path.write_text(text[: m.start(1)] + str((int(digit) + 1) % 10) + text[m.end(1) :])


def test_damaged_judge_cache_entry_is_recomputed_with_a_warning(tmp_path, caplog):
    request = JudgeRequest("Bake bread?", f"{ON} Let me start over. {ON}", "dogs", "t1")
    judge = FakeJudge(cache=JudgeCache(tmp_path))
    first = judge.grade_batch([request])[0]
    path = judge.cache.path_for(judge.cache_key(request))
    for damage in ("truncate", "flip"):
        if damage == "truncate":
            path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        else:
            _flip_digit(path, r'"score": (\d)')  # 100.0 -> 200.0: valid JSON, wrong value
            assert json.loads(path.read_text())["result"]["attempts"][0]["score"] != first.attempts[0].score
        caplog.clear()
        again = FakeJudge(cache=JudgeCache(tmp_path))
        with caplog.at_level(logging.WARNING, logger="esr.judge.cache"):
            res = again.grade_batch([request])[0]
        assert again.calls == 1 and not res.cached and res.scores == first.scores, damage
        assert str(path) in caplog.text and again.cache.counts.corrupt == 1, damage
        assert "checksum" in caplog.text if damage == "flip" else "unreadable" in caplog.text
        third = FakeJudge(cache=JudgeCache(tmp_path))  # the entry was rewritten whole
        assert third.grade_batch([request])[0].cached and third.calls == 0


def test_damaged_calibration_cache_entry_is_recomputed_with_a_warning(tmp_path, caplog):
    from test_calibration import counting_score_fn, make_key

    from esr.calibration import CalibrationCache, run_calibration_shard

    cache = CalibrationCache(tmp_path)
    key = make_key(latent=3)
    batch, calls = counting_score_fn()
    (first,) = run_calibration_shard([key], batch, cache, progress=False)
    path = cache.path_for(key)
    for damage in ("truncate", "flip"):
        if damage == "truncate":
            path.write_text(path.read_text()[:100])
        else:
            _flip_digit(path, r'"threshold": -?0\.(\d)')
            assert json.loads(path.read_text())["result"]["threshold"] != first.threshold
        caplog.clear()
        batch, calls = counting_score_fn()
        with caplog.at_level(logging.WARNING, logger="esr.calibration"):
            (again,) = run_calibration_shard([key], batch, CalibrationCache(tmp_path), progress=False)
        assert calls and again.threshold == first.threshold, damage  # recomputed, the same value
        assert str(path) in caplog.text, damage
        batch, calls = counting_score_fn()
        run_calibration_shard([key], batch, CalibrationCache(tmp_path), progress=False)
        assert not calls  # rewritten whole: a hit again


# ------------------------------------------------------------------------------------------------ shared cache
def _writer(root: str, worker: int, n: int) -> None:
    cache = JudgeCache(root)
    for i in range(n):
        cache.put(f"{i:064x}", {"writer": worker, "i": i, "pad": "x" * 2000})  # shared keys
        cache.put(f"a{worker:07x}{i:056x}", {"writer": worker, "i": i})  # this worker's keys


def _grader(root: str, n: int) -> None:
    judge = FakeJudge(cache=JudgeCache(root))
    judge.grade_batch([JudgeRequest("p", f"answer {i}", "dogs") for i in range(n)])


def test_processes_sharing_one_cache_directory_never_tear_an_entry(tmp_path):
    ctx = multiprocessing.get_context("fork")  # separate processes, as SLURM jobs; fork spares re-imports
    root, n, workers = str(tmp_path / "shared"), 60, 3
    procs = [ctx.Process(target=_writer, args=(root, w, n)) for w in range(workers)]
    procs += [ctx.Process(target=_grader, args=(root, 40))]
    for p in procs:
        p.start()
    reader = JudgeCache(root)
    while any(p.is_alive() for p in procs):  # a reader meanwhile never sees a torn entry
        for i in range(0, n, 7):
            got = reader.get(f"{i:064x}")
            assert got is None or got["i"] == i
        time.sleep(0.01)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    cache = JudgeCache(root)
    assert all(cache.get(f"{i:064x}")["i"] == i for i in range(n))
    assert all(cache.get(f"a{w:07x}{i:056x}") == {"writer": w, "i": i} for w in range(workers) for i in range(n))
    judge = FakeJudge(cache=cache)
    assert all(r.cached for r in judge.grade_batch([JudgeRequest("p", f"answer {i}", "dogs") for i in range(40)]))
    assert reader.counts.corrupt == 0 and cache.counts.corrupt == 0
    assert len(cache) == n + workers * n + 40 and not list(Path(root).rglob("*.tmp"))
