"""Steering / ablation / capture hooks on tiny fp32 Llama and Gemma-2 models with jumprelu and standard SAEs."""

from __future__ import annotations

import pytest
import torch

from esr.sae import SteeringDirections
from esr.steering import BatchInterventions, Intervention, SteeringPlan, apply_interventions, steer_rows
from esr.testing import tiny_gemma2, tiny_llama, tiny_sae

from helpers import forward_recording

torch.set_num_threads(1)

LAYER = 2
IDS = torch.tensor([[0, 0, 1, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18], [0, 0, 0, 1, 20, 21, 22, 23]])
MASK = (torch.arange(IDS.shape[1])[None, :] >= (IDS == 0).sum(1, keepdim=True)).long()


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request):
    return (tiny_llama if request.param == "llama" else tiny_gemma2)()


@pytest.fixture(scope="module", params=["jumprelu", "standard"])
def directions(request):
    return SteeringDirections(tiny_sae(kind=request.param, layer=LAYER), "raw")


def forward(model, record_layer: int = LAYER):
    return forward_recording(model, IDS, MASK, record_layer)


def with_interventions(model, interventions, directions, plan=None):
    plan = plan or SteeringPlan(injection_layer=LAYER, sae_layer=LAYER)
    with apply_interventions(model, interventions, directions, plan) as hooks:
        logits, h = forward(model, plan.injection_layer)
    return logits, h, hooks


def manual_add(model, layer: int, delta: torch.Tensor):
    """Independent reference: a plain hook adding ``delta`` [B, T, D] to layer ``layer``'s output."""

    def hook(m, a, o):
        return (o[0] + delta,) + tuple(o[1:]) if isinstance(o, tuple) else o + delta

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        return forward(model)
    finally:
        handle.remove()


def test_steer_changes_layer_output_by_expected_delta(model, directions):
    base_logits, base_h = forward(model)
    latent, boost = 5, 4.0
    ivs = [Intervention(steer_latent=latent, boost=boost), None, None]
    logits, h, _ = with_interventions(model, ivs, directions)
    expected = boost * directions.sae.W_dec[latent].detach()
    torch.testing.assert_close(h[0] - base_h[0], expected.expand_as(h[0]), atol=1e-5, rtol=0)
    assert torch.equal(h[1:], base_h[1:])
    delta = torch.zeros_like(base_h)
    delta[0] = expected
    ref_logits, _ = manual_add(model, LAYER, delta)
    assert torch.equal(logits, ref_logits)
    assert not torch.allclose(logits[0], base_logits[0])
    assert torch.equal(logits[1:], base_logits[1:])


def test_ablation_removes_exactly_the_latent_contribution(model, directions):
    sae = directions.sae
    _, base_h = forward(model)
    with torch.no_grad():
        f = sae.encode(base_h)
    active = f[1].amax(0).topk(3).indices.tolist()  # latents that fire on row 1
    assert f[1][:, active].abs().sum() > 0
    ivs = [None, Intervention(ablate=tuple(active)), None]
    logits, h, _ = with_interventions(model, ivs, directions)
    with torch.no_grad():
        removed = f[1][:, active] @ sae.W_dec[active]
    torch.testing.assert_close(h[1], base_h[1] - removed, atol=1e-5, rtol=0)
    assert torch.equal(h[[0, 2]], base_h[[0, 2]])
    # after ablation the ablated latents no longer reconstruct: the error term is kept, so re-encoding is not
    # required to be zero, but the removed vector is exactly f_j * W_dec[j]
    delta = torch.zeros_like(base_h)
    delta[1] = -removed
    ref_logits, _ = manual_add(model, LAYER, delta)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


def test_ablation_uses_pre_steering_activations(model, directions):
    sae = directions.sae
    _, base_h = forward(model)
    with torch.no_grad():
        f = sae.encode(base_h)
    latent = 5
    ivs = [Intervention(steer_latent=latent, boost=3.0, ablate=(latent,)), None, None]
    _, h, _ = with_interventions(model, ivs, directions)
    with torch.no_grad():
        expected = base_h[0] - f[0][:, [latent]] @ sae.W_dec[[latent]] + 3.0 * sae.W_dec[latent]
    torch.testing.assert_close(h[0], expected, atol=1e-5, rtol=0)


