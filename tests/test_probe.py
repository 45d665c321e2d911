"""``esr probe`` and the developer API (issue 13) on a tiny random Llama with a local SAE and its label CSV.

The probe runs the workflow's own stage functions; these tests check what the command adds: the config it builds,
the summary (Wilson intervals recomputed from the trials), the files it writes, resuming (no finished step run
again; after a kill -9 during grading no judge call repeated, with the loopback judge server), clear errors before
any model work, the help text, and the README's commands."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from judge_server import CountingServer, answered_not_stored

import esr
from esr.cli import build_parser, main
from esr.metrics import include_trials, wilson_interval
from esr.testing import write_tiny_probe_inputs

#: The README smoke run's sizes: as options of ``esr.probe`` and as command-line flags.
TINY_OPTIONS = {
    "latents": 3,
    "trials_per_latent": 2,
    "max_new_tokens": 8,
    "sae_train_tokens": 3000,
    "calibration_steps": 3,
}
TINY = [arg for k, v in TINY_OPTIONS.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_tiny_probe_inputs(tmp_path_factory.mktemp("probe-inputs"))


def probe_argv(inputs, out: Path, *extra: str, judge: str = "offline") -> list[str]:
    return [
        "probe",
        str(inputs["model"]),
        "--sae-dir",
        str(inputs["sae"]),
        "--labels",
        str(inputs["labels"]),
        "--judge",
        judge,
        "--out",
        str(out),
        *TINY,
        *extra,
    ]


def _readme_section(title: str) -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return readme.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def test_readme_smoke_run_end_to_end_then_resume_runs_nothing_again(tmp_path, capsys):
    """The README's "Test your own model" section: every ``esr probe`` line parses with the real parser, and its
    smoke-run block (a tiny random model) runs as written; then its outputs are checked and the same probe is
    resumed through the Python API."""
    section = _readme_section("Test your own model")
    probes = [ln.strip() for ln in section.replace("\\\n", " ").splitlines() if ln.strip().startswith("esr probe ")]
    assert len(probes) >= 4
    for line in probes:
        build_parser().parse_args(shlex.split(line)[1:])
    smoke = section.split("```bash smoke", 1)[1].split("```", 1)[0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", smoke], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out, tiny = tmp_path / "probe-tiny", tmp_path / "tiny"

    result = json.loads((out / "probe.json").read_text())
    trials = pd.read_parquet(out / "trials.parquet")
    steered, unsteered = trials[trials.experiment == "exp1"], trials[trials.experiment == "exp8"]
    # the matched baseline: the same latents, prompts and seeds without steering
    assert len(steered) > 0 and len(steered) == len(unsteered) <= 3 * 2
    key = ["latent", "prompt_id", "seed"]
    assert sorted(map(tuple, steered[key].values)) == sorted(map(tuple, unsteered[key].values))
    assert steered.steer.all() and not unsteered.steer.any() and (steered.boost > 0).all()
    # every rate is k of n from the graded trials, with its Wilson 95% interval
    for cond, table in (("steered", steered), ("unsteered", unsteered)):
        inc, _ = include_trials(table.reset_index(drop=True))
        counts = {
            "multi_rate": (int(inc.multi.sum()), len(inc)),
            "esr_rate": (int(inc.esr.sum()), len(inc)),
            "improvement_rate": (int(inc.esr.sum()), int(inc.multi.sum())),
        }
        for metric, (k, n) in counts.items():
            m = result["metrics"][cond][metric]
            assert (m["k"], m["n"]) == (k, n), (cond, metric)
            if n:
                assert m["ci"] == pytest.approx(list(wilson_interval(k, n).as_list())), (cond, metric)
        assert result["metrics"][cond]["first_score"]["estimate"] == pytest.approx(inc.first_score.mean())
    # the paper's values for its five models come from the audit's table
    assert result["paper"]["llama-3.3-70b"]["esr_rate"]["paper_text"] == "3.8%"
    assert set(result["paper"]) == {"llama-3.3-70b", "llama-3.1-8b", "gemma-2-27b", "gemma-2-9b", "gemma-2-2b"}
    assert "ESR rate" in run.stdout and "3.8%" in run.stdout and "Wilson" in run.stdout
    assert 1 <= len(result["transcripts"]) <= 3 and all(t["prompt"] in run.stdout for t in result["transcripts"])
    prov = result["provenance"]
    assert prov["revision"].startswith("local:") and prov["sae"].startswith("local:") and prov["judge"]
    html = (out / "probe.html").read_text()
    assert '<table id="summary">' in html and "data:image/png;base64," in html and "gemma-2-2b (paper)" in html
    assert (out / "dose_response.png").stat().st_size > 1000
    # progress: a line per step with its time
    assert re.search(r"\[\d+/\d+\] calibrate_boosts: [\d.]+ s", run.stderr), run.stderr[-2000:]

    # resumed through the API: every step done earlier (the selection check runs again), nothing regenerated
    before = {p: p.stat().st_mtime_ns for p in out.glob("results/*/*/trials.parquet")}
    res = esr.probe(
        str(tiny / "model"),
        sae_dir=str(tiny / "sae"),
        labels=str(tiny / "labels.csv"),
        out=str(out),
        resume=True,
        **TINY_OPTIONS,
    )
    again = capsys.readouterr().err
    n_steps = int(re.search(r"\[1/(\d+)\]", again).group(1))
    assert again.count("done earlier") == n_steps - 1
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("results/*/*/trials.parquet")}
    assert res.metrics == result["metrics"] and set(res.timings) == {"check_selection"}

    # the same folder without --resume, or with other settings, is refused before any model work
    argv = ["probe", str(tiny / "model"), "--sae-dir", str(tiny / "sae"), "--labels", str(tiny / "labels.csv")]
    argv += ["--out", str(out), *TINY]
    assert main(argv) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume", "--target", "0.4"]) == 2
    assert "config keys that differ: calibration" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--judge", "gpt4"], "--judge 'gpt4': expected offline, anthropic:MODEL"),
        (["--layer", "9"], "--layer 9 is outside the model's 4 decoder blocks"),
        (["--latents", "0"], "--latents 0 must be >= 1"),
        (["--target", "30"], "--target 30.0 must be between 0 and 1"),
        (["--prompts", "/nonexistent/prompts.txt"], "--prompts '/nonexistent/prompts.txt' is not a file"),
    ],
)
def test_bad_input_is_named_before_any_model_work(inputs, tmp_path, capsys, extra, message):
    out = tmp_path / "probe"
    t0 = time.monotonic()
    assert main(probe_argv(inputs, out, *extra)) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - t0 < 20 and not (out / "logs").exists()


def test_an_sae_of_another_layer_stops_the_probe_naming_its_layer(inputs, tmp_path, capsys):
    """The tiny SAE reads block 2 (``blocks.2.hook_resid_post``); steering block 1 with it is refused at once."""
    assert main(probe_argv(inputs, tmp_path / "probe", "--layer", "1")) == 2
    assert "the SAE reads decoder block 2 (blocks.2.hook_resid_post)" in capsys.readouterr().err
    assert "pass --layer 2" in (tmp_path / "probe" / "logs" / "prepare_sae.log").read_text()
    assert not (tmp_path / "probe" / "resources" / "sae" / "model" / "cfg.json").exists()


def test_a_model_that_is_neither_a_folder_nor_in_the_hub_cache(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["probe", "nobody/no-such-model", "--train-sae", "--out", str(tmp_path / "p")]) == 2
    assert "'nobody/no-such-model' (revision main) is not in the local hub cache" in capsys.readouterr().err
    assert main(["probe", "--train-sae", "not a model id"]) == 2


def test_every_option_has_help_and_probe_help_has_examples(capsys):
    parser = build_parser()

    def walk(p, where):
        for action in p._actions:
            if action.dest in ("help", "version"):
                continue
            if hasattr(action, "choices") and isinstance(action.choices, dict):  # subcommands
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{where} {name}")
                continue
            yield where, action

    missing = [f"{w}: {a.option_strings or a.dest}" for w, a in walk(parser, "esr") if not (a.help or "").strip()]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and text.count("esr probe ") >= 3 and "--resume" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"esr {esr.__version__}"


def test_load_model_sae_and_steer(inputs):
    model = esr.load_model(inputs["model"])
    sae = esr.load_sae(sae_dir=inputs["sae"])
    kw = dict(layer=1, seed=3, temperature=0.0, max_new_tokens=6)
    plain = esr.steer(model, sae, "how do you bake bread", latent=None, boost=0.0, **kw)
    zero = esr.steer(model, sae, "how do you bake bread", latent=5, boost=0.0, **kw)
    steered = esr.steer(model, sae, "how do you bake bread", latent=5, boost=40.0, capture=True, **kw)
    assert plain.token_ids == zero.token_ids and plain.token_ids != steered.token_ids
    assert steered.activations.shape == (steered.n_tokens, 1)
    assert steered.steering["steer_residual_norm"] == pytest.approx(
        40.0 * float(sae.W_dec[5].detach().norm()), rel=1e-5
    )
    with pytest.raises(ValueError, match="latent 999 is outside the SAE's 64 latents"):
        esr.steer(model, sae, "x", latent=999, boost=1.0, layer=1)
    with pytest.raises(ValueError, match="injection_layer 7 is outside the model's 4 layers"):
        esr.steer(model, sae, "x", latent=1, boost=1.0, layer=7)


def test_kill_9_during_grading_then_resume_repeats_no_judge_call(tmp_path):
    """A tiny Qwen2 (no family given anywhere: inferred from its config.json, and the workflow config the probe
    builds for it passes the schema); the HTTP judge (OpenAI wire format) on the loopback server; the probe is killed (SIGKILL to its process
    group) once grading has answered a few requests, then rerun with --resume: every request body reaches the
    server once, except those answered but not yet cached at the kill (at most the judge's concurrency)."""
    inputs = write_tiny_probe_inputs(tmp_path / "qwen2", model_type="qwen2")
    assert json.loads((inputs["model"] / "config.json").read_text())["model_type"] == "qwen2"
    server = CountingServer(delay_s=0.3).start()
    try:
        out = tmp_path / "probe"
        judge = f"openai:{server.root}/v1:judge-model"
        cmd = [sys.executable, "-m", "esr.cli", *probe_argv(inputs, out, judge=judge)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "sk-probe-test"}
        with open(tmp_path / "first.out", "w") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        grade_log, start = out / "logs" / "grade_exp1.log", None
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if start is None and grade_log.exists():
                start = len(server.hits)
            if start is not None and len(server.hits) >= start + 3:
                break
            time.sleep(0.01)
        assert start is not None and proc.poll() is None, (tmp_path / "first.out").read_text()[-3000:]
        in_flight = server.snapshot_in_flight()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        server.wait_idle()
        lost = in_flight | answered_not_stored(server.hits, out / "resources" / "judge_cache")
        assert len(lost) <= 4  # the judge's concurrency
        n_first = len(server.hits)

        res = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        repeated = {h: n for h, n in server.counts().items() if n > 1}
        assert set(repeated) <= lost and all(n == 2 for n in repeated.values()), repeated
        assert len(server.hits) > n_first  # the rest of grading was sent in the resumed run
        assert json.loads((out / "probe.json").read_text())["metrics"]["steered"]["multi_rate"]["n"] > 0
        assert "family" not in json.loads((out / "probe_state.json").read_text())["config"]["models"]["model"]
    finally:
        server.stop()
