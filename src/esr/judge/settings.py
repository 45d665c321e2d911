"""Resolved judge settings and the part of them that enters the judge cache key.

Every judge runs from one frozen settings dataclass (``Judge.settings``) and its cache key is derived from that same
object: all fields are in the key unless a field is explicitly marked ``not_in_key(why)`` (transport-only values such
as timeouts, retry budgets, rate limits and the *name* of the API-key variable, which can change whether a call
succeeds but never the score of a verdict that is stored). A setting added later is therefore in the key by default;
leaving it out takes a written reason. Nested settings dataclasses are handled recursively."""

from __future__ import annotations

import dataclasses
from typing import Any

_NOT_IN_KEY = "esr_not_in_cache_key"


def not_in_key(why: str, **kwargs: Any) -> Any:
    """A dataclass ``field`` kept out of the judge cache key; ``why`` says why it cannot change a stored score."""
    if not why:
        raise ValueError("not_in_key needs a reason")
    metadata = {**kwargs.pop("metadata", {}), _NOT_IN_KEY: why}
    return dataclasses.field(metadata=metadata, **kwargs)


def in_key(field: dataclasses.Field) -> bool:
    """Whether a settings field is part of the cache key."""
    return _NOT_IN_KEY not in field.metadata


def key_fields(settings: Any) -> dict[str, Any]:
    """The cache-key view of a settings dataclass: every field not marked ``not_in_key``, recursing into nested
    dataclasses; other values are taken as they are (they must be JSON-able for ``esr.io.stable_hash``). The
    dataclass type name is included, so two judge kinds with equal fields never share a key."""
    if not dataclasses.is_dataclass(settings) or isinstance(settings, type):
        raise TypeError(f"judge settings must be a dataclass instance, got {type(settings).__name__}")
    out: dict[str, Any] = {"settings_type": type(settings).__name__}
    for f in dataclasses.fields(settings):
        if in_key(f):
            value = getattr(settings, f.name)
            out[f.name] = key_fields(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value
