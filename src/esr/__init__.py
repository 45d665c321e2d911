"""esr: reproduce "Endogenous Resistance to Activation Steering in Language Models" (arXiv 2602.06941).

Where things live (one module per concept):

- ``esr.steering``     the interventions: steer (add ``boost * W_dec[latent]``), ablate, capture (forward hooks)
- ``esr.generation``   batched steered sampling on transformers or DeepSpeed inference
- ``esr.models``       model + tokenizer loading; ``esr.sae`` SAE loading through sae-lens
- ``esr.assets``       model download (hub, pinned revision) and the embedded SmolLM2 conversion; prompts
- ``esr.corpus``, ``esr.sae_training``, ``esr.labels``  the embedded SAE: offline text, training, auto-labels
- ``esr.config``       config loading, schema validation, the model registry
- ``esr.io``, ``esr.provenance``  atomic writes and the provenance block every result carries
"""

__version__ = "0.1.0"
