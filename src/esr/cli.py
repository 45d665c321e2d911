"""The ``esr`` command line (plain argparse).

    esr steer --model smollm2-135m --latent 5846 --boost 0.5 "Explain how to bake bread."
    esr latents search dog
    esr bundle export . results-bundle.tar.zst; esr bundle import results-bundle.tar.zst
    esr probe HuggingFaceTB/SmolLM2-135M-Instruct --train-sae --latents 8

Each subcommand has a ``_configure_<name>`` function that adds its arguments to its subparser and a ``run_<name>``
function that executes it and returns the exit code; :func:`build_parser` wires them together.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from esr.bundle import BundleError

# ----------------------------------------------------------------------------------------------------------------
# esr steer
# ----------------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated latent ids, got {text!r}") from e


def _configure_steer(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user prompt")
    p.add_argument("--config", default="config/config.yaml", help="workflow config (default config/config.yaml)")
    p.add_argument("--model", default=None, help="model name in the config (default: the first one)")
    p.add_argument("--latent", type=int, default=None, help="SAE latent to steer with (omit: unsteered)")
    p.add_argument("--boost", type=float, default=0.0, help="boost, in the model's sae.boost_unit")
    p.add_argument("--ablate", type=_int_list, default=(), help="comma-separated latents to ablate, e.g. 1,2,3")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length in tokens (default 512)")
    p.add_argument(
        "--positions",
        choices=["all", "generated"],
        default="all",
        help="steer every position (the authors' engine) or generated tokens only (default all)",
    )
    p.add_argument(
        "--show-activations",
        action="store_true",
        help="print the steered latent's SAE activation for every generated token",
    )
    p.add_argument("--model-dir", default=None, help="override the model directory")
    p.add_argument(
        "--median-resid-norm",
        type=float,
        default=None,
        help="the boost unit's norm, overriding the SAE folder's esr_stats.json",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def _pick_model(config: dict, name: str | None, config_path: str) -> str:
    models = list(config["models"])
    if name is None:
        return models[0]
    if name not in models:
        raise SystemExit(f"esr: model {name!r} is not in {config_path!r} (models: {', '.join(models)})")
    return name


def run_steer(args: argparse.Namespace) -> int:
    from esr.config import load_config, model_specs
    from esr.generation import TrialRequest, load_generator
    from esr.steering import Intervention

    config = load_config(args.config)
    spec = model_specs(config)[_pick_model(config, args.model, args.config)]
    gen = load_generator(
        spec,
        model_dir=args.model_dir,
        device=args.device,
        median_resid_norm=args.median_resid_norm,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        batch_size=1,
        positions=args.positions,
        progress=False,
    )
    capture = tuple(dict.fromkeys(([args.latent] if args.latent is not None else []) + list(args.ablate)))
    intervention = Intervention(
        steer_latent=args.latent,
        boost=args.boost,
        ablate=tuple(args.ablate),
        capture=capture if args.show_activations else (),
    )
    result = gen.generate([TrialRequest(args.prompt, args.seed, intervention)])[0]
    s = result.steering
    if args.latent is not None:
        print(
            f"# {spec.name}: latent {args.latent} boost {args.boost} ({s['boost_unit']}), residual norm "
            f"{s['steer_residual_norm']:.3f}, layer {spec.injection_layer}; seed {args.seed}; "
            f"{result.n_tokens} tokens, finish={result.finish_reason}",
            file=sys.stderr,
        )
    print(result.response)
    if args.show_activations and result.activations is not None:
        tok = gen.loaded.tokenizer
        print("\n# token\t" + "\t".join(f"latent_{j}" for j in capture))
        for token_id, row in zip(result.token_ids, result.activations.tolist()):
            print(f"{tok.decode([token_id])!r}\t" + "\t".join(f"{v:.3f}" for v in row))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# esr latents search
# ----------------------------------------------------------------------------------------------------------------


def labels_path(model: str, root: str | Path = ".") -> Path:
    """Where the label table of a model lives: ``resources/labels/<model>.csv``."""
    return Path(root) / "resources" / "labels" / f"{model}.csv"


def search_labels(path: str | Path, word: str, in_tokens: bool = False, limit: int | None = None) -> list[dict]:
    """Rows of a label CSV (latent,label,frequency,top_tokens) whose label (or top tokens) contains ``word``,
    case-insensitively."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label table {str(path)!r} does not exist (produced by the labels rule)")
    needle = word.lower()
    hits: list[dict] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"latent", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"label table {str(path)!r} lacks columns {sorted(missing)} (has {reader.fieldnames})")
        for row in reader:
            text = (row.get("label") or "") + (" " + (row.get("top_tokens") or "") if in_tokens else "")
            if needle in text.lower():
                hits.append(row)
                if limit is not None and len(hits) >= limit:
                    break
    return hits


