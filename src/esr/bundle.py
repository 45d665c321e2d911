"""Results bundles: what an auditor needs to recompute every statistic, figure and audit row without a GPU.

``export_bundle`` packs a run's working directory into one ``.tar.zst`` file (tar stream, Python ``tarfile``;
zstd compression, the ``zstandard`` package): the latent selection, boost thresholds with their search histories
(``results/calibration``), detector sets, every generated, graded and gathered trials table, the activation stores,
the judge and calibration caches, the label CSV and prompt list, the run's config file verbatim, and a manifest
(``bundle/manifest.json``, the archive's first member) with the sha256 and size of every file, the code version
(git commit, dirty flag, package version) that made the results and that exported them, the config hash, machine
and date. Never shipped: model weights and SAE weights (``resources/models``, ``resources/sae``, any weights file),
the SAE-training activations and corpus, Snakemake's metadata, and ``logs/`` (logs may echo environment values);
every shipped file is also scanned for the value of any secret-looking environment variable (export fails, naming
the file and the variable, never the value).

``import_bundle`` unpacks a bundle into a fresh clone: every file is checked against the manifest (a tampered or
truncated file is a :class:`BundleError` naming it with both sha256), then placed at its path. The statistics
outputs (summaries, comparisons, figures, the audit) go to ``bundle/recorded/`` instead, so that Snakemake
recomputes them and the report can compare the recomputed numbers with the recorded ones
(:func:`compare_recorded`). The model and embedded-SAE folders that rules take as inputs become stub folders
(one ``ESR_BUNDLE_STUB.json`` each; the DAG accepts them, no weights are downloaded), file times are set in DAG
order (inputs oldest), and ``snakemake --touch --forcerun grade cross_judge`` records Snakemake metadata for the
grading jobs, so that a ``judge:`` change reruns grading, statistics and the audit, never generation.

exp9 (sequential activations) replays answers through the model: its stores and analysis are shipped and placed
as upstream outputs, not recomputed (in an imported run the rule's trials inputs are ``ancient``; see
``workflow/rules/common.smk``).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from esr.recovery import cache_dirs

FORMAT = "esr.bundle/1"
MANIFEST = "bundle/manifest.json"
CONFIG = "bundle/config.yaml"
RECORDED = "bundle/recorded"
STUB_MARKER = "ESR_BUNDLE_STUB.json"

#: Folders under the run directory that are shipped (besides the judge caches named in the config).
SHIPPED = (
    "results",
    "resources/prompts",
    "resources/labels",
    "resources/judge_cache",
    "resources/calibration_cache",
    "resources/sae_manifests",
)
#: Never shipped: model and SAE weights, SAE-training data, logs (may echo environment values), Snakemake state.
EXCLUDED = ("resources/models", "resources/sae", "resources/activations", "resources/corpus", "logs", ".snakemake")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack")
#: Outputs of the statistics rules (workflow/rules/stats.smk, less exp7 and exp9): recomputed after import.
RECOMPUTED = (
    "results/comparisons/*",
    "results/compare/*",
    "results/figures/*",
    "results/audit/*",
    "results/report.html",
)
#: DAG order of the upstream outputs (first match wins; unmatched files rank 0, with the inputs).
DAG_RANKS = (
    ("results/selection/*", 1),
    ("results/detectors/*", 1),
    ("results/judge/*", 2),
    ("results/calibration/*/shard-*", 3),
    ("results/calibration/*", 4),
    ("results/planted/*/shards/*/gen-*", 6),
    ("results/*/shards/*/gen-*", 5),
    ("results/*/shards/*/acts-*", 5),
    ("results/*/shards/*/graded-*", 7),
    ("results/*/shards/*/judge-stats-*", 7),
    ("results/exp7/*", 9),
    ("results/exp9/*", 10),
    ("results/*/trials.parquet", 8),
    ("results/activations/*", 8),
)
#: Rules that need model weights (or make what they need): never run on an imported bundle.
MODEL_RULES = (
    "download_model",
    "build_corpus",
    "collect_activations",
    "train_sae",
    "label_latents",
    "fetch_sae",
    "select_latents",
    "discover_detectors",
    "calibrate_boosts",
    "generate",
    "sequential",
)
_SECRET_NAME = re.compile(r"(token|secret|api[_-]?key|password|passwd|credential|auth)", re.IGNORECASE)
_MIN_SECRET_LEN = 8
_CHUNK = 1 << 20


class BundleError(Exception):
    """A bundle cannot be made or imported (secret found, tampered or truncated file, file in the way)."""


# ------------------------------------------------------------------------------------------------ what is shipped
def summary_experiments() -> list[str]:
    """Experiments whose ``summary.json`` is made by rule ``summarise`` (``esr.experiments.REGISTRY``)."""
    from esr.experiments import REGISTRY

    return [name for name, e in REGISTRY.items() if e.summary and e.made_by != "sequential"]


def is_recomputed(path: str) -> bool:
    """Whether a run-relative POSIX ``path`` is an output of the statistics rules (recomputed after import)."""
    if any(fnmatch.fnmatch(path, pat) for pat in RECOMPUTED):
        return True
    parts = path.split("/")
    return (
        len(parts) == 4 and parts[0] == "results" and parts[3] == "summary.json" and parts[1] in summary_experiments()
    )


def dag_rank(path: str) -> int:
    """Position of an upstream file in the workflow DAG (``DAG_RANKS``): files get mtimes in this order."""
    for pattern, rank in DAG_RANKS:
        if fnmatch.fnmatch(path, pattern):
            return rank
    return 0


def _excluded(rel: str) -> str | None:
    if any(rel == d or rel.startswith(d + "/") for d in EXCLUDED):
        return "excluded folder"
    if rel.lower().endswith(WEIGHT_SUFFIXES):
        return "weights file"
    return None


def empty_dirs(run_dir: str | Path, files: Iterable[str]) -> list[str]:
    """Empty folders under the shipped folders of ``run_dir`` (a directory output may be one): run-relative."""
    run_dir = Path(run_dir).resolve()
    out = []
    for root in SHIPPED:
        if (run_dir / root).is_dir():
            out += [
                d.relative_to(run_dir).as_posix()
                for d in sorted((run_dir / root).rglob("*"))
                if d.is_dir() and not d.is_symlink() and not any(d.iterdir())
            ]
    return [d for d in out if not _excluded(d)]


def collect_files(run_dir: str | Path, config: Mapping[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
    """The run-relative POSIX paths to ship from ``run_dir`` (sorted) and what was left out (``path``, ``why``).

    Shipped: ``SHIPPED`` folders and every judge ``cache_dir`` of ``config`` inside ``run_dir``; not shipped:
    ``EXCLUDED`` folders, weights files (``WEIGHT_SUFFIXES``), cache folders outside ``run_dir``, symlinks."""
    run_dir = Path(run_dir).resolve()
    roots = list(SHIPPED)
    left_out: list[dict[str, str]] = []
    for cache in sorted(cache_dirs(config)):
        p = Path(cache) if Path(cache).is_absolute() else run_dir / cache
        try:
            roots.append(p.resolve().relative_to(run_dir).as_posix())
        except ValueError:
            left_out.append({"path": cache, "why": "judge cache outside the run directory"})
    for d in EXCLUDED:
        if (run_dir / d).is_dir():
            size = sum(f.stat().st_size for f in (run_dir / d).rglob("*") if f.is_file() and not f.is_symlink())
            left_out.append({"path": d, "why": "excluded folder", "bytes": size})
    files: set[str] = set()
    for root in sorted(set(roots)):
        top = run_dir / root
        if not top.exists():
            continue
        for p in [top] if top.is_file() else sorted(top.rglob("*")):
            rel = p.relative_to(run_dir).as_posix()
            if p.is_symlink():
                left_out.append({"path": rel, "why": "symlink"})
            elif not p.is_file():
                continue
            elif why := _excluded(rel):
                left_out.append({"path": rel, "why": why})
            else:
                files.add(rel)
    return sorted(files), left_out


def secret_values(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables whose name looks like a secret (token, key, password, ...) and whose value has at
    least 8 characters and is not a file path (``SSH_AUTH_SOCK``, ``HF_TOKEN_PATH``): name -> value."""
    env = os.environ if environ is None else environ
    return {
        k: v
        for k, v in env.items()
        if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN and not v.startswith(("/", "~", "."))
    }


