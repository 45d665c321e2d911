"""Assets of the paper rehearsal (issue 12): ``config/paper.yaml`` itself, run end to end offline on tiny stand-ins.

Test-support code shipped in the package (like :mod:`esr.testing`) so ``make rehearse-paper`` can use it:

- **An offline Hugging Face hub cache** (``<root>/hf_home/hub``, the real layout: ``models--org--name/blobs``,
  ``snapshots/<revision>/<file>`` symlinks to the blobs, ``refs/main``) holding tiny random-weight models under the
  paper's five repo ids and pinned revisions, with the real architectures (``LlamaForCausalLM`` /
  ``Gemma2ForCausalLM``) and layer counts (80/32/26/42/46), so the real injection and SAE layers are used. Widths
  are tiny (:data:`HIDDEN` = 64). Each tokenizer is word level with a Llama-3 or Gemma chat template stored in
  ``tokenizer_config.json`` (where the pinned upstream revisions keep theirs).
- **Fake SAE repos** in the same cache, in the files sae-lens's converters read: Goodfire ``.pt``/``.pth`` state
  dicts (``encoder_linear.*`` / ``decoder_linear.*``, decoder rows not unit norm) and GemmaScope ``params.npz``
  (``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``; unit-norm decoder rows) at the paths of sae-lens's
  pretrained directory, resolved through ``refs/main`` (sae-lens asks the hub for the default revision).
  sae-lens's ``goodfire`` and ``gemma_2`` converters hard-code the real shapes (d_in 8192/4096/2304/3584/4608,
  d_sae 65536/16384/131072) instead of reading them from the file, so tiny fakes need the directory's
  ``config_overrides`` mechanism: :func:`install_sae_directory_hook` adds ``{d_in, d_sae}`` to the five releases'
  directory entries (from ``<root>/sae_overrides.json``); everything else (repo and path lookup, hook name,
  ``hf_hub_download``, weight conversion) is sae-lens's own ``SAE.from_pretrained``. Subprocesses get the hook
  from ``<root>/pythonpath/sitecustomize.py`` with ``PYTHONPATH`` and ``ESR_REHEARSAL_SAE_OVERRIDES`` set
  (:meth:`RehearsalAssets.env`).
- **Files served over loopback** (``<root>/files``; :func:`serve_files`): a prompt list and Neuronpedia-style
  explanation exports ``neuronpedia/{np_model}/{np_layer}/explanations/batch-N.jsonl.gz`` (ids from sae-lens's
  directory) labelling every latent of each fake SAE.
- **The override file** (:func:`write_override`): lowers n and points the prompt/label URLs and every judge at
  loopback; nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import importlib.abc
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: hidden size of every tiny model = d_in of every fake SAE
HIDDEN = 64
#: latents per fake SAE, except where the paper config names latent ids of the real SAE (:func:`sae_width`)
D_SAE = 64
#: prompts in the served prompts file (every stage's sequences scale with it)
N_PROMPTS = 8
#: the model whose Neuronpedia export is split over two batches (batch-0 and batch-1)
TWO_BATCH_MODEL = "gemma-2-2b"
OVERRIDES_ENV = "ESR_REHEARSAL_SAE_OVERRIDES"
#: the env var naming the dummy judge key the override's judges read
JUDGE_KEY_ENV = "ESR_REHEARSAL_JUDGE_KEY"
SAE_OVERRIDES_FILE = "sae_overrides.json"
PROMPTS_FILE = "prompts.txt"

_DEFAULT_PAPER_CONFIG = Path(__file__).resolve().parents[2] / "config" / "paper.yaml"

PROMPTS = (
    "how do you bake bread at home",
    "explain how a car engine works",
    "write a short letter to a friend",
    "how do you make a monthly budget",
    "explain why the sky is blue",
    "how do you change a car tire",
    "give me tips for a job interview",
    "explain how plants make food",
    "how do you boil an egg",
    "write a poem about the sea",
    "how do you learn a new language",
    "explain how a bank loan works",
    "how do you plan a trip to the city",
    "explain what a computer does",
    "how do you keep a garden green",
    "write a story about a lost key",
    "how do you clean a kitchen fast",
    "explain how rain forms",
    "how do you train for a long run",
    "explain how the heart pumps blood",
    "how do you start a small business",
    "write a thank you note to a teacher",
    "how do you save water at home",
    "explain how a bridge holds weight",
    "how do you make good coffee",
    "explain how the moon changes shape",
    "how do you fix a slow computer",
    "write a short speech for a wedding",
    "how do you cook rice well",
    "explain how a train runs",
    "how do you sleep better at night",
    "explain how money is printed",
)

_CONCRETE = (
    "references to dogs and puppies",
    "mentions of a dog barking",
    "the Eiffel Tower in Paris",
    "dog breeds such as poodles and beagles",
    "walking a dog in the park",
    "the Golden Gate Bridge",
    "dog food and pet treats",
    "a dog chasing a ball",
)
_ABSTRACT = (
    "the end of a sentence",
    "expressions of uncertainty",
    "words following a comma",
    "formal tone in writing",
    "shifts in topic",
    "negation and contrast",
    "",  # an unlabeled latent, as real exports have
    "lists and enumerations",
)

_LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = m['role'] %}{% endif %}<start_of_turn>{{ role }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class RehearsalAssets:
    """Where the rehearsal's assets are. ``hf_home``: set ``HF_HOME`` to it (hub cache in ``hf_home/hub``) with
    ``HF_HUB_OFFLINE=1``; ``files_dir``: served over loopback (:func:`serve_files`); ``override``: the override YAML
    to pass after ``config/paper.yaml`` (``None`` until :func:`write_override`); ``root``: the build folder."""

    hf_home: Path
    files_dir: Path
    override: Path | None = None
    root: Path | None = None
    prompts_sha256: str = ""
    #: config model name -> {"np_model", "np_layer", "batch_sha256": {file: hex}}
    labels: dict[str, Any] | None = None

    @property
    def sae_overrides(self) -> Path:
        return Path(self.root) / SAE_OVERRIDES_FILE

    @property
    def pythonpath(self) -> Path:
        return Path(self.root) / "pythonpath"

    def env(self, *, judge_key: str = "rehearsal-dummy-key") -> dict[str, str]:
        """The environment variables a rehearsal process (Snakemake and every job) needs: offline hub cache, the
        SAE-directory hook (prepended to an existing ``PYTHONPATH``) and the dummy judge key."""
        pp = os.pathsep.join(p for p in (str(self.pythonpath), os.environ.get("PYTHONPATH", "")) if p)
        return {
            "HF_HOME": str(self.hf_home),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": pp,
            OVERRIDES_ENV: str(self.sae_overrides),
            JUDGE_KEY_ENV: judge_key,
        }


# --------------------------------------------------------------------------------------------------- hub cache


def _repo_folder(hub: Path, repo_id: str, kind: str = "model") -> Path:
    return hub / f"{kind}s--{repo_id.replace('/', '--')}"


def _place_snapshot(hub: Path, repo_id: str, revision: str, src: Path, *, ref: str = "main") -> Path:
    """Copy every file under ``src`` into the cache as ``blobs/<sha256>`` and link it from
    ``snapshots/<revision>/<rel>`` (relative symlinks, as huggingface_hub writes them); ``refs/<ref>`` holds the
    revision. Returns the snapshot folder."""
    repo = _repo_folder(hub, repo_id)
    blobs, snap = repo / "blobs", repo / "snapshots" / revision
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = blobs / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(revision)
    return snap


def _fake_commit(repo_id: str) -> str:
    return hashlib.sha1(f"esr-rehearsal:{repo_id}".encode()).hexdigest()


def _vocab_words() -> list[str]:
    from esr.testing import TINY_WORDS

    words = [w for p in PROMPTS for w in p.split()] + list(TINY_WORDS)
    return list(dict.fromkeys(words))


def _tokenizer(family: str):
    """A word-level fast tokenizer with the family's special tokens and chat template (in tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family == "llama":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        bos, eos, pad, unk = "<|begin_of_text|>", "<|eot_id|>", None, "<|unk|>"
        specials.append(unk)
        template = _LLAMA_TEMPLATE
        roles = ["user", "assistant", "system"]
    else:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
        bos, eos, pad, unk = "<bos>", "<eos>", "<pad>", "<unk>"
        template = _GEMMA_TEMPLATE
        roles = ["user", "model"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + roles + _vocab_words()))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    kw = {"pad_token": pad} if pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=unk, **kw)
    tok.chat_template = template
    return tok


