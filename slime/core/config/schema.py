"""The top level (configs/config.yaml): `SlimeConfig`, key introspection, the Hydra schema registration."""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from slime.core.config.algorithm import AlgorithmConfig
from slime.core.config.buffer import BufferConfig
from slime.core.config.env import EnvConfig
from slime.core.config.eval import EvalConfig
from slime.core.config.fields import opt
from slime.core.config.logger import LoggerConfig
from slime.core.config.model import ModelConfig
from slime.core.config.ray import RayConfig
from slime.core.config.rollout import RolloutConfig
from slime.core.config.trainer import TrainerConfig
from slime.core.config.weights import WeightsConfig


@dataclass
class SlimeConfig:
    """The whole run."""

    model: ModelConfig = opt(MISSING, "the policy (configs/model/)")
    env: EnvConfig = opt(EnvConfig, "the environment (configs/env/)")
    rollout: RolloutConfig = opt(RolloutConfig, "rollout workers")
    trainer: TrainerConfig = opt(TrainerConfig, "trainer ranks")
    algorithm: AlgorithmConfig = opt(MISSING, "the RL objective (configs/algorithm/)")
    buffer: BufferConfig = opt(BufferConfig, "replay buffer")
    logger: LoggerConfig = opt(LoggerConfig, "metrics sinks")
    ray: RayConfig = opt(RayConfig, "Ray cluster")
    eval: EvalConfig = opt(EvalConfig, "evaluation during training")
    weights: WeightsConfig = opt(WeightsConfig, "weight pushes to the engines")
    seed: int = opt(0, "seeds task generation, sampling and initialisation")
    run_dir: str = opt(".", "where outputs go (the CLI sets it to Hydra's run dir)")
    cache_dir: str = opt(
        "~/.cache/slime", "converted/generated model checkpoints (the CLI reads $SLIME_CACHE_DIR)"
    )
    resume: str = opt("", "resume from a checkpoint dir, or `auto` (the latest one of this run dir)")


SECTIONS: tuple[str, ...] = (
    "model",
    "env",
    "rollout",
    "trainer",
    "algorithm",
    "buffer",
    "logger",
    "ray",
    "eval",
    "weights",
)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def iter_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, resolved type) for every leaf key of `cls`, nested sections flattened."""
    for f in dataclasses.fields(cls):
        hint = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from iter_fields(hint, f"{key}.")
        else:
            yield key, f, hint


def field_choices(f: dataclasses.Field, hint: Any) -> tuple[Any, ...]:
    """The allowed values of a field: an enum's member values, or the `choices` given to `opt`."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return tuple(m.value for m in hint)
    return tuple(f.metadata.get("choices", ()))


CHOICES: dict[str, tuple[Any, ...]] = {
    key: allowed for key, f, hint in iter_fields(SlimeConfig) if (allowed := field_choices(f, hint))
}


def register_configs() -> None:
    """Register the schemas so Hydra validates the YAML groups against them.

    `env.kwargs` and `env.dataset.kwargs` are open dicts: `env.kwargs.K=V` adds a key without `+`
    (the environment's constructor rejects one it does not take, at start-up).
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    schema = OmegaConf.structured(SlimeConfig)
    OmegaConf.set_struct(schema.env.kwargs, False)
    OmegaConf.set_struct(schema.env.dataset.kwargs, False)
    cs = ConfigStore.instance()
    cs.store(name="slime_schema", node=schema)
    for group, node in (
        ("model", ModelConfig),
        ("env", EnvConfig),
        ("rollout", RolloutConfig),
        ("trainer", TrainerConfig),
        ("algorithm", AlgorithmConfig),
        ("buffer", BufferConfig),
        ("logger", LoggerConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)
