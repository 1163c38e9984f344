"""Shared by the group modules (no YAML group): the `opt` field helper, the `_require*` checks, `Dtype`."""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import field
from typing import Any


def opt(default: Any, help: str, choices: tuple[Any, ...] = ()) -> Any:
    """A config field with its one-line description (`help`, shown in docs/config.md).

    `default` may be a value, MISSING (required), a list/dict (copied per instance), a dataclass
    type (a fresh instance per config) or a dataclass instance (copied per config). `choices` lists the allowed values of a non-enum field
    (`slime.core.validation.validate` checks them); an enum-typed field's choices are its members.
    """
    meta = {"help": help, "choices": choices}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    if dataclasses.is_dataclass(default):  # an instance: a copy per config
        instance = copy.deepcopy(default)
        return field(default_factory=lambda: copy.deepcopy(instance), metadata=meta)
    if isinstance(default, list | dict):
        frozen = copy.deepcopy(default)
        return field(default_factory=lambda: copy.deepcopy(frozen), metadata=meta)
    return field(default=default, metadata=meta)


# model.dtype and trainer.dtype both take it: it lives here so neither group module imports the other.
class Dtype(enum.StrEnum):
    auto = "auto"  # bfloat16 where the hardware computes it natively, else float32
    bfloat16 = "bfloat16"
    float32 = "float32"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _require_positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value > 0, f"{prefix}.{name} must be > 0, got {value}")


def _require_non_negative(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value >= 0, f"{prefix}.{name} must be >= 0, got {value}")
