"""LLM judge backends (official anthropic / openai SDK transports) against a real HTTP server on loopback: good,
malformed and out-of-range verdicts, corrective re-asks, 429 with retry-after-ms / Retry-After, 5xx, stalls,
unreadable bodies, caching, crash + rerun, secrets hygiene, concreteness grading."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from judge_server import ScriptedServer

from esr.io import write_json
from esr.judge import (
    JUDGE_TEMPLATE_VERSION,
    JudgeAuthError,
    JudgeCache,
    JudgeRequest,
    LLMConcretenessGrader,
    build_concreteness_grader,
    build_judge,
)

from helpers import http_judge

KEY = "sk-test-DO-NOT-LEAK-7f3a9c1e5b"
ON = "To bake bread, mix flour, water, yeast and salt, knead, let it rise, shape and bake at 220 C."
OFF = "Dogs are loyal animals that bark at the mailman and love long walks in the park."
RESTART = f"{OFF} Wait, that's not right. Let me start over. {ON}"


@pytest.fixture
def server():
    srv = ScriptedServer().start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _keys(monkeypatch):
    monkeypatch.setenv("ESR_TEST_KEY", KEY)


def req(
    response: str,
    marker: str = "",
    label: str = "dogs",
    prompt: str = "Explain how to bake bread.",
    trial_id: str | None = None,
) -> JudgeRequest:
    return JudgeRequest(prompt, f"{response} {marker}".strip(), label, trial_id)


@pytest.mark.parametrize("backend", ["anthropic", "openai_compat"])
def test_good_reply_wire_format(server, backend):
    judge = http_judge(server, backend)
    res = judge.grade("Explain how to bake bread.", RESTART, "dogs")
    assert res.ok and res.template_version == JUDGE_TEMPLATE_VERSION
    assert res.judge_id == f"{backend}:judge-model"
    assert [a.score for a in res.attempts] == [10.0, 90.0] and "<json>" in res.raw_text
    hit = server.hits[0]
    if backend == "anthropic":  # the SDK's auth header and API version
        assert (
            hit.path == "/v1/messages" and KEY in f"{hit.headers.get('x-api-key')} {hit.headers.get('authorization')}"
        )
        assert hit.headers["anthropic-version"] and hit.headers["user-agent"].startswith("AsyncAnthropic/Python")
        assert set(hit.body) == {"model", "max_tokens", "system", "messages", "temperature"}
        assert hit.body["messages"][0]["role"] == "user"
    else:
        assert hit.path == "/v1/chat/completions" and hit.headers["authorization"] == f"Bearer {KEY}"
        assert [m["role"] for m in hit.body["messages"]] == ["system", "user"]
    assert hit.body["temperature"] == 0.0 and hit.body["model"] == "judge-model"
    assert "Explain how to bake bread." in hit.user and "Distracting concept: dogs" in hit.user


@pytest.mark.parametrize("backend", ["anthropic", "openai_compat"])
def test_transient_failures_are_retried(server, backend):
    server.plan = {
        "#m1": ["malformed"],
        "#m2": ["429:0.3"],
        "#m3": ["500", "503"],
        "#m4": ["stall:1.5"],
        "#m5": ["badbody"],
        "#m6": ["badscore"],
    }
    judge = http_judge(server, backend, timeout_s=0.5)
    t0 = time.monotonic()
    results = judge.grade_batch([req(ON, f"#m{i}") for i in range(1, 7)])
    assert all(r.ok for r in results), [r.error for r in results]
    assert [r.n_calls for r in results] == [2, 2, 3, 2, 2, 2]
    assert results[0].metadata["parse_failures"] and "outside 0-100" in results[5].metadata["parse_failures"][0]
    assert time.monotonic() - t0 >= 0.3  # Retry-After honoured
    assert judge.stats.parse_retries == 2 and judge.stats.http_retries == 5


@pytest.mark.parametrize("backend", ["anthropic", "openai_compat"])
@pytest.mark.parametrize("action, hint_s", [("429ms:1500", 1.5), ("429:1.2", 1.2)])
def test_retry_hints_are_honoured(server, backend, action, hint_s):
    """A 429 carrying only ``retry-after-ms`` (or only ``Retry-After`` seconds) waits the hint, not the backoff."""
    server.plan = {"#ra": [action]}
    judge = http_judge(server, backend, backoff_base_s=0.0)
    t0 = time.monotonic()
    res = judge.grade_batch([req(ON, "#ra")])[0]
    waited = time.monotonic() - t0
    assert res.ok and res.n_calls == 2 and judge.stats.http_retries == 1
    assert hint_s <= waited < hint_s + 1.0, waited


def test_temperature_zero_judge_gets_a_grade_after_a_corrective_reask(server):
    """A judge that repeats itself for the same request: the re-ask must change the request (corrective turn,
    raised temperature), so the trial gets a grade instead of three identical failures."""
    server.plan = {"#stub": ["stubborn"] * 5}
    judge = http_judge(server, "anthropic", temperature=0.0, reask_temperature=0.5)
    res = judge.grade_batch([req(ON, "#stub")])[0]
    assert res.ok and res.n_calls == 2 and res.scores == [90.0] and len(res.metadata["parse_failures"]) == 1
    first, second = server.hits
    assert len(first.body["messages"]) == 1 and first.body["temperature"] == 0.0
    roles = [m["role"] for m in second.body["messages"]]
    assert roles == ["user", "assistant", "user"] and second.body["temperature"] == 0.5
    assert "could not be read" in second.body["messages"][2]["content"]
    assert second.body["messages"][1]["content"].startswith("Reasoning")


@pytest.mark.parametrize("backend", ["anthropic", "openai_compat"])
def test_reply_cut_at_max_tokens_is_a_truncated_error(server, backend):
    server.plan = {"#cut": ["cut"] * 5}
    judge = http_judge(server, backend, max_parse_retries=1)
    res = judge.grade_batch([req(ON, "#cut")])[0]
    assert res.error_kind == "truncated" and "max_tokens" in res.error and res.n_calls == 2
    assert judge.stats.errors_truncated == 1 and judge.stats.errors_parse == 0


def test_reply_mentioning_the_tag_before_the_verdict_parses(server):
    server.plan = {"#prose": ["proseverdict"]}
    res = http_judge(server, "openai_compat").grade_batch([req(ON, "#prose")])[0]
    assert res.ok and res.n_calls == 1 and res.scores == [90.0]


def test_failures_recorded_without_stopping_batch(server):
    server.plan = {"#bad": ["malformed"] * 10, "#404": ["404"], "#down": ["500"] * 10}
    judge = http_judge(server, "openai_compat", max_retries=2, max_parse_retries=1)
    results = judge.grade_batch([req(ON, "#bad"), req(ON, "#404"), req(ON, "#down"), req(ON)])
    bad, missing, down, good = results
    assert bad.error_kind == "parse" and "malformed" in bad.error and "<json>" in bad.raw_text and bad.n_calls == 2
    assert missing.error_kind == "http" and "404" in missing.error and missing.n_calls == 1  # 4xx: no retry
    assert down.error_kind == "http" and down.n_calls == 3
    assert good.ok and good.attempts
    assert judge.stats.errors_parse == 1 and judge.stats.errors_http == 2


def test_cache_hits_and_transport_errors(server, tmp_path, monkeypatch):
    """A permanent failure (500 after the retries) is remembered and not re-sent by the next job; a busy service
    (503) is re-sent; ESR_RETRY_FAILED=1 re-sends the remembered one."""
    server.plan = {"#down": ["500"], "#busy": ["503"]}
    items = [req(ON, f"#{i}") for i in range(5)] + [req(ON, "#down"), req(ON, "#busy")]
    judge = http_judge(server, "anthropic", tmp_path, max_retries=0)
    first = judge.grade_batch(items)
    assert judge.stats.cache_misses == 7 and judge.stats.cache_hits == 0
    assert [r.error_kind for r in first[-2:]] == ["http", "http"]
    assert [r.metadata["http_status"] for r in first[-2:]] == [500, 503] and judge.stats.failures_stored == 1
    n = len(server.hits)
    again = http_judge(server, "anthropic", tmp_path, max_retries=0)
    second = again.grade_batch(items)
    assert again.stats.cache_hits == 5 and again.stats.cache_misses == 1 and again.stats.failures_remembered == 1
    assert len(server.hits) == n + 1 and server.count("#busy") == 2 and server.count("#down") == 1
    assert all(r.cached for r in second[:5]) and second[0].attempts == first[0].attempts
    down = second[5]
    assert down.error_kind == "http" and down.metadata["remembered_failure"]["status"] == 500 and down.n_calls == 0
    assert "ESR_RETRY_FAILED" in down.error and second[6].ok
    monkeypatch.setenv("ESR_RETRY_FAILED", "1")
    third = http_judge(server, "anthropic", tmp_path, max_retries=0).grade_batch(items)
    assert all(r.ok for r in third) and server.count("#down") == 2 and len(server.hits) == n + 2
    assert len(JudgeCache(tmp_path / "cache")) == 7 and judge.cache_key(items[5]) in JudgeCache(tmp_path / "cache")


def test_cache_key_covers_settings(server, tmp_path):
    a = http_judge(server, "anthropic", tmp_path)
    b = http_judge(server, "anthropic", tmp_path, temperature=1.0)
    c = http_judge(server, "anthropic", tmp_path, restart_gate=True)
    r = req(ON)
    assert len({a.cache_key(r), b.cache_key(r), c.cache_key(r)}) == 3
    assert a.cache_key(r) == a.cache_key(JudgeRequest(r.prompt, r.response, r.latent_label, "other-trial"))


class CrashingCache(JudgeCache):
    """Raises after ``limit`` writes, like a job killed mid-batch."""

    def __init__(self, root, limit):
        super().__init__(root)
        self.limit = limit

    def put(self, key, result, inputs=None):
        if self.counts.writes >= self.limit:
            raise RuntimeError("simulated crash")
        return super().put(key, result, inputs)


def test_crash_then_rerun_makes_no_repeated_calls(server, tmp_path):
    items = [req(ON, f"#item-{i:02d}-") for i in range(12)]
    judge = http_judge(server, "anthropic", tmp_path, concurrency=2)
    judge.cache = CrashingCache(tmp_path / "cache", limit=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        judge.grade_batch(items)
    cached = [r for r in items if judge.cache_key(r) in judge.cache]
    assert len(cached) == 5
    # the batch cancelled its outstanding requests and closed its connections; a request already written to a
    # socket still reaches the server: wait until the server has served every connection, then count the rerun
    server.wait_idle()
    assert 6 <= len(server.hits) <= 7  # 5 cached + the one whose write crashed + at most one in flight
    server.hits.clear()
    rerun = http_judge(server, "anthropic", tmp_path, concurrency=3)
    results = rerun.grade_batch(items)
    assert all(r.ok for r in results)
    assert rerun.stats.cache_hits == 5 and len(server.hits) == 7
    assert not [h for h in server.hits for r in cached if r.response in h.user]


def test_killed_subprocess_then_rerun(server, tmp_path):
    """A real crash: a grading subprocess is SIGKILLed mid-batch; the rerun calls the server only for the rest."""
    server.delay_s = 0.15
    cfg = {
        "backend": "openai_compat",
        "model": "m",
        "base_url": server.root + "/v1",
        "api_key_env": "ESR_TEST_KEY",
        "cache_dir": str(tmp_path / "cache"),
        "concurrency": 1,
        "rate_limit_per_s": None,
    }
    items = [[f"Explain topic {i}.", f"{ON} #k{i}", "dogs"] for i in range(30)]
    script = textwrap.dedent("""
        import json, sys
        from esr.judge import build_judge, JudgeRequest
        judge = build_judge(json.loads(sys.argv[1]), show_progress=False)
        judge.grade_batch([JudgeRequest(*x) for x in json.loads(sys.argv[2])])
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg), json.dumps(items)], env=env)
    cache = JudgeCache(tmp_path / "cache")
    deadline = time.monotonic() + 20
    while len(cache) < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_cached = len(cache)
    assert 4 <= n_cached < 30
    server.delay_s = 0.0
    before = len(server.hits)
    rerun = build_judge(cfg, show_progress=False)
    results = rerun.grade_batch([JudgeRequest(*x) for x in items])
    assert all(r.ok for r in results)
    assert rerun.stats.cache_hits == n_cached
    assert len(server.hits) - before == 30 - n_cached