def _configure_latents(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="latents_command", metavar="{search}", required=True)
    s = sub.add_parser("search", help="find latents whose label contains WORD")
    s.add_argument("word", help="text to look for (case-insensitive)")
    s.add_argument("--config", default="config/config.yaml", help="workflow config (default config/config.yaml)")
    s.add_argument("--model", default=None, help="model name (default: the config's first model)")
    s.add_argument("--labels", default=None, help="label CSV (default: resources/labels/<model>.csv)")
    s.add_argument("--tokens", action="store_true", help="also match the top_tokens column")
    s.add_argument("--limit", type=int, default=50, help="at most this many rows (default 50)")
    s.set_defaults(_run=run_latents_search)


def run_latents_search(args: argparse.Namespace) -> int:
    if args.labels:
        path = Path(args.labels)
    else:
        model = args.model
        if model is None:
            from esr.config import load_config

            config = load_config(args.config)
            model = _pick_model(config, None, args.config)
        path = labels_path(model)
    hits = search_labels(path, args.word, in_tokens=args.tokens, limit=args.limit)
    if not hits:
        print(f"no latent label contains {args.word!r} in {str(path)!r}", file=sys.stderr)
        return 1
    print("latent\tfrequency\tlabel\ttop_tokens")
    for row in hits:
        print(f"{row['latent']}\t{row.get('frequency', '')}\t{row['label']}\t{row.get('top_tokens', '')}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# esr bundle
# ----------------------------------------------------------------------------------------------------------------


def _configure_bundle(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bundle_command", metavar="{export,import,verify}", required=True)
    e = sub.add_parser("export", help="pack a run's results (no weights, no logs) into RUN_DIR OUT.tar.zst")
    e.add_argument("run_dir", help="the workflow's working directory (holds results/ and resources/)")
    e.add_argument("out", help="the bundle to write (.tar.zst)")
    e.add_argument("--configfile", default=None, help="the config the run used (default: RUN_DIR/config/config.yaml)")
    e.add_argument("--level", type=int, default=10, help="zstd compression level 1-22 (default 10)")
    e.set_defaults(_run=run_bundle_export)
    i = sub.add_parser("import", help="verify a bundle against its manifest and place it in a fresh clone")
    i.add_argument("bundle", help="the bundle file (.tar.zst)")
    i.add_argument("--into", default=".", help="the workflow directory to place it in (default: .)")
    i.add_argument("--snakefile", default=None, help="Snakefile (default: the one in --into, else this checkout's)")
    i.add_argument("--no-metadata", action="store_true", help="skip recording Snakemake metadata for grading")
    i.add_argument("--force", action="store_true", help="overwrite files already in place")
    i.set_defaults(_run=run_bundle_import)
    v = sub.add_parser("verify", help="re-check an imported directory against its bundle/manifest.json")
    v.add_argument("root", nargs="?", default=".", help="the workflow directory (default: .)")
    v.set_defaults(_run=run_bundle_verify)


def run_bundle_export(args: argparse.Namespace) -> int:
    from esr.bundle import export_bundle

    config = args.configfile or str(Path(args.run_dir) / "config/config.yaml")
    m = export_bundle(run_dir=args.run_dir, config_path=config, out=args.out, level=args.level)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {m['totals']['files']} files, {m['totals']['bytes']} bytes ({size} compressed)")
    for store, n in sorted(m["activation_stores"].items()):
        print(f"  activation store {store}: {n} bytes")
    print(f"  not shipped: {len(m['not_shipped'])} (weights, logs, caches outside the run)")
    return 0


def run_bundle_import(args: argparse.Namespace) -> int:
    from esr.bundle import CONFIG, import_bundle

    m = import_bundle(
        bundle=args.bundle,
        into=args.into,
        snakefile=args.snakefile,
        record_metadata=not args.no_metadata,
        force=args.force,
    )
    print(f"imported {m['totals']['files']} verified files into {Path(args.into).resolve()}")
    print(f"next: snakemake --configfile {CONFIG} --cores 2 stats && snakemake --configfile {CONFIG} --report")
    return 0


def run_bundle_verify(args: argparse.Namespace) -> int:
    from esr.bundle import verify_placed

    problems = verify_placed(root=args.root)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------------------------------------------
# esr probe
# ----------------------------------------------------------------------------------------------------------------

PROBE_EXAMPLES = """examples:
  # a hub model (cache honoured), an SAE trained here, the offline judge (no network):
  esr probe HuggingFaceTB/SmolLM2-135M-Instruct --train-sae --judge offline --latents 8
  # a local folder with a published sae-lens SAE and the paper's judge (ANTHROPIC_API_KEY in the environment):
  esr probe ./my-model --sae gemma-scope-2b-pt-res-canonical/layer_16/width_16k/canonical --layer 16 \\
            --judge anthropic:claude-haiku-4-5-20251001 --latents 20 --trials-per-latent 5
  # a judge served by vLLM (OpenAI-compatible), after a kill: continue where it stopped
  esr probe Qwen/Qwen2.5-0.5B-Instruct --sae-dir ./my-sae --layer 12 \\
            --judge openai:http://127.0.0.1:8000/v1:Qwen/Qwen2.5-7B-Instruct --out probe-qwen --resume

Writes OUT/probe.html (open it first), OUT/probe.json (summary + provenance), OUT/trials.parquet (every graded
answer), OUT/dose_response.png, OUT/config.yaml (the resolved settings); the workflow's folders
(resources/, results/, logs/) under OUT hold every intermediate result, so --resume repeats no finished step and
no judge call."""


def _configure_probe(p: argparse.ArgumentParser) -> None:
    from esr.probing import ProbeSettings

    d = ProbeSettings(model="")
    p.add_argument(
        "model",
        help="a model folder, or an HF id (downloaded into the HF cache; with HF_HUB_OFFLINE=1 read from it only)",
    )
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of MODEL (default: main)")
    sae = p.add_mutually_exclusive_group(required=True)
    sae.add_argument("--sae", default=None, metavar="RELEASE/ID", help="a sae-lens pretrained SAE, e.g. RELEASE/ID")
    sae.add_argument("--sae-dir", default=None, metavar="DIR", help="a local sae-lens SAE folder (cfg.json + weights)")
    sae.add_argument(
        "--train-sae",
        action="store_true",
        help="train a TopK SAE at --layer on the offline text corpus (the embedded recipe, smaller)",
    )
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="decoder block whose output is steered and read by the SAE (default: --sae-dir's hook layer, else half "
        "the depth; with --sae give the SAE's layer, which is checked)",
    )
    p.add_argument(
        "--judge",
        default=d.judge,
        help="offline (MiniLM approximation, no network) | anthropic:MODEL | openai:URL:MODEL (default: offline)",
    )
    p.add_argument(
        "--latents",
        type=int,
        metavar="N",
        default=d.latents,
        help=f"how many latents to steer with (default {d.latents})",
    )
    p.add_argument(
        "--trials-per-latent",
        type=int,
        metavar="K",
        default=d.trials_per_latent,
        help=f"steered answers per latent, one prompt each (default {d.trials_per_latent})",
    )
    p.add_argument(
        "--target",
        type=float,
        default=d.target,
        help=f"calibration target: the mean first-attempt score at each latent's boost threshold, as a fraction "
        f"(0.3 = 30 of 100; default {d.target}, the paper's)",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed or finished probe in --out (same options; to change one, use a new --out)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of every random draw (default {d.seed})")
    p.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens, help=f"answer length (default {d.max_new_tokens})"
    )
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["float32", "bfloat16", "float16"],
        help=f"model dtype (default {d.dtype}; bfloat16 halves GPU memory)",
    )
    p.add_argument("--prompts", default=None, help="a prompt file, one per line (default: the embedded prompts)")
    p.add_argument(
        "--labels",
        default=None,
        help="the SAE's latent labels (CSV with latent,label; e.g. a Neuronpedia export); default: labelled here",
    )
    p.add_argument(
        "--calibration-steps",
        type=int,
        default=d.calibration_steps,
        help=f"probabilistic-bisection steps per latent's boost search (default {d.calibration_steps})",
    )
    p.add_argument(
        "--sae-train-tokens",
        type=int,
        default=d.sae_train_tokens,
        help=f"corpus tokens: the SAE's training set with --train-sae; a third of them label the latents "
        f"(default {d.sae_train_tokens})",
    )
    p.set_defaults(_run=run_probe_command)


