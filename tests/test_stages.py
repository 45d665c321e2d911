"""The stage layer: every rule has one function of its name in the module of its rule file, every script is one
call, and ``bind_rule`` binds a job's named inputs/outputs/params/wildcards to the function by name."""

import ast
import re
from pathlib import Path

import pytest
from snakemake.iocontainers import Namedlist

from esr import stages
from esr.experiments import REGISTRY
from esr.stages import RuleBindingError, bind_rule
from esr.stages import stats as _stats  # noqa: F401  (loads stages.stats for the registry check)

ROOT = Path(__file__).resolve().parents[1]
RULES = {
    m.group(1): smk.stem
    for smk in (ROOT / "workflow/rules").glob("*.smk")
    for m in re.finditer(r"^rule (\w+):", smk.read_text(), re.M)
}


def test_every_rule_calls_the_function_of_its_name_in_its_rule_files_module():
    import importlib

    assert len(RULES) >= 25
    for rule, module in RULES.items():
        script = (ROOT / "workflow/rules" / f"{module}.smk").read_text()
        block = script[script.index(f"rule {rule}:") :]
        assert f'"../scripts/{rule}.py"' in block.split("\nrule ")[0], rule
        fn = getattr(importlib.import_module(f"esr.stages.{module}"), rule)
        assert fn.__name__ == rule and fn.__module__ == f"esr.stages.{module}"
        # the script is the one call run_rule(<rule function>, snakemake)
        tree = ast.parse((ROOT / "workflow/scripts" / f"{rule}.py").read_text())
        calls = [n for n in tree.body if isinstance(n, ast.Expr)]
        assert len(calls) == 2 and ast.unparse(calls[1]) == f"run_rule({rule}, snakemake)", rule


def test_no_stage_is_found_through_a_string():
    text = "\n".join(p.read_text() for p in [*(ROOT / "src").rglob("*.py"), *(ROOT / "workflow").rglob("*.py")])
    assert "import_module" not in text and 'run_stage("' not in text
    assert not (ROOT / "src/esr/runs.py").exists() and not (ROOT / "src/esr/stages.py").exists()


def _job(rule="r", output=None, input=None, params=None, wildcards=None):
    class Job:
        pass

    job = Job()
    job.rule = rule
    for kind, values in (("output", output), ("input", input), ("params", params), ("wildcards", wildcards)):
        nl = Namedlist()
        for name, value in (values or {}).items():
            if isinstance(value, list):
                start = len(nl)
                nl.extend(value)
                nl._set_name(name, start, len(nl))
            else:
                nl.append(value)
                nl._set_name(name, len(nl) - 1)
        setattr(job, kind, nl)
    return job


def stage_fn(*, model: str, shard: int, shards: list[str], settings: dict, out: str, optional: str = "x"):
    return locals()


def test_bind_rule_binds_by_name_and_converts():
    job = _job(
        output={"out": "o.json"},
        input={"shards": ["a", "b"], "dep": "d"},
        params={"settings": {"k": 1}},
        wildcards={"model": "m", "shard": "3"},
    )
    kw = bind_rule(stage_fn, job)
    assert kw == {"model": "m", "shard": 3, "shards": ["a", "b"], "settings": {"k": 1}, "out": "o.json"}
    assert type(kw["shards"]) is list and stage_fn(**kw)["optional"] == "x"


def test_bind_rule_errors_name_the_rule_and_the_parameter():
    with pytest.raises(RuleBindingError, match="rule r: .*stage_fn needs 'settings'"):
        bind_rule(stage_fn, _job(output={"out": "o"}, input={"shards": []}, wildcards={"model": "m", "shard": "1"}))
    with pytest.raises(RuleBindingError, match="rule r: params 'extra' is not a parameter"):
        bind_rule(
            stage_fn,
            _job(
                output={"out": "o"},
                input={"shards": []},
                params={"settings": {}, "extra": 1},
                wildcards={"model": "m", "shard": "1"},
            ),
        )
    with pytest.raises(RuleBindingError, match="'out' is named in both output and input"):
        bind_rule(
            stage_fn,
            _job(
                output={"out": "o"},
                input={"out": "i", "shards": []},
                params={"settings": {}},
                wildcards={"model": "m", "shard": "1"},
            ),
        )


def test_bind_rule_gives_unclaimed_named_inputs_to_var_keywords():
    def fig(*, model, figure, **trials):
        return trials

    job = _job(output={"figure": "f.png"}, input={"exp1": "e1.parquet", "exp3": "e3.parquet"}, wildcards={"model": "m"})
    assert fig(**bind_rule(fig, job)) == {"exp1": "e1.parquet", "exp3": "e3.parquet"}


def test_model_stage_signature_is_the_functions():
    import inspect

    from esr.stages.experiments import generate

    assert "experiment" in inspect.signature(generate).parameters
    assert generate.__wrapped__.__name__ == "generate"


def test_registry_entries_are_complete():
    for name, exp in REGISTRY.items():
        assert exp.name == name and exp.description
        assert (exp.plan is not None) == (exp.made_by == "generate"), name
        assert exp.summary in (None, "trials", "cross_judge")
    assert [n for n, e in REGISTRY.items() if e.capture] == ["exp1"]
    assert set(stages.stats.SUMMARISERS) == {e.summary for e in REGISTRY.values() if e.summary}
