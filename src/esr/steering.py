"""WHERE STEERING HAPPENS. The three interventions of the paper, as forward hooks on decoder-layer outputs.

Given a batch in which row ``i`` carries an :class:`Intervention` (or ``None``), the hooks installed by
``apply_interventions`` change the output ``h`` of decoder block ``L`` (HF ``model.model.layers[L]``, i.e.
``hidden_states[L+1]``, TransformerLens ``blocks.L.hook_resid_post``) on every forward pass:

1. **ablate** (at ``plan.ablation_layer``, default the injection layer, as the authors' engine):
   ``h -= sum_{j in S_i} f_j(h) * W_dec[j]`` with ``f = sae.encode(h)`` computed from the *pre-steering* ``h``;
   the SAE error term is kept. See ``ablation_delta``.
2. **steer** (at ``plan.injection_layer``): ``h += c_i * W_dec[latent_i]`` where ``c_i`` is the boost converted by
   ``esr.sae.SteeringDirections`` (raw or multiples of the median residual norm). Applied at every position (prompt
   and generated, as the authors did) or, with ``positions="generated"``, only at the positions whose output
   predicts a generated token (the last prompt position, then each decode step). See ``steer_rows``.
3. **capture** (at ``plan.sae_layer``, after 1-2 if it is the same layer): ``sae.encode(h)[..., capture_i]`` per
   token, stored per forward pass in ``InterventionHooks.captured``.

Rows without an intervention are never modified (bit-identical). The order inside one layer is ablate -> steer ->
capture. Hooks accept Tensor outputs (transformers 5) and tuple outputs (transformers 4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from esr.sae import SteeringDirections


@dataclass(frozen=True)
class Intervention:
    """What is done to one batch row during generation.

    ``steer_latent``/``boost``: add ``boost * W_dec[steer_latent]`` at the injection layer (boost in the unit the
    model config names: raw SAE activation units, or multiples of the median residual norm, converted before use).
    ``ablate``: latents whose reconstruction contribution ``f_j(h) * W_dec[j]`` is removed (SAE error kept).
    ``capture``: latents whose SAE activations are recorded per token at the SAE layer."""

    steer_latent: int | None = None
    boost: float = 0.0
    ablate: tuple[int, ...] = ()
    capture: tuple[int, ...] = ()


Positions = Literal["all", "generated"]


@dataclass(frozen=True)
class SteeringPlan:
    """Which layers the interventions act on. ``sae_layer`` is where activations are read (the SAE's training
    layer); ``injection_layer`` where the steering vector is added; ``ablation_layer`` defaults to the injection
    layer (the authors' engine ablates there, with the SAE-layer encoder)."""

    injection_layer: int
    sae_layer: int
    ablation_layer: int | None = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if self.positions not in ("all", "generated"):
            raise ValueError(f"steering positions {self.positions!r} must be 'all' or 'generated'")

    @property
    def ablate_at(self) -> int:
        return self.injection_layer if self.ablation_layer is None else self.ablation_layer

    def check(self, n_layers: int) -> None:
        for name, layer in (
            ("injection_layer", self.injection_layer),
            ("sae_layer", self.sae_layer),
            ("ablation_layer", self.ablate_at),
        ):
            if not 0 <= layer < n_layers:
                raise ValueError(f"{name} {layer} is outside the model's {n_layers} layers")


# ----------------------------------------------------------------------------------------------------------------
# The math (pure functions on tensors)
# ----------------------------------------------------------------------------------------------------------------


def encode(sae, h: torch.Tensor) -> torch.Tensor:
    """SAE activations ``f(h)`` ([..., d_sae]) computed in the SAE's dtype."""
    return sae.encode(h.to(sae.W_dec.dtype))


def ablation_delta(sae, h: torch.Tensor, latents: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """The reconstruction contribution to remove: ``sum_j mask[r, j] * f_j(h[r]) * W_dec[latents[j]]``.

    ``h``: [R, T, D]; ``latents``: [U] union of ablated latents; ``row_mask``: [R, U] (1 where row r ablates
    latents[j]). Returns [R, T, D] in ``h``'s dtype."""
    f = encode(sae, h)[..., latents]  # [R, T, U]
    f = f * row_mask[:, None, :].to(f.dtype)
    return (f @ sae.W_dec[latents]).to(h.dtype)


def steer_rows(
    h: torch.Tensor, rows: torch.Tensor, vectors: torch.Tensor, positions: Positions, all_rows: bool = False
) -> torch.Tensor:
    """``h`` with ``vectors[k]`` added to row ``rows[k]`` (all positions, or only the last one of a multi-token
    forward when ``positions == 'generated'``). Returns a new tensor; other rows are untouched.
    ``all_rows``: the caller guarantees ``rows == arange(B)`` (fast path, no indexing)."""
    if all_rows and positions == "all":
        return h + vectors[:, None, :]
    out = h.clone()
    if positions == "generated" and h.shape[1] > 1:
        out[rows, -1:] = h[rows, -1:] + vectors[:, None, :]
    else:
        out[rows] = h[rows] + vectors[:, None, :]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Per-batch tensors and the hooks
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class BatchInterventions:
    """The per-row interventions of one batch, as index tensors on the model's device."""

    steer_rows: torch.Tensor  # [Rs] row indices
    steer_vectors: torch.Tensor  # [Rs, D] model dtype
    ablate_rows: torch.Tensor  # [Ra]
    ablate_latents: torch.Tensor  # [U]
    ablate_mask: torch.Tensor  # [Ra, U]
    capture_rows: torch.Tensor  # [Rc]
    capture_latents: torch.Tensor  # [C] union, in order of first appearance
    capture_columns: list[list[int]]  # per batch row: columns into capture_latents (empty if none)
    n_rows: int = 0  # batch size the interventions were built for
    steer_all: bool = False  # every row of the batch is steered (steer_rows == arange(B))

    @classmethod
    def build(
        cls,
        interventions: Sequence[Intervention | None],
        directions: SteeringDirections | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> BatchInterventions:
        rows = list(interventions)
        needs_sae = any(iv is not None and (iv.steer_latent is not None or iv.ablate or iv.capture) for iv in rows)
        if needs_sae and directions is None:
            raise ValueError("interventions need an SAE (steer/ablate/capture) but no SteeringDirections was given")
        steer_idx: list[int] = []
        vectors: list[torch.Tensor] = []
        ablate_idx: list[int] = []
        ablate_union: dict[int, int] = {}
        capture_idx: list[int] = []
        capture_union: dict[int, int] = {}
        capture_columns: list[list[int]] = []
        for i, iv in enumerate(rows):
            cols: list[int] = []
            if iv is not None:
                if iv.steer_latent is not None and iv.boost != 0:
                    steer_idx.append(i)
                    vectors.append(directions.vector(iv.steer_latent, iv.boost))
                if iv.ablate:
                    ablate_idx.append(i)
                    for j in iv.ablate:
                        ablate_union.setdefault(directions.check_latent(j), len(ablate_union))
                if iv.capture:
                    capture_idx.append(i)
                    for j in iv.capture:
                        cols.append(capture_union.setdefault(directions.check_latent(j), len(capture_union)))
            capture_columns.append(cols)
        mask = torch.zeros(len(ablate_idx), len(ablate_union), device=device)
        for r, i in enumerate(ablate_idx):
            for j in rows[i].ablate:
                mask[r, ablate_union[j]] = 1.0
        d = directions.d_in if directions is not None else 0

        def idx(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long, device=device)

        return cls(
            steer_rows=idx(steer_idx),
            steer_vectors=(
                torch.stack(vectors).to(device=device, dtype=dtype)
                if vectors
                else torch.zeros(0, d, device=device, dtype=dtype)
            ),
            ablate_rows=idx(ablate_idx),
            ablate_latents=idx(ablate_union),
            ablate_mask=mask,
            capture_rows=idx(capture_idx),
            capture_latents=idx(capture_union),
            capture_columns=capture_columns,
            n_rows=len(rows),
            steer_all=steer_idx == list(range(len(rows))) and len(rows) > 0,
        )

    @property
    def any_steer(self) -> bool:
        return self.steer_rows.numel() > 0

    @property
    def any_ablate(self) -> bool:
        return self.ablate_rows.numel() > 0

    @property
    def any_capture(self) -> bool:
        return self.capture_rows.numel() > 0


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, h: torch.Tensor) -> Any:
    return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


class InterventionHooks:
    """Installs the hooks for one batch (use ``apply_interventions``). After each forward pass at the SAE layer,
    ``captured`` gets a [B, T, C] tensor (rows without capture are zero; C = ``batch.capture_latents``)."""

    def __init__(
        self, layers: torch.nn.ModuleList, batch: BatchInterventions, plan: SteeringPlan, sae: Any | None
    ) -> None:
        plan.check(len(layers))
        self.layers = layers
        self.batch = batch
        self.plan = plan
        self.sae = sae
        self.captured: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _layer_ops(self) -> dict[int, tuple[bool, bool, bool]]:
        ops: dict[int, list[bool]] = {}
        if self.batch.any_ablate:
            ops.setdefault(self.plan.ablate_at, [False, False, False])[0] = True
        if self.batch.any_steer:
            ops.setdefault(self.plan.injection_layer, [False, False, False])[1] = True
        if self.batch.any_capture:
            ops.setdefault(self.plan.sae_layer, [False, False, False])[2] = True
        return {layer: (a, s, c) for layer, (a, s, c) in ops.items()}

    def _make_hook(self, ablate: bool, steer: bool, capture: bool):
        b, plan = self.batch, self.plan

        def hook(module, args, output):
            h = _hidden(output)
            if h.shape[0] != b.n_rows:
                raise ValueError(f"forward batch has {h.shape[0]} rows but {b.n_rows} interventions were given")
            new = h
            if ablate:
                delta = ablation_delta(self.sae, h[b.ablate_rows], b.ablate_latents, b.ablate_mask)
                new = new.clone()
                new[b.ablate_rows] = new[b.ablate_rows] - delta
            if steer:
                new = steer_rows(new, b.steer_rows, b.steer_vectors, plan.positions, b.steer_all)
            if capture:
                f = encode(self.sae, new[b.capture_rows])[..., b.capture_latents]
                full = torch.zeros(h.shape[0], h.shape[1], f.shape[-1], dtype=f.dtype, device=f.device)
                full[b.capture_rows] = f
                self.captured.append(full.detach())
            return output if new is h else _replace_hidden(output, new)

        return hook

    def install(self) -> InterventionHooks:
        for layer, (a, s, c) in sorted(self._layer_ops().items()):
            self._handles.append(self.layers[layer].register_forward_hook(self._make_hook(a, s, c)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@contextlib.contextmanager
def apply_interventions(
    model: torch.nn.Module,
    interventions: Sequence[Intervention | None],
    directions: SteeringDirections | None,
    plan: SteeringPlan,
) -> Iterator[InterventionHooks]:
    """Within the block, every forward pass of ``model`` (an HF causal LM, or ``engine.module``) applies row ``i``'s
    intervention to batch row ``i``. The batch size of each forward must equal ``len(interventions)``."""
    from esr.models import decoder_layers

    layers = decoder_layers(model)
    param = next(model.parameters())
    batch = BatchInterventions.build(interventions, directions, param.device, param.dtype)
    sae = directions.sae if directions is not None else None
    if sae is not None and sae.W_dec.device != param.device:
        raise ValueError(
            f"SAE is on {sae.W_dec.device} but the model is on {param.device}; load it with device={param.device}"
        )
    hooks = InterventionHooks(layers, batch, plan, sae).install()
    try:
        yield hooks
    finally:
        hooks.remove()
