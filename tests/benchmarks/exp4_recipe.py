"""exp4 recipe search on one model (issue 16; reference protocol Sec. 6.9): material -> data -> LoRA -> merge ->
held-out evaluation of the base and the fine-tuned model, in one command, with the package's own functions.

    .venv/bin/python tests/benchmarks/exp4_recipe.py --name r1 --epochs 3 --lr 5e-4 --layers all

Steps (each cached under ``--work``, default results/exp4_recipes, keyed by the settings it depends on):

1. material (``material/<hash>/``): the prompt split (``esr.finetune.split_prompts``), the base model's own
   unsteered answers and its steered generations from random latents at ``--drift-boosts``
   (``esr.stages.finetune.generate_material``) on the TRAIN prompts; the drift is graded by the configured judge
   (``esr.stages.finetune.grade_drift``, as rule finetune_material does) so ``--drift-max-score`` can keep only
   drift that really left the topic.
2. data: ``esr.finetune.build_finetune_data`` (masked self-correction + length-matched normal examples).
3. LoRA: ``esr.finetune.train_lora`` (resumable per epoch; torch threads ``--threads``) + ``merge_lora``.
4. evaluation on the HELD-OUT prompts (base once, cached; then the fine-tuned model): unsteered trials
   (``--unsteered-per-prompt`` per prompt) and steered trials (``--eval-latents`` calibrated latents x
   ``--eval-boosts`` x prompts), graded by the configured judge (offline MiniLM by default) and aggregated by
   ``esr.metrics.summarise``; the exp4 gate (``esr.exp4.gate``); the best shuffled-vs-normal AUC of the base SAE's
   latents on each model (``esr.detectors.top_auc_detectors``, the discovery's top-AUC method) and the base SAE's
   explained variance on each model's layer activations (``esr.sae_training.evaluate_sae``).

Writes ``runs/<name>/result.json`` and prints a table with 95% Wilson intervals."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("exp4_recipe")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="config/config.yaml")
    p.add_argument("--model", default=None, help="model entry (default: the only one)")
    p.add_argument("--work", default="results/exp4_recipes")
    p.add_argument("--name", required=True, help="run name (runs/<name>/)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    # material
    p.add_argument("--heldout-fraction", type=float, default=0.333)
    p.add_argument("--answers-per-prompt", type=int, default=4)
    p.add_argument("--drift-per-prompt", type=int, default=8)
    p.add_argument("--drift-latents", type=int, default=64)
    p.add_argument("--drift-boosts", type=float, nargs="+", default=[0.45, 0.6, 0.8])
    p.add_argument("--max-new-tokens", type=int, default=128, help="material and evaluation answers")
    # data
    p.add_argument("--n-examples", type=int, default=480)
    p.add_argument("--masked-ratio", type=float, default=0.5)
    p.add_argument("--drift-sentences", type=int, nargs=2, default=[1, 4], metavar=("MIN", "MAX"))
    p.add_argument("--drift-max-score", type=float, default=40.0, help="negative: keep all drift")
    p.add_argument("--no-length-match", action="store_true")
    # LoRA
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--layers", default="all", help="all | after (layers after the SAE layer) | comma list")
    p.add_argument("--max-length", type=int, default=512, help="tokens per example (no target cap below it)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    # evaluation
    p.add_argument("--eval-latents", type=int, default=6)
    p.add_argument("--eval-boosts", type=float, nargs="+", default=[0.3, 0.45, 0.6])
    p.add_argument("--unsteered-per-prompt", type=int, default=4)
    p.add_argument("--skip-base", action="store_true", help="do not evaluate the base model")
    return p.parse_args(argv)


def _material(args, *, cfg, spec, base_dir, prompts, seed, work: Path):
    """(split, answers DataFrame, drift DataFrame), generated once per material setting."""
    import pandas as pd

    from esr.calibration import weights_fingerprint
    from esr.finetune import PromptSplit, recipe_hash, split_prompts
    from esr.generation import load_configured_generator
    from esr.io import read_json, sha256_file, write_json, write_parquet
    from esr.stages.finetune import generate_material, grade_drift

    block = {
        "heldout_fraction": args.heldout_fraction,
        "answers_per_prompt": args.answers_per_prompt,
        "drift_per_prompt": args.drift_per_prompt,
        "drift_latents": args.drift_latents,
        "drift_boosts": list(args.drift_boosts),
        "max_new_tokens": args.max_new_tokens,
    }
    judge = _judge(cfg, spec)
    labels_csv = Path("resources/labels") / f"{spec.name}.csv"
    # everything the cached drift scores depend on: the judge (id, template version, settings), the labels it reads,
    # the generation settings and the model and SAE weights (a rebuilt embedded SAE or fine-tuned model keeps its path)
    key = recipe_hash(
        material=block,
        model=spec.name,
        seed=seed,
        prompts=list(prompts),
        generation=cfg["generation"],
        judge=judge.describe(),
        labels=sha256_file(labels_csv) if labels_csv.exists() else None,
        weights=weights_fingerprint(spec, base_dir),
    )[:16]
    folder = work / "material" / key
    if (folder / "manifest.json").exists():
        info = read_json(folder / "manifest.json")
        log.info("material: reusing %s", folder)
        split = PromptSplit(tuple(info["train_prompts"]), tuple(info["eval_prompts"]))
        return split, pd.read_parquet(folder / "answers.parquet"), pd.read_parquet(folder / "drift.parquet")
    split = split_prompts(prompts=prompts, heldout_fraction=args.heldout_fraction, seed=seed)
    t0 = time.perf_counter()
    gen = load_configured_generator(spec, base_dir, cfg["generation"], max_new_tokens=args.max_new_tokens)
    answers, drift = generate_material(generator=gen, prompts=list(split.train), finetune=block, seed=seed)
    t_gen = time.perf_counter() - t0
    drift = pd.DataFrame(drift)
    drift["score"] = grade_drift(drift=drift, judge=judge, labels=_labels(spec))  # as finetune_material
    folder.mkdir(parents=True, exist_ok=True)
    write_parquet(folder / "answers.parquet", pd.DataFrame(answers))
    write_parquet(folder / "drift.parquet", drift)
    write_json(
        folder / "manifest.json",
        {"material": block, "train_prompts": list(split.train), "eval_prompts": list(split.eval), "gen_s": t_gen},
    )
    log.info("material: %d answers, %d drift in %.0f s", len(answers), len(drift), t_gen)
    return split, pd.DataFrame(answers), drift


def _judge(cfg, spec):
    """The configured judge; ``anchors: auto`` means the workflow's per-model anchors (rule anchor_judge)."""
    from esr.judge.factory import build_judge, resolved_judge

    return build_judge(resolved_judge(cfg["judge"], spec.name), show_progress=True)


