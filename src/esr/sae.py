"""SAE loading through sae-lens, and the conversion of a *boost* into a residual-stream steering vector.

Loading (``load_sae``):

- ``sae.source: sae_lens``       -> ``SAE.from_pretrained(release, sae_id)`` (GemmaScope, Goodfire, ...);
  offline runs need a pre-populated ``HF_HOME`` and ``HF_HUB_OFFLINE=1``.
- ``sae.source: local|embedded`` -> ``SAE.load_from_disk(path)`` (a folder with ``cfg.json`` +
  ``sae_weights.safetensors``, as written by ``sae.save_model``). The embedded SAE is trained by the ``train_sae`` rule
  (``esr.sae_training``); this module only loads it.

Boost units (``SteeringDirections``), always recorded next to the boost in results:

- ``raw``:               vector = boost * W_dec[j]. For Goodfire SAEs the decoder rows are *not* unit norm, so the
  residual-space length is ``boost * ||W_dec[j]||``; for GemmaScope (unit rows) a boost is an L2 length.
- ``median_resid_norm``: vector = boost * median_norm * W_dec[j] / ||W_dec[j]||, i.e. the boost is a multiple of the
  median residual-stream norm at the injection layer. ``median_norm`` comes from ``<sae dir>/esr_stats.json`` (key
  ``median_resid_norm``, written by the embedded-SAE rule) or is passed explicitly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esr.config import CHECKOUT_ROOT, ModelSpec, SAESpec

BOOST_UNITS = ("raw", "median_resid_norm")
STATS_FILE = "esr_stats.json"
MEDIAN_NORM_KEY = "median_resid_norm"


def resolve_path(path: str | Path, root: str | Path | None = None) -> Path:
    """A config path: absolute as is; relative against ``root`` if given, else the cwd when it exists there, else
    the checkout's root (:data:`esr.config.CHECKOUT_ROOT`, running from a source tree). An installed wheel has no
    checkout: the path stays relative to the cwd, so a missing file's error names the path as configured."""
    p = Path(path)
    if p.is_absolute():
        return p
    if root is not None:
        return Path(root) / p
    if p.exists() or CHECKOUT_ROOT is None:
        return p
    return CHECKOUT_ROOT / p


def load_sae(spec: SAESpec, device: str | torch.device = "cpu", dtype: str = "float32", root: str | Path | None = None):
    """Load the SAE named by ``spec`` (a ``sae_lens.SAE``), in eval mode on ``device``."""
    from sae_lens import SAE

    if spec.source == "sae_lens":
        if not (spec.release and spec.sae_id):
            raise ValueError(f"SAE spec {spec.ident!r}: source 'sae_lens' needs release and sae_id")
        sae = SAE.from_pretrained(spec.release, spec.sae_id, device=str(device), dtype=dtype)
    elif spec.source in ("local", "embedded"):
        if not spec.path:
            raise ValueError(f"SAE spec with source {spec.source!r} has no path")
        path = resolve_path(spec.path, root)
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(
                f"no SAE at {str(path)!r} (expected cfg.json + sae_weights.safetensors; sae.source={spec.source!r})"
            )
        sae = SAE.load_from_disk(str(path), device=str(device), dtype=dtype)
    else:
        raise ValueError(f"unknown sae.source {spec.source!r}; use sae_lens, local or embedded")
    return sae.eval()


def read_median_resid_norm(sae_dir: str | Path) -> float:
    """``median_resid_norm`` from ``<sae_dir>/esr_stats.json``."""
    path = Path(sae_dir) / STATS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: boost_unit 'median_resid_norm' needs the median "
            "residual norm (pass it explicitly or write that file)"
        )
    with open(path, encoding="utf-8") as f:
        stats = json.load(f)
    if MEDIAN_NORM_KEY not in stats:
        raise KeyError(f"{str(path)!r} has no key {MEDIAN_NORM_KEY!r} (keys: {sorted(stats)})")
    value = float(stats[MEDIAN_NORM_KEY])
    if not value > 0:
        raise ValueError(f"{str(path)!r}: {MEDIAN_NORM_KEY} = {value} must be positive")
    return value


@dataclass(frozen=True, eq=False)
class SteeringDirections:
    """An SAE plus the unit its boosts are expressed in: turns (latent, boost) into a residual-space vector."""

    sae: Any  # sae_lens.SAE
    boost_unit: str = "raw"
    median_resid_norm: float | None = None

    def __post_init__(self) -> None:
        if self.boost_unit not in BOOST_UNITS:
            raise ValueError(f"boost_unit {self.boost_unit!r} is not one of {BOOST_UNITS}")
        if self.boost_unit == "median_resid_norm" and not (self.median_resid_norm and self.median_resid_norm > 0):
            raise ValueError(
                f"boost_unit 'median_resid_norm' needs a positive median_resid_norm, got {self.median_resid_norm!r}"
            )

    @property
    def d_sae(self) -> int:
        return int(self.sae.W_dec.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.sae.W_dec.shape[1])

    def check_latent(self, latent: int) -> int:
        if not 0 <= int(latent) < self.d_sae:
            raise ValueError(f"latent {latent} is outside the SAE's {self.d_sae} latents")
        return int(latent)

    def decoder_row(self, latent: int) -> torch.Tensor:
        return self.sae.W_dec[self.check_latent(latent)].detach()

    def coefficient(self, latent: int, boost: float) -> float:
        """The multiplier c such that the added vector is c * W_dec[latent]."""
        if self.boost_unit == "raw":
            return float(boost)
        norm = float(self.decoder_row(latent).float().norm())
        if norm == 0:
            raise ValueError(f"latent {latent} has a zero decoder row; it cannot be steered")
        return float(boost) * float(self.median_resid_norm) / norm

    def vector(self, latent: int, boost: float) -> torch.Tensor:
        """The residual-space steering vector (SAE dtype and device)."""
        return self.coefficient(latent, boost) * self.decoder_row(latent)

    def residual_norm(self, latent: int, boost: float) -> float:
        """L2 length of the added vector in residual space."""
        return abs(self.coefficient(latent, boost)) * float(self.decoder_row(latent).float().norm())

    def describe(self, latent: int | None, boost: float) -> dict[str, Any]:
        """What a result record should carry so the boost's unit is explicit."""
        out: dict[str, Any] = {
            "boost": float(boost),
            "boost_unit": self.boost_unit,
            "median_resid_norm": self.median_resid_norm,
        }
        if latent is not None:
            out["steer_coefficient"] = self.coefficient(latent, boost)
            out["steer_residual_norm"] = self.residual_norm(latent, boost)
        return out


def steering_directions(
    spec: ModelSpec, sae, median_resid_norm: float | None = None, root: str | Path | None = None
) -> SteeringDirections:
    """``SteeringDirections`` for a model spec; reads the median norm from the SAE dir when the unit needs it and it
    was not passed."""
    unit = spec.sae.boost_unit
    if unit == "median_resid_norm" and median_resid_norm is None:
        if not spec.sae.path:
            raise ValueError(
                f"model {spec.name!r}: boost_unit 'median_resid_norm' needs median_resid_norm or an "
                "SAE path holding esr_stats.json"
            )
        median_resid_norm = read_median_resid_norm(resolve_path(spec.sae.path, root))
    return SteeringDirections(sae=sae, boost_unit=unit, median_resid_norm=median_resid_norm)
