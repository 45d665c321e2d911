"""Rule download_labels: fetch the latent labels of a paper SAE (Neuronpedia export or a user-supplied CSV)."""
from esr.io import read_json
from esr.labels import download_labels_stage
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    d_sae = snakemake.params.get("d_sae")
    if d_sae is None and str(snakemake.input.get("sae_manifest", "")).endswith(".json"):
        d_sae = read_json(snakemake.input.sae_manifest).get("d_sae")
    download_labels_stage(snakemake.params.labels, snakemake.wildcards.model, snakemake.output.csv,
                          snakemake.output.manifest, d_sae=d_sae)
