"""Rule bodies: one function per Snakemake rule, named after the rule, in the module named after its rule file.

=================================  ======================================
``workflow/rules/assets.smk``      ``esr.stages.assets``
``workflow/rules/sae.smk``         ``esr.stages.sae``
``workflow/rules/experiments.smk`` ``esr.stages.experiments``
``workflow/rules/stats.smk``       ``esr.stages.stats``
``workflow/rules/finetune.smk``    ``esr.stages.finetune``
=================================  ======================================

Every stage function takes keyword-only arguments and writes its outputs atomically with provenance; it can be
called from Python and tested without Snakemake. Each ``workflow/scripts/<rule>.py`` is one call,
``run_rule(<rule function>, snakemake)``, which binds the rule's named inputs, outputs, params and wildcards to the
function's parameters **by name** (so the rule is the function's call site), sends logging to the rule's log and
sets torch's thread count (``OMP_NUM_THREADS`` when torch is not loaded yet).

Stages that load the model are marked :func:`model_stage`: for a model with ``tensor_parallel`` > 1 calling one
launches the ranks (``esr.distributed.run_ranks``), each of which runs the same function.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from esr.distributed import plain, run_ranks
from esr.ranks import world_size

log = logging.getLogger("esr")
F = TypeVar("F", bound=Callable[..., Any])


class RuleBindingError(TypeError):
    """A rule's named inputs/outputs/params/wildcards do not match its stage function's parameters."""


@contextlib.contextmanager
def stage_logging(log_path: str | Path | None, threads: int | None = None) -> Iterator[None]:
    """Send the stage's logging (and warnings) to ``log_path`` and stderr; set torch's thread count."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers, force=True
    )
    logging.captureWarnings(True)
    if threads:
        if "torch" in sys.modules:  # already loaded by the stage's module: this import is free
            import torch

            torch.set_num_threads(threads)
        else:  # a stage that loads torch later (or never: CPU-only stages) sizes its pool from this at first use
            os.environ["OMP_NUM_THREADS"] = str(threads)
    start = time.time()
    try:
        yield
    except Exception:
        log.exception("stage failed")
        raise
    finally:
        log.info("stage finished in %.1f s", time.time() - start)


def model_stage(fn: F) -> F:
    """Mark a stage that loads the model: with ``spec.tensor_parallel`` > 1 (and not already inside a rank) the call
    runs ``fn`` as that many ranks (``esr.distributed.run_ranks``); otherwise it is a plain call."""

    @functools.wraps(fn)
    def stage(**kwargs: Any) -> Any:
        tp = int(kwargs["spec"].tensor_parallel)
        if tp == 1 or world_size() > 1:
            return fn(**kwargs)
        run_ranks(stage, kwargs, tp)
        return None

    return stage  # type: ignore[return-value]


def bind_rule(fn: Callable[..., Any], smk: Any) -> dict[str, Any]:
    """The keyword arguments of ``fn`` from a Snakemake job (``snakemake`` inside a script): each parameter is
    looked up by name among the job's named outputs, inputs, params and wildcards (a name in two of them is an
    error), converted to plain str/list/dict, and to ``int`` where the parameter is annotated ``int``. A
    ``**kwargs`` parameter receives the named inputs no other parameter takes.

    Raises ``RuleBindingError`` naming the rule and the parameter when a required parameter has no value, or when
    a named output or param is not a parameter of ``fn`` (every output must be written, every param used)."""
    rule = getattr(smk, "rule", fn.__name__)
    sources = {kind: _named(getattr(smk, kind, None)) for kind in ("output", "input", "params", "wildcards")}
    sig = inspect.signature(fn, eval_str=True)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    kwargs: dict[str, Any] = {}
    for name, par in sig.parameters.items():
        if par.kind is par.VAR_KEYWORD:
            continue
        found = [kind for kind, values in sources.items() if name in values]
        if len(found) > 1:
            raise RuleBindingError(f"rule {rule}: {name!r} is named in both {found[0]} and {found[1]}")
        if not found:
            if par.default is par.empty:
                raise RuleBindingError(
                    f"rule {rule}: {fn.__module__}.{fn.__qualname__} needs {name!r}, which the "
                    "rule names in none of output, input, params, wildcards"
                )
            continue
        value = plain(sources[found[0]][name])
        if par.annotation is int and isinstance(value, str):
            value = int(value)
        kwargs[name] = value
    for kind in ("output", "params"):
        unused = [k for k in sources[kind] if k not in kwargs]
        if unused:
            raise RuleBindingError(
                f"rule {rule}: {kind} {', '.join(map(repr, unused))} is not a parameter of "
                f"{fn.__module__}.{fn.__qualname__}"
            )
    if var_kw:
        kwargs.update({k: plain(v) for k, v in sources["input"].items() if k not in kwargs})
    return kwargs


def _named(namedlist: Any) -> dict[str, Any]:
    if namedlist is None:
        return {}
    return {k: v for k, v in namedlist.items()}


def run_rule(fn: Callable[..., Any], smk: Any) -> Any:
    """The one call of every ``workflow/scripts/<rule>.py``: ``fn(**bind_rule(fn, smk))`` with the job's log file
    and thread count (a binding error is logged there too)."""
    with stage_logging(smk.log[0] if len(smk.log) else None, getattr(smk, "threads", None)):
        return fn(**bind_rule(fn, smk))