def test_capture_equals_independent_forward(model, directions):
    sae = directions.sae
    capture = (3, 9, 1)
    ivs = [Intervention(capture=capture), None, Intervention(capture=(9,))]
    with apply_interventions(model, ivs, directions, SteeringPlan(LAYER, LAYER)) as hooks:
        forward(model)
    with torch.no_grad():
        pos = (MASK.cumsum(-1) - 1).clamp(min=0)
        hs = model(input_ids=IDS, attention_mask=MASK, position_ids=pos, output_hidden_states=True).hidden_states
        f = sae.encode(hs[LAYER + 1])
    got = hooks.captured[0]
    cols = hooks.batch.capture_columns
    torch.testing.assert_close(got[0][:, cols[0]], f[0][:, list(capture)], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2][:, cols[2]], f[2][:, [9]], atol=1e-5, rtol=0)
    assert cols[1] == []


def test_capture_at_other_layer_sees_steering(model, directions):
    sae = directions.sae
    plan = SteeringPlan(injection_layer=1, sae_layer=LAYER)
    ivs = [Intervention(steer_latent=4, boost=5.0, capture=(4,)), None, None]
    with apply_interventions(model, ivs, directions, plan) as hooks:
        _, h_sae = forward(model, LAYER)
    with torch.no_grad():
        expected = sae.encode(h_sae[0])[:, [4]]
    torch.testing.assert_close(hooks.captured[0][0][:, hooks.batch.capture_columns[0]], expected, atol=1e-5, rtol=0)


def test_interventions_do_not_leak_across_rows(model, directions):
    base_logits, base_h = forward(model)
    ivs = [Intervention(steer_latent=7, boost=6.0), Intervention(ablate=(1, 2, 3, 4)), None]
    logits, h, _ = with_interventions(model, ivs, directions)
    assert torch.equal(h[2], base_h[2]) and torch.equal(logits[2], base_logits[2])
    # row 0 steered alone gives the same as row 0 in the mixed batch
    logits0, h0, _ = with_interventions(model, [ivs[0], None, None], directions)
    assert torch.equal(h0[0], h[0])
    torch.testing.assert_close(logits0[0], logits[0], atol=1e-6, rtol=0)


def test_generated_positions_only_steers_last_prompt_position(model, directions):
    _, base_h = forward(model)
    plan = SteeringPlan(LAYER, LAYER, positions="generated")
    _, h, _ = with_interventions(model, [Intervention(steer_latent=5, boost=2.0), None, None], directions, plan)
    assert torch.equal(h[0, :-1], base_h[0, :-1])
    torch.testing.assert_close(h[0, -1] - base_h[0, -1], 2.0 * directions.sae.W_dec[5].detach(), atol=1e-5, rtol=0)


def test_hooks_are_removed(model, directions):
    layer = model.model.layers[LAYER]
    before = len(layer._forward_hooks)
    with apply_interventions(model, [Intervention(steer_latent=1, boost=1.0)], directions, SteeringPlan(LAYER, LAYER)):
        assert len(layer._forward_hooks) == before + 1
    assert len(layer._forward_hooks) == before


def test_steer_rows_handles_tuple_and_keeps_other_rows():
    h = torch.randn(3, 4, 8)
    out = steer_rows(h, torch.tensor([1]), torch.ones(1, 8), "all")
    assert torch.equal(out[[0, 2]], h[[0, 2]]) and torch.allclose(out[1], h[1] + 1)


def test_errors_name_the_offending_value():
    d = SteeringDirections(tiny_sae(d_sae=32), "raw")
    with pytest.raises(ValueError, match="latent 99"):
        BatchInterventions.build([Intervention(steer_latent=99, boost=1.0)], d, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="injection_layer 9"):
        SteeringPlan(9, 1).check(4)
    with pytest.raises(ValueError, match="'middle'"):
        SteeringPlan(1, 1, positions="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no SteeringDirections"):
        BatchInterventions.build([Intervention(capture=(1,))], None, torch.device("cpu"), torch.float32)
