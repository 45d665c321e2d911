"""Judge units without a server or model: parsing, restart segmentation, the restart gate, cache, fake judge,
config factory + schema, WordNet concreteness heuristic."""

from __future__ import annotations

import threading
from pathlib import Path

import jsonschema
import pytest

from esr.config import load_schema
from esr.judge import (
    JudgeCache,
    JudgeRequest,
    MalformedJudgeOutput,
    build_concreteness_grader,
    build_judge,
    find_restarts,
    parse_attempts,
    restart_gate,
    split_attempts,
)
from esr.judge.base import Attempt
from esr.judge.fake import FakeJudge
from esr.judge.http_backends import LLMJudge
from esr.judge.parsing import extract_json_block, parse_concreteness
from esr.judge.prompts import JUDGE_INSTRUCTIONS, judge_messages

ON = "To bake bread, mix flour, water, yeast and salt, knead, let it rise, shape and bake at 220 C."
OFF = "Dogs are loyal animals that bark at the mailman and love long walks in the park."


# ------------------------------------------------------------------------------------------------------- parsing
def test_parse_good_and_last_block():
    text = (
        'Thinking... <json>{"attempts": []}</json> final: '
        '<json>{"attempts": [{"attempt_text": "a b", "score": 55}]}</json>'
    )
    assert parse_attempts(text) == [Attempt("a b", 55.0)]
    assert parse_attempts('<json>```json\n{"attempts": []}\n```</json>') == []
    assert parse_attempts('no tags {"attempts": [{"attempt_text": "x", "score": 0}]} bye') == [Attempt("x", 0.0)]


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("no json here", "no <json>"),
        ('<json>{"attempts": [{"attempt_text": "x", "score": }]}</json>', "invalid JSON"),
        ('<json>{"verdict": 3}</json>', 'no "attempts"'),
        ('<json>{"attempts": {"a": 1}}</json>', "not a list"),
        ('<json>{"attempts": [{"attempt_text": "  ", "score": 3}]}</json>', "empty"),
        ('<json>{"attempts": [{"attempt_text": "x", "score": "90"}]}</json>', "not a number"),
        ('<json>{"attempts": [{"attempt_text": "x", "score": true}]}</json>', "not a number"),
        ('<json>{"attempts": [{"attempt_text": "x", "score": 101}]}</json>', "outside 0-100"),
        ('<json>{"attempts": [{"attempt_text": "x", "score": -1}]}</json>', "outside 0-100"),
        ('<json>{"attempts": [{"attempt_text": "x"}]}</json>', "not a number"),
    ],
)
def test_parse_rejects(text, why):
    with pytest.raises(MalformedJudgeOutput, match=why):
        parse_attempts(text)


def test_parse_concreteness():
    reply = '```json\n[{"label": "b", "rating": 20}, {"label": "a", "justification": "j", "rating": 80}]\n```'
    out = parse_concreteness(reply, ["a", "b"])
    assert [(r.label, r.rating) for r in out] == [("a", 80.0), ("b", 20.0)] and out[0].reason == "j"
    with pytest.raises(MalformedJudgeOutput):
        parse_concreteness('[{"label": "a", "rating": 80}]', ["a", "b"])
    with pytest.raises(MalformedJudgeOutput):
        parse_concreteness('[{"label": "a", "rating": 800}]', ["a"])
    assert extract_json_block('x {"a": 1} y') == {"a": 1}


def test_scrub_only_real_keys():
    from esr.judge.http_backends import scrub

    assert scrub("max x", "x") == "max x"
    assert scrub("key sk-abcdef123456 end", "sk-abcdef123456") == "key <redacted> end" and scrub(None, "k") is None


def test_prompt_is_ours_and_complete():
    system, user = judge_messages("P?", "R.", "dogs")
    assert user.startswith(JUDGE_INSTRUCTIONS) and "User's question: P?" in user and user.endswith("concept: dogs")
    assert "<json>" in user and "restart" in user and system