def _model(family: str, n_layers: int, vocab_size: int, tok, seed: int):
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HIDDEN // 2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="bfloat16",
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0))
        stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<|end_of_text|>")]
    else:
        cfg = Gemma2Config(**common, query_pre_attn_scalar=HIDDEN // 2, sliding_window=64)
        model = Gemma2ForCausalLM(cfg)
        stop = [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop, pad_token_id=tok.pad_token_id
    )
    return model.to(torch.bfloat16).eval()


def _save_model_dir(model, tok, out: Path) -> None:
    """save_pretrained, then the chat template moved into tokenizer_config.json (where the pinned upstream revisions
    keep it; transformers 5 would write chat_template.jinja)."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    jinja = out / "chat_template.jinja"
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = tok.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if jinja.exists():
        jinja.unlink()


# --------------------------------------------------------------------------------------------------- SAEs


def _sae_entry(release: str, sae_id: str) -> tuple[str, str, str, str]:
    """(repo_id, path in repo, neuronpedia model id, neuronpedia source id) from sae-lens's pretrained directory."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory or sae_id not in directory[release].saes_map:
        raise KeyError(f"sae-lens's pretrained directory has no release {release!r} with sae_id {sae_id!r}")
    entry = directory[release]
    np_id = entry.neuronpedia_id.get(sae_id)
    if not np_id or "/" not in np_id:
        raise KeyError(f"sae-lens's directory gives no neuronpedia id for {release!r} / {sae_id!r}")
    np_model, np_layer = np_id.split("/", 1)
    return entry.repo_id, entry.saes_map[sae_id], np_model, np_layer


def sae_width(model_cfg: dict[str, Any]) -> int:
    """Latents of a model's fake SAE: :data:`D_SAE`, or the smallest power of two above the largest latent id of
    the model's ``paper_detector_sets`` (the 70B's sets name ids of the real 65,536-latent Goodfire SAE; the
    rehearsal runs them, so its fake SAE has that width)."""
    from esr.detectors import PAPER_SETS

    ids = [i for name in model_cfg.get("paper_detector_sets") or () for i in PAPER_SETS[name]]
    width = D_SAE
    while ids and width <= max(ids):
        width *= 2
    return width


def _write_sae_files(conversion: str, path_in_repo: str, dest: Path, seed: int, *, d_sae: int = D_SAE) -> None:
    """The SAE weights in the layout sae-lens's ``conversion`` loader reads. Half the latents are never active
    (high threshold / very negative bias: candidates for steering, zero on the prompts), half fire often."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(HIDDEN, d_sae, generator=g) / HIDDEN**0.5
    w_dec = torch.randn(d_sae, HIDDEN, generator=g)
    quiet = torch.arange(d_sae) % 2 == 0
    target = dest / path_in_repo if conversion == "goodfire" else dest / path_in_repo / "params.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    if conversion == "goodfire":  # ReLU SAE; decoder rows not unit norm (norm ~ 0.3 * sqrt(d_in))
        w_dec = w_dec * 0.3
        b_enc = torch.where(quiet, torch.full((d_sae,), -1.0e4), torch.full((d_sae,), 0.1))
        state = {
            "encoder_linear.weight": w_enc.T.contiguous(),
            "encoder_linear.bias": b_enc,
            "decoder_linear.weight": w_dec.T.contiguous(),
            "decoder_linear.bias": torch.zeros(HIDDEN),
        }
        torch.save(state, target)
    elif conversion == "gemma_2":  # JumpReLU; unit-norm decoder rows
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        threshold = torch.where(quiet, torch.full((d_sae,), 1.0e4), torch.full((d_sae,), 0.01))
        with open(target, "wb") as f:
            np.savez(
                f,
                w_enc=w_enc.numpy(),
                w_dec=w_dec.numpy(),
                b_enc=(torch.randn(d_sae, generator=g) * 0.1).numpy(),
                b_dec=np.zeros(HIDDEN, dtype=np.float32),
                threshold=threshold.numpy(),
            )
    else:
        raise ValueError(f"no fake SAE writer for sae-lens conversion {conversion!r} (goodfire, gemma_2)")


def install_sae_directory_hook(overrides_path: str | os.PathLike | None = None) -> None:
    """Add ``config_overrides`` (``{d_in, d_sae}`` per release, from the JSON at ``overrides_path`` or
    ``$ESR_REHEARSAL_SAE_OVERRIDES``) to sae-lens's pretrained directory, now if ``sae_lens`` is imported, else as
    soon as its directory module is. sae-lens applies a directory entry's ``config_overrides`` on top of its
    converter's config (``SAE.from_pretrained_with_cfg_and_sparsity``). A no-op without a path."""
    path = overrides_path or os.environ.get(OVERRIDES_ENV)
    if not path:
        return
    overrides = json.loads(Path(path).read_text())
    name = "sae_lens.loading.pretrained_saes_directory"

    def patch(module) -> None:
        if getattr(module, "_esr_rehearsal_patched", False):
            return
        original = module.get_pretrained_saes_directory

        @functools.cache
        def get_pretrained_saes_directory():
            directory = original()
            for release, extra in overrides.items():
                entry = directory[release]
                entry.config_overrides = {**(entry.config_overrides or {}), **extra}
            return directory

        module.get_pretrained_saes_directory = get_pretrained_saes_directory
        module._esr_rehearsal_patched = True

    if name in sys.modules:
        patch(sys.modules[name])
        if "sae_lens.saes.sae" in sys.modules:  # bound by ``from ... import`` before the patch
            sys.modules["sae_lens.saes.sae"].get_pretrained_saes_directory = sys.modules[
                name
            ].get_pretrained_saes_directory
        return

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(fullname)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _Finder())


