"""DeepSpeed inference engine (AutoTP, tp_size 1, CPU accelerator): same tokens as the plain transformers engine,
and the steering hooks keep working on ``engine.module``. tp_size 2 is exercised by
``tests/benchmarks/ds_tp2_check.py`` under torchrun (not part of the fast test set)."""

from __future__ import annotations

import os

import pytest
import torch

from esr.generation import GenerationSettings, SteeredGenerator, TrialRequest
from esr.models import wrap_model
from esr.sae import SteeringDirections
from esr.steering import Intervention, SteeringPlan
from esr.testing import tiny_gemma2, tiny_llama, tiny_sae, tiny_tokenizer

torch.set_num_threads(1)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytest.importorskip("deepspeed")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_deepspeed_tp1_matches_plain_engine(family):
    tok = tiny_tokenizer()
    build = tiny_llama if family == "llama" else tiny_gemma2
    directions = SteeringDirections(tiny_sae(kind="jumprelu"), "raw")
    plan = SteeringPlan(2, 2)
    settings = GenerationSettings(temperature=0.0, max_new_tokens=8)
    requests = [
        TrialRequest("how do you bake bread", 1, Intervention(steer_latent=5, boost=40.0, capture=(5,))),
        TrialRequest("the dog", 2, None),
        TrialRequest("explain the car tire", 3, Intervention(ablate=(1, 2))),
    ]
    plain = SteeredGenerator(
        wrap_model(build(vocab_size=len(tok)), tok, device="cpu"), directions, plan, settings, progress=False
    ).generate(requests)
    ds_loaded = wrap_model(build(vocab_size=len(tok)), tok, dtype="float32", engine="deepspeed", tp_size=1)
    assert ds_loaded.engine == "deepspeed" and ds_loaded.ds_engine is not None
    ds = SteeredGenerator(ds_loaded, directions, plan, settings, progress=False).generate(requests)
    assert [r.token_ids for r in ds] == [r.token_ids for r in plain]
    torch.testing.assert_close(ds[0].activations, plain[0].activations, atol=1e-5, rtol=1e-5)
    assert ds[0].settings["engine"] == "deepspeed"
    # steering really acts through the engine
    unsteered = SteeredGenerator(ds_loaded, directions, plan, settings, progress=False).generate(
        [TrialRequest("how do you bake bread", 1, None)]
    )
    assert unsteered[0].token_ids != ds[0].token_ids
