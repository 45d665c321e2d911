from esr.audit import build_audit
from esr.report import audit_markdown_to_html, run_overview
from esr.stages import stage_logging

with stage_logging(snakemake.log[0]):
    o, p = snakemake.output, snakemake.params
    summaries = list(snakemake.input.summaries)
    build_audit([s for s in summaries if "comparisons" not in s], o.json, o.md, p.config, model_map=p.model_map)
    audit_markdown_to_html(o.md, o.html, f"esr audit: {p.config.get('run_name')}")
    run_overview(p.config, [s for s in summaries if "comparisons" not in s], o.json, o.overview)
