import logging

import pytest
import torch

from esr import corpus
from esr.sae_training import (
    build_token_rows,
    collect_layer_activations,
    evaluate_sae,
    filter_activations,
    label_latents,
    train_topk_sae,
    truncate_after_layer,
)
from esr.testing import tiny_llama, tiny_tokenizer

torch.set_num_threads(1)


def test_token_rows_follow_the_mix_and_are_deterministic():
    from transformers import AutoTokenizer  # noqa: F401  (real tokenizer class path)

    tok = tiny_tokenizer()
    rows, manifest = build_token_rows(tok, {"pydoc_topics": 1.0}, total_tokens=2000, seq_len=16, seed=3)
    rows2, _ = build_token_rows(tok, {"pydoc_topics": 1.0}, total_tokens=2000, seq_len=16, seed=3)
    assert rows.shape[1] == 16 and rows.shape[0] * 16 == manifest.total_tokens >= 2000
    assert torch.equal(rows, rows2)
    assert (rows == tok.eos_token_id).any()  # documents are separated
    assert manifest.missing_sources == []


def test_missing_source_is_a_logged_degraded_mode(monkeypatch, caplog):
    monkeypatch.setitem(corpus.SOURCE_AVAILABLE, "fortunes", lambda: False)
    with caplog.at_level(logging.WARNING):
        mix, missing = corpus.available_mix({"fortunes": 0.5, "pydoc_topics": 0.5})
    assert missing == ["fortunes"] and mix == {"pydoc_topics": 1.0}
    assert "DEGRADED" in caplog.text and "fortunes" in caplog.text


def test_no_available_source_is_an_error(monkeypatch):
    monkeypatch.setitem(corpus.SOURCE_AVAILABLE, "fortunes", lambda: False)
    with pytest.raises(RuntimeError, match="no corpus source"):
        corpus.available_mix({"fortunes": 1.0})


def test_truncated_collection_equals_full_model_hidden_state():
    model = tiny_llama()
    ids = torch.randint(3, 100, (3, 12), dtype=torch.int32)
    with torch.no_grad():
        full = model(input_ids=ids.long(), output_hidden_states=True).hidden_states[3]  # output of block 2
    truncate_after_layer(model, 2)
    acts = collect_layer_activations(model, ids, layer=2, batch_size=2)
    assert len(model.model.layers) == 3
    torch.testing.assert_close(acts, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2", "gpt_neox", "gemma2", "phi3"])
def test_truncated_collection_on_other_architectures(model_type):
    """``--train-sae`` on any causal LM: the block list is found and cut generically (not ``model.model.layers``)."""
    from esr.models import decoder_layers
    from esr.testing import tiny_causal_lm

    model = tiny_causal_lm(model_type)
    ids = torch.randint(3, 100, (2, 10), dtype=torch.int32)
    with torch.no_grad():
        full = model(input_ids=ids.long(), output_hidden_states=True).hidden_states[2]  # output of block 1
    truncate_after_layer(model, 1)
    acts = collect_layer_activations(model, ids, layer=1, batch_size=2)
    assert len(decoder_layers(model)) == 2
    torch.testing.assert_close(acts, full, rtol=1e-5, atol=1e-5)


def test_filter_drops_position_zero_and_sinks():
    acts = torch.ones(2, 5, 4)
    acts[1, 3] *= 100  # an attention-sink-like outlier
    kept, index, stats = filter_activations(acts, outlier_factor=2.5)
    assert kept.shape == (7, 4)  # 2 rows x 4 positions, minus the outlier
    assert index[:, 1].min() == 1 and [1, 3] not in index.tolist()
    assert stats["n_outliers_dropped"] == 1 and stats["median_resid_norm"] == pytest.approx(2.0)


def test_topk_sae_trains_saves_reloads_and_labels(tmp_path):
    from sae_lens import SAE

    torch.manual_seed(0)
    d, n_true = 16, 24
    dictionary = torch.nn.functional.normalize(torch.randn(n_true, d), dim=1)
    codes = torch.rand(6000, n_true) * (torch.rand(6000, n_true) < 0.1)
    acts = codes @ dictionary * 5
    sae_tr = train_topk_sae(
        acts[:5000],
        d_sae=48,
        k=4,
        lr=3e-3,
        batch_tokens=100,
        seed=1,
        hook_layer=2,
        model_name="synthetic",
        autocast=False,
    )
    sae_tr.save_inference_model(tmp_path / "sae")
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    ev = evaluate_sae(sae, acts[5000:])
    assert ev.explained_variance > 0.5, ev
    assert ev.l0 <= 4.0 + 1e-6
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48), rtol=1e-4, atol=1e-4)

    rows = torch.randint(0, 6, (100, 61), dtype=torch.int32)
    index = torch.stack([torch.arange(6000) // 60, torch.arange(6000) % 60 + 1], 1).to(torch.int32)
    labels = label_latents(sae, acts, index, rows, _PiecesTokenizer(), top_k=8, min_whole_word_share=0.0)
    assert len(labels) == 48
    fired = [l for l in labels if l.frequency > 0]
    assert fired and all(len(l.contexts) <= 8 and "[[" in l.contexts[0] for l in fired)
    for l in fired:  # labels hold whole words only: never the piece "ass" (from " ass|istant") or punctuation
        assert set(l.label.split(", ")) <= {"dog", "cat", "ass", ""}
    dead = [l for l in labels if l.frequency == 0]
    assert all(not l.label for l in dead)


class _PiecesTokenizer:
    """decode() like a BPE tokenizer: ids 0-5 are ' dog', 's', ' cat', '.', ' ass', 'istant'."""

    pieces = [" dog", "s", " cat", ".", " ass", "istant"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)


def test_whole_word_labels_drop_word_pieces():
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=2))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
    # latent 0 fires on " dog" followed by " cat" (a whole word); latent 1 on " ass" followed by "istant" (a piece)
    rows = torch.tensor([[3, 0, 2, 4, 5, 3]], dtype=torch.int32)
    index = torch.tensor([[0, 1], [0, 3]], dtype=torch.int32)
    acts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = label_latents(sae, acts, index, rows, _PiecesTokenizer(), top_k=1)
    assert labels[0].label == "dog" and labels[0].whole_word_share == 1.0
    assert labels[1].label == "" and labels[1].top_tokens == ["ass"]
