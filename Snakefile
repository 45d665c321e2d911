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
include: "workflow/rules/finetune.smk"


# After a kill (README "After a crash"): remove the temporaries of killed atomic writes, when no other Snakemake
# holds a lock here and only those older than this run's lock (esr.recovery). Main process only (jobs: --no-hooks).
onstart:
    from esr.recovery import cache_dirs, clean_after_kill, snakemake_own_locks

    clean_after_kill(
        workdir=Path.cwd(),
        own_locks=snakemake_own_locks(workflow),
        extra_roots=cache_dirs(config),
        report=lambda msg: print(msg, file=sys.stderr),
    )


rule all:
    default_target: True
    input:
        all_outputs(),


# Every statistic, figure and the audit, no model rule: `snakemake --cores 2 stats` (e.g. after `esr bundle import`).
rule stats:
    input:
        stats_outputs(),
