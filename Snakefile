# esr: reproduce "Endogenous Resistance to Activation Steering in Language Models" (arXiv 2602.06941).
# Thin entry point: config + schema validation (workflow/rules/common.smk), rule files, and the final target.
#   embedded default (offline, CPU):  snakemake --cores 2
#   the paper's five models (GPU):    snakemake --configfile config/paper.yaml --profile slurm
from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


# The embedded default, unless --configfile names another config (which then replaces it, not merges into it).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


wildcard_constraints:
    model="|".join(re.escape(m) for m in MODELS),
    shard=r"\d+",


include: "workflow/rules/assets.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/experiments.smk"
include: "workflow/rules/stats.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