def test_restart_gate_merges_unsupported_boundaries(server):
    text = "Dogs bark at night. Cats purr all day. Wait, that's not right. Bread needs flour and yeast #split."
    server.plan = {"#split": ["oversplit", "oversplit"]}
    plain = http_judge(server, "anthropic").grade("Explain how to bake bread.", text, "dogs")
    assert len(plain.attempts) == 4  # paper fidelity: the judge's split is kept
    gated_judge = http_judge(server, "anthropic", restart_gate=True)
    gated = gated_judge.grade("Explain how to bake bread.", text, "dogs")
    assert len(gated.attempts) == 2 and gated.metadata["restart_gate_merges"] == 2
    assert gated.attempts[1].text.startswith("Wait, that's not right.") and gated.scores[-1] == 90
    assert gated_judge.stats.gate_merges == 2
    unsplit = http_judge(server, "anthropic", restart_gate=True).grade("Explain how to bake bread.", RESTART, "dogs")
    assert len(unsplit.attempts) == 2 and unsplit.metadata["restart_gate_merges"] == 0


def test_rate_limit_holds_across_single_calls(server):
    judge = http_judge(server, "anthropic", rate_limit_per_s=10)
    t0 = time.monotonic()
    for i in range(3):
        judge.grade("p", f"{ON} #single{i}", "dogs")
    assert time.monotonic() - t0 >= 0.2 - 0.01