_SITECUSTOMIZE = """\
# Written by esr.rehearsal: registers the fake SAEs' shapes in sae-lens's directory when
# $ESR_REHEARSAL_SAE_OVERRIDES is set (the paper rehearsal); does nothing otherwise.
import os

if os.environ.get("ESR_REHEARSAL_SAE_OVERRIDES"):
    from esr.rehearsal import install_sae_directory_hook

    install_sae_directory_hook()
"""


# --------------------------------------------------------------------------------------------------- labels


def _labels_records(np_model: str, np_layer: str, *, d_sae: int = D_SAE) -> list[dict[str, Any]]:
    out = []
    for j in range(d_sae):
        # even latents (never active on the prompts) carry most of the concrete labels: selection's candidates
        pool = _CONCRETE if (j % 2 == 0 and j % 6 != 4) else _ABSTRACT
        text = pool[(j // 2) % len(pool)]
        out.append(
            {
                "modelId": np_model,
                "layer": np_layer,
                "index": str(j),
                "description": text,
                "explanationModelName": "esr-rehearsal-fake",
                "typeName": "oai_token-act-pair",
            }
        )
    return out


def _write_gz_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data, mtime=0))
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------- build


def build_rehearsal_assets(
    root: str | os.PathLike, *, paper_config: str | os.PathLike | None = None
) -> RehearsalAssets:
    """Build the offline hub cache (models + SAEs), the served files and the SAE-directory hook under ``root``
    (replacing earlier ones) for every model of ``paper_config`` (default: the checkout's ``config/paper.yaml``).
    Returns the assets without an override (:func:`write_override` adds it). Raises ``KeyError`` for an SAE not in
    sae-lens's directory, ``ValueError`` for a family or converter without a fake."""
    import yaml

    root = Path(root).resolve()
    paper = yaml.safe_load(Path(paper_config or _DEFAULT_PAPER_CONFIG).read_text())
    hf_home, files = root / "hf_home", root / "files"
    for p in (hf_home, files, root / "pythonpath"):
        shutil.rmtree(p, ignore_errors=True)
    hub = hf_home / "hub"
    hub.mkdir(parents=True)
    files.mkdir(parents=True)

    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    sae_overrides: dict[str, dict[str, int]] = {}
    labels: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for i, (name, m) in enumerate(paper["models"].items()):
            family = m.get("family")
            if family not in ("llama", "gemma2"):
                raise ValueError(f"models.{name}.family {family!r}: the rehearsal has fakes for llama and gemma2")
            tok = _tokenizer(family)
            model = _model(family, int(m["n_layers"]), len(tok), tok, seed=i)
            mdir = Path(tmp) / f"model-{i}"
            _save_model_dir(model, tok, mdir)
            _place_snapshot(hub, m["hf_id"], m["revision"], mdir)

            sae = m["sae"]
            repo_id, path_in_repo, np_model, np_layer = _sae_entry(sae["release"], sae["sae_id"])
            conversion = get_pretrained_saes_directory()[sae["release"]].conversion_func
            sdir = Path(tmp) / f"sae-{i}"
            width = sae_width(m)
            _write_sae_files(conversion, path_in_repo, sdir, seed=100 + i, d_sae=width)
            _place_snapshot(hub, repo_id, _fake_commit(repo_id), sdir)
            sae_overrides[sae["release"]] = {"d_in": HIDDEN, "d_sae": width}

            records = _labels_records(np_model, np_layer, d_sae=width)
            folder = files / "neuronpedia" / np_model / np_layer / "explanations"
            if name == TWO_BATCH_MODEL:  # two batches, and a duplicate record for latent 0 in the second
                half = len(records) // 2
                parts = [records[:half], records[half:] + [{**records[0], "description": "a second explanation"}]]
            else:
                parts = [records]
            batch_sha = {
                f"batch-{b}.jsonl.gz": _write_gz_jsonl(folder / f"batch-{b}.jsonl.gz", part)
                for b, part in enumerate(parts)
            }
            labels[name] = {"np_model": np_model, "np_layer": np_layer, "batch_sha256": batch_sha}

    (root / SAE_OVERRIDES_FILE).write_text(json.dumps(sae_overrides, indent=2))
    (root / "pythonpath").mkdir()
    (root / "pythonpath" / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    prompts = files / PROMPTS_FILE
    prompts.write_text("\n".join(PROMPTS[:N_PROMPTS]) + "\n")
    return RehearsalAssets(
        hf_home=hf_home,
        files_dir=files,
        root=root,
        prompts_sha256=hashlib.sha256(prompts.read_bytes()).hexdigest(),
        labels=labels,
    )


# --------------------------------------------------------------------------------------------------- serving


@contextlib.contextmanager
def serve_files(files_dir: str | os.PathLike) -> Iterator[str]:
    """Serve ``files_dir`` read-only over HTTP on 127.0.0.1 (an OS-chosen port; a ``ThreadingHTTPServer`` in a
    daemon thread); yields the base URL ``http://127.0.0.1:PORT``. Missing files answer 404."""
    handler = functools.partial(_QuietHandler, directory=str(files_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass


# --------------------------------------------------------------------------------------------------- override


def override_dict(
    *, files_url: str, judge_url: str, assets: RehearsalAssets, paper_config: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The override (see :func:`write_override`) as a dict."""
    import yaml

    paper = yaml.safe_load(Path(paper_config or _DEFAULT_PAPER_CONFIG).read_text())
    files_url, judge_url = files_url.rstrip("/"), judge_url.rstrip("/")

    def endpoint(cfg: dict[str, Any]) -> dict[str, Any]:
        base = judge_url if cfg.get("backend", "anthropic") == "anthropic" else f"{judge_url}/v1"
        return {"base_url": base, "api_key_env": JUDGE_KEY_ENV}

    models: dict[str, Any] = {}
    for name, m in paper["models"].items():
        lab = assets.labels[name]
        block: dict[str, Any] = {"url": f"{files_url}/neuronpedia", "batch_sha256": lab["batch_sha256"]}
        if (m.get("labels") or {}).get("source") != "neuronpedia":  # until the paper config names neuronpedia
            block.update(source="neuronpedia", neuronpedia_model=lab["np_model"], neuronpedia_layer_id=lab["np_layer"])
        models[name] = {"labels": block}
    return {
        "prompts": {"url": f"{files_url}/{PROMPTS_FILE}", "sha256": assets.prompts_sha256},
        "models": models,
        "judge": endpoint(paper["judge"]),
        "threshold_judge": endpoint(paper["threshold_judge"]),
        "concreteness": endpoint(paper["concreteness"]),
        "cross_judge": {
            "n_samples": 2,
            "judges": {k: endpoint(v) for k, v in paper["cross_judge"]["judges"].items()},
        },
        "generation": {"max_new_tokens": 12},
        "selection": {"n_latents": 3, "trials_per_latent": 1},
        "calibration": {"n_steps": 2, "max_new_tokens": 12},
        "latent_shards": 1,
        "detectors": {"random_control": {"n_sets": 1, "candidates_per_latent": 4}},
        "experiments": {
            "ablation": ["discovered_separability"],
            "boost_sweep": {"n_latents": 1, "prompts_per_latent": 1, "n_levels": 2, "relative_levels": [1.0]},
            "meta_prompts": {"variants": ["self_monitor"]},
        },
        "sequential": {"n_baseline": 2, "n_boot": 10},
    }


def write_override(
    root: str | os.PathLike,
    *,
    files_url: str,
    judge_url: str,
    assets: RehearsalAssets,
    paper_config: str | os.PathLike | None = None,
) -> Path:
    """Write ``<root>/rehearsal_override.yaml``: pass it after ``config/paper.yaml``. It holds only lowered n
    (selection, calibration, generation, boost sweep, meta prompts, random controls, ablation sets, cross-judge,
    sequential) and loopback endpoints: the prompt URL + sha256 under ``files_url``, every model's Neuronpedia
    label URL + batch sha256s under ``files_url``/neuronpedia, and ``base_url`` + ``api_key_env`` (=
    :data:`JUDGE_KEY_ENV`) for the judge, threshold judge, concreteness grader and every cross-judge judge
    (``judge_url`` for anthropic, ``judge_url``/v1 for openai_compat). Returns the path."""
    import yaml

    path = Path(root) / "rehearsal_override.yaml"
    data = override_dict(files_url=files_url, judge_url=judge_url, assets=assets, paper_config=paper_config)
    header = "# The paper rehearsal's override (esr.rehearsal.write_override): lower n, loopback endpoints only.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=120))
    return path


# --------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m esr.rehearsal build DIR [--files-url URL --judge-url URL]``: build the assets, write the override
    (placeholder loopback URLs unless given) and print the paths and the environment to set."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m esr.rehearsal", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the rehearsal assets under DIR")
    b.add_argument("dir")
    b.add_argument("--paper-config", default=None)
    b.add_argument("--files-url", default="http://127.0.0.1:8765")
    b.add_argument("--judge-url", default="http://127.0.0.1:8766")
    args = ap.parse_args(argv)
    t0 = time.time()
    assets = build_rehearsal_assets(args.dir, paper_config=args.paper_config)
    override = write_override(
        args.dir, files_url=args.files_url, judge_url=args.judge_url, assets=assets, paper_config=args.paper_config
    )
    size = sum(p.stat().st_size for p in Path(assets.hf_home).rglob("*") if p.is_file() and not p.is_symlink())
    print(f"hf_home={assets.hf_home}\nfiles_dir={assets.files_dir}\noverride={override}")
    print(f"# built in {time.time() - t0:.1f} s; hub cache {size} bytes; environment:")
    for k, v in assets.env().items():
        print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