def _labels(spec) -> dict[int, str]:
    """The workflow's labels of the model's SAE latents (``resources/labels/<model>.csv``)."""
    from esr.stages.finetune import latent_labels

    return latent_labels(Path("resources/labels") / f"{spec.name}.csv")


def _eval_latents(spec, n: int) -> list[int]:
    """The first ``n`` calibrated latents (no error) of the base model's boost calibration."""
    import pandas as pd

    t = pd.read_parquet(Path("results/calibration") / spec.name / "thresholds.parquet")
    t = t[t["error"].isna()] if "error" in t.columns else t
    return [int(x) for x in t["latent"].tolist()[:n]]


def _evaluate(args, *, cfg, spec, model_dir: str, split, seed: int, tag: str) -> dict[str, Any]:
    """Unsteered + steered trials on the held-out prompts, graded; plus detector AUC and SAE explained variance."""
    import numpy as np
    import pandas as pd
    import torch

    from esr.detectors import derangement, top_auc_detectors
    from esr.generation import TrialRequest, load_configured_generator
    from esr.io import derive_seed
    from esr.metrics import summarise
    from esr.readout import conversation_ids, max_pooled_latents
    from esr.sae_training import evaluate_sae
    from esr.steering import Intervention
    from esr.trials import grade_trials

    t0 = time.perf_counter()
    gen = load_configured_generator(spec, model_dir, cfg["generation"], max_new_tokens=args.max_new_tokens)
    labels = _labels(spec)
    latents = _eval_latents(spec, args.eval_latents)
    rows, reqs = [], []
    for i, p in enumerate(split.eval):
        for k in range(args.unsteered_per_prompt):
            s = derive_seed(seed, "exp4_eval_unsteered", i, k)
            reqs.append(TrialRequest(prompt=p, seed=s, trial_id=f"u|P{i}|{k}"))
            rows.append({"kind": "unsteered", "latent": -1, "label": "", "boost": 0.0, "prompt_id": i})
        for lat in latents:
            for b in args.eval_boosts:
                s = derive_seed(seed, "exp4_eval_steered", i, lat, str(b))
                iv = Intervention(steer_latent=lat, boost=float(b))
                reqs.append(TrialRequest(prompt=p, seed=s, intervention=iv, trial_id=f"s|P{i}|L{lat}|{b}"))
                rows.append(
                    {"kind": "steered", "latent": lat, "label": labels.get(lat, ""), "boost": b, "prompt_id": i}
                )
    log.info("%s: generating %d trials", tag, len(reqs))
    results = gen.generate(reqs)
    t_gen = time.perf_counter() - t0
    table = pd.DataFrame(rows).assign(
        model=tag,
        trial_id=[r.trial_id for r in results],
        prompt=[r.prompt for r in results],
        judge_prompt=[r.prompt for r in results],
        response=[r.response for r in results],
        n_tokens=[r.n_tokens for r in results],
    )
    t1 = time.perf_counter()
    graded = grade_trials(table, _judge(cfg, spec))
    t_judge = time.perf_counter() - t1
    out: dict[str, Any] = {"gen_s": t_gen, "judge_s": t_judge, "latents": latents}
    for kind in ("unsteered", "steered"):
        s = summarise(graded[graded["kind"] == kind].reset_index(drop=True))
        out[kind] = {"multi": s.multi, "esr": s.esr, "improvement": s.improvement, "first_score": s.first_score.mean}
    per_boost = {}
    for b in args.eval_boosts:
        s = summarise(graded[(graded["kind"] == "steered") & (graded["boost"] == b)].reset_index(drop=True))
        per_boost[str(b)] = {"multi": s.multi.to_dict(), "esr": s.esr.to_dict(), "first": s.first_score.mean}
    out["per_boost"] = per_boost
    # detector discovery's top-AUC method on own-answer vs deranged-answer conversations (held-out prompts)
    t2 = time.perf_counter()
    ev = list(split.eval)
    normal_ans = [r.response for r in results if r.intervention is None][:: args.unsteered_per_prompt]
    tok, sae = gen.loaded.tokenizer, gen.directions.sae
    perm = derangement(len(ev), derive_seed(seed, spec.name, "derangement"))
    normal_seqs = [conversation_ids(tok, p, normal_ans[i])[0] for i, p in enumerate(ev)]
    shuffled_seqs = [conversation_ids(tok, p, normal_ans[perm[i]])[0] for i, p in enumerate(ev)]
    normal = max_pooled_latents(gen.loaded, sae, spec.sae_layer, normal_seqs)
    shuffled = max_pooled_latents(gen.loaded, sae, spec.sae_layer, shuffled_seqs)
    alive = np.maximum(normal, shuffled).max(axis=0) > 0
    top = top_auc_detectors(normal, shuffled, 5, alive=alive)
    out["top_auc"] = {str(j): top.stats[j]["auc"] for j in top.latents}
    out["best_auc"] = max(out["top_auc"].values()) if out["top_auc"] else None
    # base SAE explained variance on this model's SAE-layer residuals over its own unsteered conversations
    acts = _layer_acts(gen.loaded, spec.sae_layer, normal_seqs)
    with torch.no_grad():
        out["sae_explained_variance"] = float(evaluate_sae(sae, acts).explained_variance)
    out["probe_s"] = time.perf_counter() - t2
    graded.drop(columns=["judge_metadata"], errors="ignore").to_parquet(Path(args.run_dir) / f"trials_{tag}.parquet")
    return out


