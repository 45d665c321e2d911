"""The generation stage of a tensor-parallel model runs as DeepSpeed ranks under torchrun (CPU, gloo here) and
gives the same answers and activations as the single-process engine."""

import dataclasses

import pandas as pd
import pytest
import torch

from esr.activations import open_store
from esr.config import load_config, model_specs
from esr.distributed import run_stage
from esr.experiments import TrialSpec
from esr.runs import generate_stage
from esr.testing import TINY_PROMPTS, write_tiny_workflow


@pytest.mark.slow
def test_tensor_parallel_generation_matches_single_process(tmp_path):
    cfg = load_config(write_tiny_workflow(tmp_path))
    spec = model_specs(cfg)["tiny-llama"]
    trials = [TrialSpec(trial_id=f"t{i}", experiment="exp1", condition="steered", model=spec.name, latent=3 + i,
                        label="x", boost=4.0, prompt_id=i, prompt=TINY_PROMPTS[i], judge_prompt=TINY_PROMPTS[i],
                        seed=100 + i, ablate=(7,) if i % 2 else ()) for i in range(4)]
    capture = ([1, 2, 7], {"g": [1, 2, 7]})
    single = tmp_path / "single.parquet"
    generate_stage(spec, spec.path, trials, cfg["generation"], single, capture=capture, acts_store=tmp_path / "s.zarr")
    tp_spec = dataclasses.replace(spec, engine="deepspeed", tensor_parallel=2)
    multi = tmp_path / "tp.parquet"
    run_stage("generate_stage", dict(spec=tp_spec, model_dir=spec.path, trials=trials, gen_cfg=cfg["generation"],
                                     out_parquet=multi, capture=capture, acts_store=tmp_path / "tp.zarr"),
              tp_spec.tensor_parallel, scratch_dir=tmp_path)
    a, b = pd.read_parquet(single), pd.read_parquet(multi)
    assert list(a.response) == list(b.response) and list(a.n_tokens) == list(b.n_tokens)
    sa, sb = open_store(tmp_path / "s.zarr"), open_store(tmp_path / "tp.zarr")
    torch.testing.assert_close(torch.from_numpy(sa.acts.values), torch.from_numpy(sb.acts.values), rtol=1e-4,
                               atol=1e-4, equal_nan=True)