def test_rate_limit_spaces_calls(server):
    judge = http_judge(server, "openai_compat", rate_limit_per_s=20, concurrency=4)
    t0 = time.monotonic()
    judge.grade_batch([req(ON, f"#rl{i}") for i in range(6)])
    assert time.monotonic() - t0 >= 5 / 20 - 0.01


def test_missing_key_is_a_config_error(server, monkeypatch):
    monkeypatch.delenv("ESR_TEST_KEY")
    judge = http_judge(server, "anthropic")
    with pytest.raises(RuntimeError, match="ESR_TEST_KEY"):
        judge.grade("p", "r", "l")
    assert not server.hits
    # OpenAI-compatible local servers may need no key: no Authorization header is sent
    assert http_judge(server, "openai_compat").grade("p", ON, "l").ok
    assert "authorization" not in server.hits[-1].headers


def test_secrets_never_reach_disk_or_logs(server, tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    server.plan = {"#echo": ["401echo"], "#retry": ["429:0.01", "500"]}
    results_dir = tmp_path / "results"
    for backend in ("anthropic", "openai_compat"):
        judge = http_judge(server, backend, tmp_path)
        with pytest.raises(JudgeAuthError, match="ESR_TEST_KEY") as info:  # a refused key stops the run
            judge.grade_batch([req(ON, "#echo"), req(RESTART)])
        assert "<redacted>" in str(info.value) and KEY not in str(info.value)
        (tmp_path / f"{backend}-error.txt").write_text(str(info.value))
        res = judge.grade_batch([req(ON, "#retry"), req(RESTART)])
        write_json(
            results_dir / f"{backend}.json",
            {"judge": judge.describe(), "stats": judge.stats.as_dict(), "results": [r.to_dict() for r in res]},
        )
        grader = LLMConcretenessGrader(judge.chat, cache=judge.cache, show_progress=False)
        grader.grade_labels(["dogs and puppies"])
        server.plan = {"#echo": ["401echo"], "#retry": ["429:0.01", "500"]}
        server._seen.clear()
    assert any(KEY in f"{h.headers.get('x-api-key')} {h.headers.get('authorization')}" for h in server.hits)
    out = capsys.readouterr()
    blobs = [caplog.text, out.out, out.err]
    blobs += [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert caplog.text  # retries were logged
    assert not [b for b in blobs if KEY in b]


def test_concreteness_llm_grader(server, tmp_path):
    server.plan = {"bad batch": ["malformed"] * 10}
    cfg = {
        "backend": "anthropic",
        "model": "m",
        "base_url": server.root,
        "api_key_env": "ESR_TEST_KEY",
        "batch_size": 2,
        "max_parse_retries": 1,
        "backoff_base_s": 0.0,
        "rate_limit_per_s": None,
        "cache_dir": str(tmp_path / "c"),
    }
    grader = build_concreteness_grader(cfg, show_progress=False)
    labels = ["dog breeds", "the assistant asks for clarification", "dog breeds", "bad batch one", "x"]
    scores = grader.grade_labels(labels)
    assert [s.label for s in scores] == labels
    assert scores[0].score == 90 and scores[1].score == 10 and scores[2] is scores[0]
    assert scores[3].failed_closed and scores[3].score == 0.0 and scores[4].failed_closed
    assert grader.stats.failed_closed == 2 and grader.stats.failed_batches == 1
    assert grader.select(labels) == ["dog breeds", "dog breeds"]
    # fail_mode=error gives None, still counted
    errs = build_concreteness_grader({**cfg, "fail_mode": "error", "cache_dir": None}, show_progress=False)
    out = errs.grade_labels(["bad batch two"])
    assert out[0].score is None and out[0].error and errs.stats.errors == 1