def _layer_acts(loaded, layer: int, seqs) -> Any:
    """[n_tokens, d_model] residual stream output of decoder layer ``layer`` over ``seqs`` (one forward each),
    without each sequence's first position (the attention-sink token, whose huge norm would dominate the variance)."""
    import torch

    model = loaded.model
    store: list[torch.Tensor] = []
    block = loaded.layers[layer]  # the hook point esr.readout.per_token_latents reads (decoder layer output)
    h = block.register_forward_hook(
        lambda _m, _i, o: store.append((o[0] if isinstance(o, tuple) else o)[0, 1:].float())
    )
    try:
        with torch.no_grad():
            for s in seqs:
                model(torch.tensor([list(s)], device=loaded.device))
    finally:
        h.remove()
    return torch.cat(store).cpu()


def _fmt(p) -> str:
    ci = p.wilson()
    return f"{p.k}/{p.n} = {p.estimate:.3f} [{ci.lo:.3f}, {ci.hi:.3f}]"


def main(argv: list[str] | None = None) -> None:
    import torch

    from esr.assets import read_prompts
    from esr.config import load_config, model_specs
    from esr.exp4 import gate
    from esr.finetune import (
        FinetuneDataSettings,
        LoraSettings,
        build_finetune_data,
        merge_lora,
        recipe_hash,
        train_lora,
    )
    from esr.io import derive_seed, read_json, write_json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    specs = model_specs(cfg)
    spec = specs[args.model] if args.model else next(iter(specs.values()))
    seed = int(cfg.get("seed", 0) if args.seed is None else args.seed)
    base_dir = str(Path("resources/models") / spec.name)
    work = Path(args.work)
    run = work / "runs" / args.name
    run.mkdir(parents=True, exist_ok=True)
    args.run_dir = str(run)
    prompts = read_prompts(cfg["prompts"]["path"])
    times: dict[str, float] = {}

    t = time.perf_counter()
    split, answers, drift = _material(
        args, cfg=cfg, spec=spec, base_dir=base_dir, prompts=prompts, seed=seed, work=work
    )
    times["material_s"] = time.perf_counter() - t

    settings = FinetuneDataSettings(
        masked_ratio=args.masked_ratio,
        n_examples=args.n_examples,
        drift_sentences=tuple(args.drift_sentences),
        drift_max_score=None if args.drift_max_score < 0 else args.drift_max_score,
        length_match=not args.no_length_match,
        seed=derive_seed(seed, "finetune"),
    )
    examples = build_finetune_data(answers=answers, drifts=drift, split=split, settings=settings)
    n_layers = int(spec.n_layers)
    if args.layers == "all":
        layers = None
    elif args.layers == "after":
        layers = tuple(range(spec.sae_layer + 1, n_layers))
    else:
        layers = tuple(int(x) for x in args.layers.split(","))
    lora = LoraSettings(
        r=args.r,
        alpha=args.alpha,
        lr=args.lr,
        epochs=args.epochs,
        layers_to_transform=layers,
        micro_batch_size=args.micro_batch,
        gradient_accumulation=args.grad_accum,
        max_length=args.max_length,
        seed=derive_seed(seed, "finetune_lora"),
        threads=args.threads,
        chat_template=spec.chat_template,
    )
    h = recipe_hash(data=settings.record(), lora=lora.record(), n=len(examples), eval_prompts=list(split.eval))
    merged = run / "merged"
    if not (merged / "esr_finetune.json").exists():
        t = time.perf_counter()
        tr = train_lora(
            model_dir=base_dir,
            examples=examples,
            out_dir=run / "lora",
            checkpoint_dir=run / "ckpt",
            settings=lora,
            recipe=h,
        )
        times["train_s"] = time.perf_counter() - t
        times["trained_tokens"] = float(sum(tr.tokens))
        merge_lora(
            base_model_dir=base_dir,
            adapter_dir=tr.adapter_dir,
            out_dir=merged,
            info={"recipe_hash": h, "base_model": spec.name, "data": settings.record(), "lora": lora.record()},
        )
    results: dict[str, Any] = {}
    base_cache = work / "base_eval" / f"{recipe_hash(split=list(split.eval), a=vars(_eval_args(args)))[:16]}.json"
    if not args.skip_base:
        if base_cache.exists():
            results["base"] = read_json(base_cache)
        else:
            results["base"] = _jsonable(
                _evaluate(args, cfg=cfg, spec=spec, model_dir=base_dir, split=split, seed=seed, tag="base")
            )
            base_cache.parent.mkdir(parents=True, exist_ok=True)
            write_json(base_cache, results["base"])
    ft = _evaluate(args, cfg=cfg, spec=spec, model_dir=str(merged), split=split, seed=seed, tag="finetuned")
    g = gate(esr=ft["steered"]["esr"], unsteered=ft["unsteered"]["multi"])
    print(f"\nrecipe {args.name} ({h[:12]}): {len(examples)} examples, times {times}")
    print(f"fine-tuned: unsteered restart {_fmt(ft['unsteered']['multi'])}")
    print(
        f"fine-tuned: steered multi {_fmt(ft['steered']['multi'])}  ESR {_fmt(ft['steered']['esr'])}  "
        f"improvement {_fmt(ft['steered']['improvement'])}"
    )
    print(f"gate (ESR Wilson lo > unsteered Wilson hi): {g}")
    print(f"fine-tuned: best AUC {ft['best_auc']}, base-SAE EV {ft['sae_explained_variance']:.3f}")
    results["finetuned"] = _jsonable(ft)
    if "base" in results:
        b = results["base"]
        print(
            f"base: unsteered {b['unsteered']['multi']}, steered multi {b['steered']['multi']}, "
            f"ESR {b['steered']['esr']}, best AUC {b['best_auc']}, EV {b['sae_explained_variance']:.3f}"
        )
    write_json(run / "result.json", {"args": vars(args), "recipe_hash": h, "times": times, "gate": g, **results})


def _eval_args(args) -> argparse.Namespace:
    keys = ("eval_latents", "eval_boosts", "unsteered_per_prompt", "max_new_tokens", "seed", "config")
    return argparse.Namespace(**{k: getattr(args, k) for k in keys})


def _jsonable(x: Any) -> Any:
    from esr.metrics import Proportion

    if isinstance(x, Proportion):
        return x.to_dict()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


if __name__ == "__main__":
    main()