# ------------------------------------------------------------------------------------------------- segmentation
def test_split_attempts():
    assert split_attempts(ON) == [ON]
    assert split_attempts("") == []
    pieces = split_attempts(f"{OFF} Wait, that's not right. Let me start over. {ON}")
    assert pieces == [OFF, f"Wait, that's not right. Let me start over. {ON}"]
    assert len(find_restarts(f"{OFF} Wait, that\u2019s not right! Let me start over. {ON}")) == 1
    three = split_attempts(f"{OFF} Sorry, I got off track. Cats purr all day long. Let me try again. {ON}")
    assert len(three) == 3
    # leading restart words and short fragments do not make attempts of their own
    assert split_attempts(f"Let me try again. {ON}") == [f"Let me try again. {ON}"]
    assert len(split_attempts(f"{ON} Wait, that's not right.")) == 1
    # elaboration is not a restart
    assert len(split_attempts(f"{ON} Actually, the dough should rest. Then try again tomorrow.")) == 1


def test_restart_gate():
    response = f"{OFF} Wait, that's not right. {ON}"
    judge_split = [Attempt(OFF, 5), Attempt("Wait, that's not right. " + ON, 95)]
    assert restart_gate(response, judge_split) == (judge_split, 0)
    # the judge's boundary without the restart words in its texts is still found in the response
    stripped = [Attempt(OFF, 5), Attempt(ON, 95)]
    assert restart_gate(response, stripped)[1] == 0
    # a boundary with no restart language is merged (length-weighted score)
    no_restart = f"{OFF} {ON}"
    merged, n = restart_gate(no_restart, [Attempt(OFF, 0), Attempt(ON, 100)])
    assert n == 1 and len(merged) == 1 and merged[0].text == no_restart
    assert 40 < merged[0].score < 60
    # three judge attempts, only the second boundary is real
    resp3 = f"{OFF} Cats purr. Wait, that's not right. {ON}"
    gated, n = restart_gate(resp3, [Attempt(OFF, 0), Attempt("Cats purr.", 0), Attempt(ON, 100)])
    assert n == 1 and [a.score for a in gated] == [0, 100]


# ------------------------------------------------------------------------------------------------------- cache
def test_cache_concurrent_writers(tmp_path):
    cache = JudgeCache(tmp_path)
    errors = []

    def writer(n):
        try:
            for i in range(30):
                cache.put(f"{i:064x}", {"n": n, "i": i})
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(cache) == 30
    assert cache.get(f"{7:064x}")["i"] == 7 and cache.get("ff" * 32) is None
    assert cache.counts.hits == 1 and cache.counts.misses == 1
    assert not list(Path(tmp_path).rglob("*.tmp"))


def test_fake_judge_and_cache(tmp_path):
    judge = FakeJudge(cache=JudgeCache(tmp_path))
    reqs = [
        JudgeRequest("Bake bread?", f"{OFF} Let me start over. {ON}", "dogs", "t1"),
        JudgeRequest("Bake bread?", ON, "dogs", "t2"),
        JudgeRequest("Bake bread?", "<<FAIL>>", "dogs", "t3"),
    ]
    out = judge.grade_batch(reqs)
    assert [a.score for a in out[0].attempts] == [0.0, 100.0] and out[1].scores == [100.0]
    assert out[2].error_kind == "parse" and out[0].trial_id == "t1"
    again = FakeJudge(cache=JudgeCache(tmp_path)).grade_batch(reqs)
    assert [r.cached for r in again] == [True, True, True] and again[1].trial_id == "t2"


# ------------------------------------------------------------------------------------------------- factory
def test_judge_blocks_live_in_the_config_schema_and_reject_secrets():
    defs = load_schema()["$defs"]
    for name in ("judge", "concreteness"):
        jsonschema.Draft202012Validator.check_schema(defs[name])
    JUDGE_CONFIG_SCHEMA = defs["judge"]
    jsonschema.validate(
        {
            "backend": "anthropic",
            "model": "claude-haiku-4-5-20251001",
            "temperature": 0.0,
            "max_tokens": 2048,
            "concurrency": 4,
            "rate_limit_per_s": 3,
            "timeout_s": 120,
            "max_retries": 4,
            "restart_gate": False,
            "cache_dir": "results/judge_cache",
            "base_url": None,
            "api_key_env": "ANTHROPIC_API_KEY",
        },
        JUDGE_CONFIG_SCHEMA,
    )
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"backend": "anthropic", "api_key": "sk-x"}, JUDGE_CONFIG_SCHEMA)