def find_secrets(path: str | Path, secrets: Mapping[str, str]) -> list[str]:
    """Names of the ``secrets`` whose value occurs in the file at ``path`` (read in chunks, overlap kept)."""
    needles = {name: v.encode() for name, v in secrets.items()}
    if not needles:
        return []
    keep = max(len(v) for v in needles.values())
    found: set[str] = set()
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            buf = tail + block
            found |= {name for name, v in needles.items() if v in buf}
            tail = buf[-keep:]
    return sorted(found)


# ------------------------------------------------------------------------------------------------ provenance
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def code_version() -> dict[str, Any]:
    """The checkout running this code: git commit and dirty flag, the esr package version, and the sha256 over the
    package's source files (``src/esr/**.py``, sorted by path) so an uncommitted change shows."""
    import esr
    from esr.provenance import git_commit, package_versions

    src = Path(esr.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(src.rglob("*.py")):
        h.update(p.relative_to(src).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return {**git_commit(), "esr": package_versions(("esr",))["esr"], "source_sha256": h.hexdigest()}


def _run_provenance(run_dir: Path) -> dict[str, Any]:
    """What made the results: the audit table's provenance block (code version, machine, date), if present."""
    audit = run_dir / "results/audit/paper_numbers.json"
    if not audit.is_file():
        return {}
    prov = json.loads(audit.read_text(encoding="utf-8")).get("provenance", {})
    keys = ("created_utc", "git", "python", "platform", "packages", "config_sha256")
    return {k: prov[k] for k in keys if k in prov}


# ------------------------------------------------------------------------------------------------ export
def export_bundle(
    *,
    run_dir: str | Path,
    config_path: str | Path,
    out: str | Path,
    level: int = 10,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write the results bundle of ``run_dir`` (the workflow's working directory) to ``out`` (``.tar.zst``) and
    return its manifest.

    ``config_path``: the config file the run used (shipped verbatim as ``bundle/config.yaml``, so that Snakemake
    params are unchanged after import). ``level``: zstd compression level (1-22). ``environ``: the environment
    whose secret-looking values must not occur in any shipped file (default ``os.environ``).

    Raises :class:`BundleError` when a shipped file contains such a value (naming the file and the variable) or
    when ``run_dir`` has no ``results/`` folder; ``esr.config.ConfigError`` for an invalid config."""
    import yaml
    import zstandard

    from esr.io import stable_hash
    from esr.provenance import redact

    run_dir = Path(run_dir).resolve()
    config_path = Path(config_path)
    if not (run_dir / "results").is_dir():
        raise BundleError(f"{run_dir} has no results/ folder: not a workflow working directory")
    config_text = config_path.read_text(encoding="utf-8")
    config = yaml.safe_load(config_text) or {}
    files, left_out = collect_files(run_dir, config)
    secrets = secret_values(environ)
    hits = [f"{rel} contains the value of ${name}" for rel in files for name in find_secrets(run_dir / rel, secrets)]
    if secret_hit := [f"{config_path} contains the value of ${n}" for n in find_secrets(config_path, secrets)]:
        hits = secret_hit + hits
    if hits:
        raise BundleError("refusing to export secrets:\n  - " + "\n  - ".join(hits))

    entries = []
    for rel in files:
        p = run_dir / rel
        role = "recorded" if is_recomputed(rel) else "upstream"
        entries.append({"path": rel, "sha256": _sha256(p), "bytes": p.stat().st_size, "role": role})
    config_bytes = config_text.encode("utf-8")
    stores: dict[str, int] = {}
    for e in entries:
        m = re.match(r"(.+?\.zarr)/", e["path"])
        if m:
            stores[m.group(1)] = stores.get(m.group(1), 0) + e["bytes"]
    manifest = {
        "format": FORMAT,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {"hostname": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0]},
        "exported_by": code_version(),
        "run": _run_provenance(run_dir),
        "config": {
            "path": CONFIG,
            "source": str(config_path),
            "sha256": hashlib.sha256(config_bytes).hexdigest(),
            "config_sha256": stable_hash(redact(config)),
            "run_name": config.get("run_name"),
        },
        "files": entries,
        "empty_dirs": empty_dirs(run_dir, files),
        "activation_stores": stores,
        "not_shipped": left_out,
        "totals": {"files": len(entries), "bytes": sum(e["bytes"] for e in entries)},
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    with open(tmp, "wb") as fh, cctx.stream_writer(fh) as zw, tarfile.open(fileobj=zw, mode="w|") as tar:
        _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode("utf-8"))
        _add_bytes(tar, CONFIG, config_bytes)
        for e in entries:
            info = tar.gettarinfo(run_dir / e["path"], arcname=e["path"])
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(run_dir / e["path"], "rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, out)
    return manifest


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------------------------------------ import
def _safe_member(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BundleError(f"bundle member {name!r} has an unsafe path")
    return p.as_posix()


def _unpack(bundle: Path, staging: Path) -> tuple[dict[str, Any], dict[str, tuple[str, int]]]:
    """Stream the bundle into ``staging``; return the manifest and what was read: path -> (sha256, bytes)."""
    import zstandard

    got: dict[str, tuple[str, int]] = {}
    manifest: dict[str, Any] | None = None
    current, h, n = None, None, 0
    try:
        with open(bundle, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as zr:
            with tarfile.open(fileobj=zr, mode="r|") as tar:
                for member in tar:
                    name = _safe_member(member.name)
                    if not member.isfile():
                        raise BundleError(f"bundle member {name!r} is not a regular file")
                    current, h, n = name, hashlib.sha256(), 0
                    dest = staging / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    with open(dest, "wb") as f:
                        while block := src.read(_CHUNK):
                            h.update(block)
                            n += len(block)
                            f.write(block)
                    if n != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                    got[name] = (h.hexdigest(), n)
                    current = None
                    if name == MANIFEST:
                        manifest = json.loads(dest.read_text(encoding="utf-8"))
    except (tarfile.TarError, zstandard.ZstdError, EOFError, OSError) as err:
        if manifest is None:
            raise BundleError(f"{bundle}: truncated or not a results bundle ({err}); no manifest read") from None
        want = {e["path"]: e for e in manifest["files"]}
        missing = [p for p in want if p not in got and p != current]
        detail = ""
        if current is not None and h is not None:
            exp = want.get(current, {})
            detail = (
                f"; file {current}: manifest sha256 {exp.get('sha256')} ({exp.get('bytes')} bytes), "
                f"bundle sha256 {h.hexdigest()} ({n} bytes read before the archive ended)"
            )
        raise BundleError(
            f"{bundle} is truncated or corrupt ({err}){detail}; {len(missing)} more file(s) missing"
            + (f", first: {missing[0]}" if missing else "")
        ) from None
    if manifest is None:
        raise BundleError(f"{bundle}: no {MANIFEST} in the archive")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{bundle}: manifest format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    return manifest, got


def verify_manifest(*, manifest: Mapping[str, Any], found: Mapping[str, tuple[str, int]]) -> list[str]:
    """Problems of the files ``found`` (path -> (sha256, bytes)) against ``manifest``: a file whose sha256 differs
    (naming both hashes), a listed file that is missing, a file the manifest does not list. Empty = verified."""
    problems = []
    want = {e["path"]: e for e in manifest["files"]}
    want[manifest["config"]["path"]] = {"sha256": manifest["config"]["sha256"]}
    for path, e in want.items():
        if path not in found:
            problems.append(f"{path}: listed in the manifest (sha256 {e['sha256']}) but not in the bundle")
        elif found[path][0] != e["sha256"]:
            problems.append(f"{path}: manifest sha256 {e['sha256']}, bundle file sha256 {found[path][0]}")
    problems += [f"{p}: in the bundle but not in the manifest" for p in found if p not in want and p != MANIFEST]
    return problems


def verify_placed(*, root: str | Path) -> list[str]:
    """Re-check an imported directory against its ``bundle/manifest.json`` (upstream files at their paths,
    statistics outputs under ``bundle/recorded/``): the problems, as :func:`verify_manifest`."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    found = {}
    for e in manifest["files"]:
        p = root / (f"{RECORDED}/{e['path']}" if e["role"] == "recorded" else e["path"])
        if p.is_file():
            found[e["path"]] = (_sha256(p), p.stat().st_size)
    cfg = root / manifest["config"]["path"]
    if cfg.is_file():
        found[manifest["config"]["path"]] = (_sha256(cfg), cfg.stat().st_size)
    return verify_manifest(manifest=manifest, found=found)


def _stub_dirs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Workflow-made folders the model rules take as inputs, in DAG order: (folder, what) for hub models
    (``resources/models/<m>``) and, for embedded SAEs, the SAE's training corpus, its activations and the SAE
    (``models.<m>.sae.path``; workflow/rules/sae.smk)."""
    out = []
    for name, m in config.get("models", {}).items():
        if m.get("source") != "local":
            out.append((f"resources/models/{name}", f"model {name} ({m.get('hf_id')})"))
    for name, m in config.get("models", {}).items():
        sae = m.get("sae", {})
        if sae.get("source") == "embedded" and sae.get("path"):
            out.append((f"resources/corpus/{name}", f"embedded SAE training corpus of {name}"))
            out.append((f"resources/activations/{name}", f"embedded SAE training activations of {name}"))
            out.append((sae["path"], f"embedded SAE of {name}"))
    return out


def _set_mtime(path: Path, t: float) -> None:
    os.utime(path, (t, t), follow_symlinks=False)


def import_bundle(
    *,
    bundle: str | Path,
    into: str | Path = ".",
    snakefile: str | Path | None = None,
    record_metadata: bool = True,
    force: bool = False,
) -> dict[str, Any]:
    """Verify and unpack ``bundle`` into the workflow directory ``into``; return the manifest.

    Upstream files go to their run paths, statistics outputs to ``bundle/recorded/``, the config to
    ``bundle/config.yaml``; stub folders stand in for model and embedded-SAE weights; mtimes follow the DAG
    (``DAG_RANKS``). With ``record_metadata``, ``snakemake --touch --forcerun grade cross_judge`` (``snakefile``,
    default :func:`default_snakefile`) records the grading jobs' params so a ``judge:`` change reruns grading.

    Raises :class:`BundleError`: an unreadable or truncated bundle (naming the file being read, the manifest's and
    the bundle's sha256), files not matching the manifest (each with both sha256), files already in place (unless
    ``force``), or a failed metadata run (with Snakemake's message)."""
    import yaml

    bundle, into = Path(bundle), Path(into).resolve()
    if record_metadata:  # before any unpacking: a missing Snakefile is a usage error
        snakefile = Path(snakefile) if snakefile is not None else default_snakefile(into)
        if not snakefile.is_file():
            raise BundleError(f"--snakefile {snakefile} does not exist")
    staging = into / ".esr-bundle-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest, found = _unpack(bundle, staging)
        if problems := verify_manifest(manifest=manifest, found=found):
            raise BundleError(f"{bundle} does not match its manifest:\n  - " + "\n  - ".join(problems))
        targets = {MANIFEST: MANIFEST, manifest["config"]["path"]: manifest["config"]["path"]}
        for e in manifest["files"]:
            targets[e["path"]] = f"{RECORDED}/{e['path']}" if e["role"] == "recorded" else e["path"]
        if not force and (clash := [t for t in targets.values() if (into / t).exists()]):
            raise BundleError(
                f"{len(clash)} file(s) already exist in {into} (first: {clash[0]}); import into a fresh clone "
                "or pass --force"
            )
        for src, dest in targets.items():
            (into / dest).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / src, into / dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    for d in manifest.get("empty_dirs", []):
        (into / _safe_member(d)).mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((into / manifest["config"]["path"]).read_text(encoding="utf-8")) or {}
    stubs = []
    for folder, what in _stub_dirs(config):
        d = into / folder
        if not d.exists():
            d.mkdir(parents=True)
            note = {"stub": True, "what": what, "why": "not shipped in the results bundle (weights never are)"}
            (d / STUB_MARKER).write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
            stubs.append(folder)
    # mtimes in DAG order: inputs and stubs oldest, then each rank one second later, all in the past
    t0 = time.time() - 100
    for k, folder in enumerate(stubs):
        _set_mtime(into / folder / STUB_MARKER, t0 - len(stubs) + k)
        _set_mtime(into / folder, t0 - len(stubs) + k)
    dirs: dict[Path, float] = {}
    for e in manifest["files"]:
        if e["role"] == "upstream":
            t = t0 + 1 + dag_rank(e["path"])
            _set_mtime(into / e["path"], t)
            for parent in PurePosixPath(e["path"]).parents:
                if str(parent) != "." and ".zarr" in str(parent):
                    dirs[into / parent] = max(dirs.get(into / parent, 0.0), t)
    for d, t in sorted(dirs.items(), key=lambda kv: -len(kv[0].parts)):
        _set_mtime(d, t)
    if record_metadata:
        record_grading_metadata(root=into, manifest=manifest, snakefile=snakefile)
        # the touch run made the trials tables newest: exp9's shipped outputs stay after them (not recomputed)
        t1 = time.time()
        for e in manifest["files"]:
            if e["role"] == "upstream" and dag_rank(e["path"]) == 10:
                _set_mtime(into / e["path"], t1)
        for d in sorted(dirs, key=lambda p: -len(p.parts)):
            if "results/exp9/" in d.as_posix():
                _set_mtime(d, t1)
    return manifest


def default_snakefile(into: str | Path | None = None) -> Path:
    """The ``Snakefile`` that records the grading metadata: ``<into>/Snakefile`` (the clone a bundle is imported
    into), else the one of the checkout this package runs from (:data:`esr.config.CHECKOUT_ROOT`). Raises
    :class:`BundleError` when neither exists (an installed wheel outside a clone): pass ``snakefile``."""
    from esr.config import CHECKOUT_ROOT

    candidates = [Path(into) / "Snakefile"] if into is not None else []
    candidates += [CHECKOUT_ROOT / "Snakefile"] if CHECKOUT_ROOT is not None else []
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates) or "no checkout (an installed package)"
    raise BundleError(
        f"no Snakefile to record the grading metadata with (looked in: {looked}); import into a clone of the "
        "workflow, pass --snakefile, or --no-metadata"
    )


def record_grading_metadata(
    *, root: str | Path, manifest: Mapping[str, Any], snakefile: str | Path | None = None, cores: int = 1
) -> None:
    """Run ``snakemake --touch --forcerun grade cross_judge`` on the shipped trials tables in ``root``: Snakemake
    touches the graded shards and gathered tables in DAG order and records their params (a ``judge:`` change then
    reruns them). Raises :class:`BundleError` with Snakemake's output when it fails."""
    root = Path(root)
    targets = sorted(
        e["path"]
        for e in manifest["files"]
        if e["role"] == "upstream" and fnmatch.fnmatch(e["path"], "results/*/*/trials.parquet")
    )
    if not targets:
        return
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(snakefile or default_snakefile(root)),
        "--directory",
        str(root),
        "--configfile",
        str(root / manifest["config"]["path"]),
        "--cores",
        str(cores),
        "--touch",
        "--forcerun",
        "grade",
        "cross_judge",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plan = subprocess.run([*cmd, "-n", "--", *targets], cwd=root, capture_output=True, text=True, env=env)
    if plan.returncode != 0:
        raise BundleError(f"planning the metadata run failed ({' '.join(cmd)} -n):\n{plan.stderr[-3000:]}")
    if upstream := sorted(set(re.findall(r"^rule (\w+):", plan.stdout, re.MULTILINE)) & set(MODEL_RULES)):
        run_code = (manifest.get("run", {}).get("git") or {}).get("commit")
        raise BundleError(
            f"this checkout's workflow would rerun {', '.join(upstream)} on the bundle's results (its DAG differs "
            f"from the one that made them); check out the code version that made them ({run_code})"
        )
    res = subprocess.run([*cmd, "--", *targets], cwd=root, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise BundleError(f"recording Snakemake metadata failed ({' '.join(cmd)}):\n{res.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------------ report
def imported_manifest(root: str | Path = ".") -> dict[str, Any] | None:
    """The manifest of the bundle imported into ``root`` (``bundle/manifest.json``), or None."""
    p = Path(root) / MANIFEST
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if k in ("provenance", "created_utc"):
                continue
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            key = v.get("cell") or v.get("id") if isinstance(v, Mapping) else None
            out |= _flatten(v, f"{prefix}[{key if key is not None else i}]")
        return out
    return {prefix: obj}


def compare_recorded(*, root: str | Path, paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Differences between recomputed JSON files (``paths``, relative to ``root``) and the copies recorded in the
    imported bundle (``bundle/recorded/<path>``), provenance and timestamps ignored: one dict per differing value
    (``path``, ``key``, ``recorded``, ``recomputed``); a recorded file with no recomputed file (or the reverse) is
    one entry with key None. Files the bundle did not record are skipped."""
    root = Path(root)
    diffs: list[dict[str, Any]] = []
    for p in paths:
        rel = Path(p).resolve().relative_to(root.resolve()).as_posix() if Path(p).is_absolute() else Path(p).as_posix()
        rec, new = root / RECORDED / rel, root / rel
        if not rec.is_file():
            continue
        if not new.is_file():
            diffs.append({"path": rel, "key": None, "recorded": "present", "recomputed": "missing"})
            continue
        a = _flatten(json.loads(rec.read_text(encoding="utf-8")))
        b = _flatten(json.loads(new.read_text(encoding="utf-8")))
        for key in sorted(set(a) | set(b)):
            if a.get(key, "<absent>") != b.get(key, "<absent>"):
                diffs.append({"path": rel, "key": key, "recorded": a.get(key, "<absent>"), "recomputed": b.get(key)})
    return diffs


def provenance_lines(manifest: Mapping[str, Any]) -> list[str]:
    """Markdown lines: who made the bundle (code version, config hash, machine, date) and what was not shipped."""
    run, exp, cfg = manifest.get("run", {}), manifest.get("exported_by", {}), manifest.get("config", {})
    git = run.get("git") or {}
    lines = [
        f"- results made by code {git.get('commit')} (dirty: {git.get('dirty')}) on {run.get('platform')}, "
        f"{run.get('created_utc')}",
        f"- bundle exported by code {exp.get('commit')} (esr {exp.get('esr')}, source sha256 "
        f"{str(exp.get('source_sha256'))[:12]}) on {manifest.get('machine', {}).get('hostname')} "
        f"({manifest.get('machine', {}).get('platform')}), {manifest.get('created_utc')}",
        f"- config {cfg.get('source')} (run '{cfg.get('run_name')}'), config hash {cfg.get('config_sha256')}",
        f"- {manifest.get('totals', {}).get('files')} files, {manifest.get('totals', {}).get('bytes')} bytes; "
        f"{len(manifest.get('not_shipped', []))} left out (weights, logs, caches outside the run)",
        "- exp9 (sequential activations) replays answers through the model: shipped, not recomputed",
    ]
    return lines