def run_probe_command(args: argparse.Namespace) -> int:
    from esr.probing import ProbeSettings, print_transcripts, run_probe

    settings = ProbeSettings(
        model=args.model,
        revision=args.revision,
        sae=args.sae,
        sae_dir=args.sae_dir,
        train_sae=args.train_sae,
        layer=args.layer,
        judge=args.judge,
        latents=args.latents,
        trials_per_latent=args.trials_per_latent,
        target=args.target,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        dtype=args.dtype,
        prompts=args.prompts,
        labels=args.labels,
        calibration_steps=args.calibration_steps,
        sae_train_tokens=args.sae_train_tokens,
    )
    result = run_probe(settings, echo=lambda s: print(s, file=sys.stderr))
    print(result.table())
    print_transcripts(result)
    print(f"\nwrote {result.out}/probe.json, trials.parquet, probe.html")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Parser assembly
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from esr import __version__

    parser = argparse.ArgumentParser(prog="esr", description="Endogenous steering resistance (arXiv 2602.06941)")
    parser.add_argument("--version", action="version", version=f"esr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    steer_help = "generate a steered answer to one prompt"
    steer = sub.add_parser("steer", help=steer_help, description=steer_help)
    _configure_steer(steer)
    steer.set_defaults(_run=run_steer)
    latents_help = "inspect SAE latents (search labels)"
    _configure_latents(sub.add_parser("latents", help=latents_help, description=latents_help))
    bundle_help = "export / import / verify a results bundle (auditing a run without GPUs)"
    _configure_bundle(sub.add_parser("bundle", help=bundle_help, description=bundle_help))
    probe_help = "test a model for steering resistance: selection, calibration, steered trials, grading, summary"
    _configure_probe(
        sub.add_parser(
            "probe",
            help=probe_help,
            description=probe_help,
            epilog=PROBE_EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"esr {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, KeyError, BundleError) as e:
        print(f"esr {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