def test_build_judge_backends(tmp_path):
    paper = build_judge({"backend": "anthropic", "cache_dir": None})
    assert isinstance(paper, LLMJudge) and paper.judge_id == "anthropic:claude-haiku-4-5-20251001"
    assert paper.chat.settings.api_key_env == "ANTHROPIC_API_KEY" and paper.chat.settings.rate_limit_per_s == 3
    local = build_judge(
        {
            "backend": "openai_compat",
            "model": "qwen",
            "base_url": "http://127.0.0.1:8000/v1",
            "cache_dir": str(tmp_path),
        }
    )
    assert local.judge_id == "openai_compat:qwen" and local.cache is not None
    offline = build_judge({"backend": "offline_minilm", "cache_dir": None})
    assert offline.judge_id == "offline-minilm-relevance (approximation)" and offline.describe()["approximation"]
    assert build_judge({"backend": "fake", "cache_dir": None}).backend == "fake"
    with pytest.raises(ValueError, match="model"):
        build_judge({"backend": "openai_compat"})
    with pytest.raises(ValueError, match="unknown key"):
        build_judge({"backend": "anthropic", "api_key": "sk-x"})


# ----------------------------------------------------------------------------------------------- concreteness
@pytest.fixture(scope="module")
def wordnet_grader():
    if not Path("/usr/share/wordnet/index.noun").is_file():
        pytest.skip("wordnet-base not installed")
    return build_concreteness_grader({"backend": "wordnet"})


@pytest.mark.parametrize(
    "label, concrete",
    [
        ("leg, forearm, knee, calf, thigh, arm", True),
        ("beer, coffee, drink, cup", True),
        ("sodium, copper, calcium, nickel, magnesium", True),
        ("Japan, Switzerland, Britain, Norway, Denmark, Thailand", True),
        ("references to dogs and puppies", True),
        ("the assistant needs clarification from the user", False),
        ("if", False),
        ("for, that, /, basis, of", False),
        ("1, ., 2, 7, 4", False),
        ("erm, spherical, Ferm, philos, rab", False),
        ("pret, Leh, administrative, managed", False),
        ("middle, Middle", False),
        ("etc, forth", False),  # "forth" is a noun only as the River Forth; SemCor has it only as an adverb
        ("until, till", False),
        ("shoes, boots", True),
        ("which, to, boundary, will, can, a", False),  # a function-word latent with one concrete noun
        (
            "that, as, system",
            False,
        ),  # "shoes" is listed itself ("in his shoes"): the better-attested base form "shoe" wins
    ],
)
def test_wordnet_concreteness(wordnet_grader, label, concrete):
    score = wordnet_grader.grade_labels([label])[0]
    assert score.approximation and score.grader_id.endswith("(approximation)")
    assert score.passes() is concrete, (label, score.score, score.details)


# ------------------------------------------------------------------------------- verdict extraction (the kind)
GOOD = '{"attempts": [{"attempt_text": "Mix flour and water, then bake.", "score": 80}]}'
DRAFT = '{"attempts": [{"attempt_text": "draft", "score": 5}]}'


@pytest.mark.parametrize(
    "reply",
    [
        f"I put the verdict in <json> tags below.\n<json>{GOOD}</json>",  # the example
        f"Reasoning: the answer uses {{braces}} and a set {{1, 2}}.\n<json>{GOOD}</json>",
        f"The tags are <json> and </json>; here it is: <json>{GOOD}</json>",
        f"<json>\n```json\n{GOOD}\n```\n</json>",
        f"```json\n{GOOD}\n```",
        f'Thoughts... {{"attempts": "not a list"}} then the real one <json>{GOOD}</json>',
        f'<json>{{"attempts": [{{"attempt_text": "x", "score": 150}}]}}</json> fixed: <json>{GOOD}</json>',
        f"<json>{GOOD}</json>\nHope this helps! (score range is {{0..100}})",
        f"Stray </json> and <json> tags, then <JSON>{GOOD}</JSON>",
        f"No tags at all: {GOOD} - done.",
        f"An untagged draft {DRAFT} and the tagged verdict <json>{GOOD}</json>",
    ],
)
def test_verdict_found_whatever_the_prose_around_it(reply):
    assert parse_attempts(reply) == [Attempt("Mix flour and water, then bake.", 80.0)]


def test_block_choice_first_or_last():
    reply = f"<json>{DRAFT}</json> on reflection: <json>{GOOD}</json>"
    assert parse_attempts(reply)[0].score == 80.0
    assert parse_attempts(reply, block="last")[0].score == 80.0
    assert parse_attempts(reply, block="first")[0].score == 5.0
    with pytest.raises(ValueError, match="block"):
        parse_attempts(reply, block="middle")


