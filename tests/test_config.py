import copy

import pytest
import yaml

from esr.config import ConfigError, load_config, model_specs, validate_config


@pytest.fixture
def embedded(repo_root):
    return yaml.safe_load((repo_root / "config/config.yaml").read_text())


@pytest.fixture
def paper(repo_root):
    return yaml.safe_load((repo_root / "config/paper.yaml").read_text())


def test_both_configs_validate_and_fill_defaults(embedded, paper):
    validate_config(embedded)
    validate_config(paper)
    assert embedded["models"]["smollm2-135m"]["resources"]["gpu"] == 0
    assert set(paper["models"]) == {"llama-3.3-70b", "llama-3.1-8b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b"}


def test_paper_registry_layers_and_saes(repo_root):
    specs = model_specs(load_config(repo_root / "config/paper.yaml"))
    assert (specs["llama-3.3-70b"].injection_layer, specs["llama-3.3-70b"].sae_layer) == (33, 50)
    assert (specs["llama-3.1-8b"].injection_layer, specs["llama-3.1-8b"].sae_layer) == (12, 19)
    assert {m: s.sae_layer for m, s in specs.items() if s.family == "gemma2"} == {
        "gemma-2-2b": 16,
        "gemma-2-9b": 26,
        "gemma-2-27b": 22,
    }
    assert specs["gemma-2-27b"].sae.sae_id == "layer_22/width_131k/canonical"
    assert specs["llama-3.3-70b"].sae.release == "goodfire-llama-3.3-70b-instruct"
    assert all(len(s.revision) == 40 for s in specs.values())
    assert specs["llama-3.3-70b"].engine == "deepspeed" and specs["llama-3.3-70b"].tensor_parallel > 1


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda c: c["models"]["smollm2-135m"].update(injection_layr=3), "models.smollm2-135m.injection_layr"),
        (lambda c: c["models"]["smollm2-135m"].update(sae_layer=30), "models.smollm2-135m.sae_layer"),
        (lambda c: c["models"]["smollm2-135m"].update(dtype="fp32"), "models.smollm2-135m.dtype"),
        (lambda c: c["models"]["smollm2-135m"]["boost"].update(lower=2.0), "models.smollm2-135m.boost"),
        (lambda c: c.update(sede=1), "sede"),
        (lambda c: c["prompts"].update(source="url"), "prompts.url"),
        (lambda c: c["models"]["smollm2-135m"]["sae"].update(path="elsewhere"), "models.smollm2-135m.sae.path"),
        (lambda c: c["embedded_sae"].update(k="many"), "embedded_sae.k"),
    ],
)
def test_bad_values_name_the_key(embedded, mutate, key):
    cfg = copy.deepcopy(embedded)
    mutate(cfg)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_hub_models_need_a_pinned_commit(paper):
    cfg = copy.deepcopy(paper)
    cfg["models"]["gemma-2-2b"]["revision"] = "main"
    with pytest.raises(ConfigError, match=r"models\.gemma-2-2b\.revision"):
        validate_config(cfg)


def test_tensor_parallel_needs_a_gpu_per_rank(paper):
    cfg = copy.deepcopy(paper)
    cfg["models"]["llama-3.3-70b"]["resources"]["gpu"] = cfg["models"]["llama-3.3-70b"]["tensor_parallel"] - 1
    with pytest.raises(ConfigError, match=r"models\.llama-3\.3-70b\.resources\.gpu"):
        validate_config(cfg)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_renamed_keys_still_work_with_a_deprecation_warning(repo_root):
    import warnings

    import yaml

    from esr.config import ConfigError, validate_config

    cfg = yaml.safe_load((repo_root / "config/config.yaml").read_text())
    cfg["calibration_judge"] = cfg.pop("threshold_judge")
    cfg["calibration_judge"]["calibration"] = cfg["calibration_judge"].pop("anchors")
    cfg["judge"]["calibration"] = cfg["judge"].pop("anchors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = validate_config(cfg)
    assert out["threshold_judge"]["anchors"] == "auto" and out["judge"]["anchors"] == "auto"
    assert "calibration_judge" not in out and "calibration" not in out["judge"]
    messages = " ".join(str(w.message) for w in caught if w.category is DeprecationWarning)
    assert "'calibration_judge' is deprecated: it is now 'threshold_judge'" in messages
    assert "'judge.calibration' is deprecated" in messages
    both = yaml.safe_load((repo_root / "config/config.yaml").read_text())
    both["calibration_judge"] = dict(both["threshold_judge"])
    with pytest.raises(ConfigError, match="old name of 'threshold_judge'"):
        validate_config(both)
