"""How a settings dataclass says its flat form, and the checks its fields share.

A field's flat key (its Tune config key and MLflow param) is its name unless `flat_field` says
otherwise; `flat_key(Spec, "rank")` gives it, so code that names one setting (a search space,
a table) derives the key from the dataclass instead of spelling it again. Stdlib only: the
method files (`methods/`) and the trial contract (`contract.config`) both build on it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import field
from typing import Any

from contract.errors import ConfigError

# Where an adapter can sit in a transformer block: q, k and v (slices of timm's fused qkv, or
# Linears of their own), the attention's output projection, and the MLP's two Linears.
TARGETS: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")


def require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


def flat_field(name: str, encode: Callable[[Any], Any] | None = None,
               decode: Callable[[Any], Any] | None = None, **kwargs) -> Any:
    """A field whose flat (Tune config, MLflow param) key or form differs from its own."""
    return field(metadata={"flat": name, "encode": encode, "decode": decode}, **kwargs)


def flat_fields(cls) -> dict[str, dataclasses.Field]:
    """A spec's fields by flat key."""
    return {f.metadata.get("flat", f.name): f for f in dataclasses.fields(cls)}


def flat_key(cls, name: str) -> str:
    """The flat key of field `name` of spec `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("flat", f.name)
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def kind_of(hint: Any) -> type:
    """The value type of a field annotation: int for `int`, float for `float | None`, ..."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def check_rank(name: str, value: object) -> None:
    """Ranks and counts: an int >= 1 (True is not 1)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")


def check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")


def check_fraction(name: str, value: object) -> None:
    """A dropout-like value in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def join_targets(targets: Iterable[str]) -> str:
    """('q', 'v') -> 'q+v': targets travel as one string so they log as one param."""
    return "+".join(targets)


def parse_targets(text: str | tuple[str, ...]) -> tuple[str, ...]:
    """'q+v' -> ('q', 'v')."""
    parts = tuple(text) if isinstance(text, tuple) else tuple(p for p in str(text).split("+") if p)
    unknown = [p for p in parts if p not in TARGETS]
    require(bool(parts) and not unknown, "targets",
            f"{text!r} is not a '+'-joined subset of {TARGETS}")
    return parts


def canonical_targets(targets: Iterable[str], what: str = "lora targets") -> tuple[str, ...]:
    """Validate targets and sort them into ``TARGETS`` order, so equal specs compare equal."""
    if isinstance(targets, str) or not isinstance(targets, Iterable):
        raise ConfigError(f"{what} must be a list of names from {list(TARGETS)}, got {targets!r}")
    targets = tuple(targets)
    if not targets:
        raise ConfigError(f"{what} must not be empty; choose from {list(TARGETS)}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown {what} {unknown}; choose from {list(TARGETS)}")
    duplicates = sorted({t for t in targets if targets.count(t) > 1}, key=TARGETS.index)
    if duplicates:
        raise ConfigError(f"{what} list {duplicates} more than once; list each target once")
    return tuple(t for t in TARGETS if t in targets)