def test_concreteness_reply_with_prose_brackets():
    reply = 'Ratings [as asked]:\n[{"label": "a", "rating": 80}] and [note] [{"label": "a", "rating": 60}]'
    assert parse_concreteness(reply, ["a"])[0].rating == 60.0
    assert parse_concreteness(reply, ["a"], block="first")[0].rating == 80.0


# ------------------------------------------------------------------------------------------ cache key audit
def _changed(value):
    """Another value of the same kind (used to perturb every settings field)."""
    if isinstance(value, bool):
        return not value
    if value is None:
        return 0.25
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, dict):
        return {**value, "x-extra": "1"}
    raise TypeError(type(value))


def _judges():
    from esr.judge.offline import OfflineMiniLMJudge

    llm = build_judge({"backend": "anthropic", "cache_dir": None})
    return {"llm": llm, "offline": OfflineMiniLMJudge(encoder=object()), "fake": FakeJudge()}


@pytest.mark.parametrize("kind", ["llm", "offline", "fake"])
def test_every_settings_field_is_in_the_cache_key_unless_marked(kind):
    """Enumerates the settings dataclass (recursively): changing any field changes the key, except fields marked
    not_in_key (with a reason). A field added later is covered automatically."""
    import copy
    import dataclasses

    from esr.judge.settings import in_key

    def replace(obj, name, value):  # like dataclasses.replace, without the value checks of __post_init__
        new = copy.copy(obj)
        object.__setattr__(new, name, value)
        return new

    judge = _judges()[kind]
    request = JudgeRequest("p", "r", "l")
    base = judge.cache_key(request)
    checked = 0

    def walk(obj, rebuild):
        nonlocal checked
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, lambda new, f=f: rebuild(replace(obj, f.name, new)))
                continue
            judge.settings = rebuild(replace(obj, f.name, _changed(value)))
            changed = judge.cache_key(request) != base
            assert changed == in_key(f), (kind, f.name, "in key" if in_key(f) else "marked not_in_key")
            checked += 1

    original = judge.settings
    try:
        walk(original, lambda new: new)
    finally:
        judge.settings = original
    assert checked >= 5 and judge.cache_key(request) == base


def test_llm_judge_runs_from_the_settings_it_is_keyed_on():
    judge = build_judge(
        {
            "backend": "openai_compat",
            "model": "m",
            "temperature": 0.3,
            "max_tokens": 99,
            "json_block": "first",
            "reask_temperature": 0.9,
            "restart_gate": True,
            "max_parse_retries": 1,
            "cache_dir": None,
        }
    )
    s = judge.settings
    assert judge.chat.settings is s.chat and (s.chat.temperature, s.chat.max_tokens) == (0.3, 99)
    assert (s.json_block, s.reask_temp(), s.restart_gate, s.max_parse_retries) == ("first", 0.9, True, 1)
    assert s.restart_patterns and judge.cache_identity()["chat"]["base_url"] == "https://api.openai.com/v1"
    assert "api_key_env" not in judge.cache_identity()["chat"]  # a variable name, never the key
    other = build_judge({"backend": "openai_compat", "model": "m", "cache_dir": None, "json_block": "last"})
    assert other.cache_key(JudgeRequest("p", "r", "l")) != judge.cache_key(JudgeRequest("p", "r", "l"))


# ------------------------------------------------------------------------------------------- restart patterns
def test_paper_restart_phrase_with_quite_is_found_without_a_model():
    text = (
        "Tides rise twice a day with the moon. Wait, that's not quite right - I drifted. To plan a party, list guests."
    )
    assert len(split_attempts(text)) == 2
    assert len(split_attempts(f"{ON} Wait, that is not correct. {ON}")) == 2


def test_auto_anchors_resolve_to_the_models_anchor_file_only_for_the_offline_judge():
    from esr.judge.factory import anchors_file, resolved_judge

    offline = {"backend": "offline_minilm", "anchors": "auto"}
    resolved = resolved_judge(offline, "smollm2-135m")
    assert resolved["anchors"] == anchors_file("smollm2-135m") == "results/judge/smollm2-135m/anchors.json"
    assert offline["anchors"] == "auto"  # a copy: the config block is not changed
    api = {"backend": "anthropic", "anchors": "auto"}
    assert resolved_judge(api, "m") == api and resolved_judge(api, "m") is not api
    assert resolved_judge({"backend": "offline_minilm", "anchors": "x.json"}, "m")["anchors"] == "x.json"
