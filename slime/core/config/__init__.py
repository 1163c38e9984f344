"""Typed configuration: the one place where every key's type, default, choices and meaning live.

- One dataclass per Hydra group, registered in Hydra's ConfigStore: the YAML files in `configs/` are
  composed onto them (a wrong key, type or choice fails when Hydra composes) and hold only what differs
  from these defaults. `slime.train` converts the result to `SlimeConfig` once; each component receives
  only its own section.
- Choice fields are `StrEnum`s whose member names equal their values: YAML, JSON and wandb see plain
  strings, and `cfg.algorithm.name == "grpo"` keeps working.
- `opt(default, help)` declares a field with its one-line description; `python -m slime.config_docs`
  writes docs/config.md from these dataclasses.
- Each section's `validate()` holds its own checks; `slime.core.validation.validate(cfg)` runs them all plus
  the checks that span sections. They raise ValueError naming the keys to change, before Ray or any
  actor starts.

Layout: one module per section, named after it (`model`, `env`, `rollout`, `trainer`, `algorithm`,
`buffer`, `logger`, `ray`, `eval`, `weights`), each holding its dataclass and its choices; `fields`
the helpers they share (`opt`, the `_require*` checks, `Dtype`); `schema` the top level
(`SlimeConfig`, `SECTIONS`, `CHOICES`, `iter_fields`, `register_configs`). This package re-exports
every name, so `from slime.core.config import X` is the one import the rest of slime uses.
"""

from slime.core.config.algorithm import (
    Advantage,
    AlgorithmConfig,
    AlgorithmName,
    DistillConfig,
    IndexerReplay,
    IsFactorConfig,
    IsLevel,
    IsMode,
    KlEstimator,
    KlMode,
    Level,
    LossAgg,
    OffPolicy,
    RoutingReplay,
)
from slime.core.config.buffer import BufferConfig, GenCap, StaleTokens
from slime.core.config.env import DatasetConfig, EnvArgs, EnvConfig, EnvExecutor, ToolLatency
from slime.core.config.eval import EvalConfig
from slime.core.config.fields import Dtype, _require, _require_non_negative, _require_positive, opt
from slime.core.config.logger import LoggerConfig, LoggerMode
from slime.core.config.model import LORA_ALL_LINEAR, LoraConfig, ModelConfig, ModelSource
from slime.core.config.ray import RayConfig
from slime.core.config.rollout import (
    ContextPolicy,
    Engine,
    KvAfterUpdate,
    MalformedToolCall,
    RolloutConfig,
    WeightUpdateMode,
)
from slime.core.config.schema import (
    CHOICES,
    SECTIONS,
    SlimeConfig,
    field_choices,
    iter_fields,
    register_configs,
)
from slime.core.config.trainer import MoeConfig, OnStop, TrainerConfig
from slime.core.config.weights import CommBackend, Transport, WeightsConfig

__all__ = [
    "Advantage",
    "AlgorithmConfig",
    "AlgorithmName",
    "BufferConfig",
    "CHOICES",
    "CommBackend",
    "ContextPolicy",
    "DatasetConfig",
    "DistillConfig",
    "Dtype",
    "Engine",
    "EnvArgs",
    "EnvConfig",
    "EnvExecutor",
    "EvalConfig",
    "GenCap",
    "IndexerReplay",
    "IsFactorConfig",
    "IsLevel",
    "IsMode",
    "KlEstimator",
    "KlMode",
    "KvAfterUpdate",
    "LORA_ALL_LINEAR",
    "Level",
    "LoggerConfig",
    "LoggerMode",
    "LoraConfig",
    "LossAgg",
    "MalformedToolCall",
    "ModelConfig",
    "ModelSource",
    "MoeConfig",
    "OffPolicy",
    "OnStop",
    "RayConfig",
    "RolloutConfig",
    "RoutingReplay",
    "SECTIONS",
    "SlimeConfig",
    "StaleTokens",
    "ToolLatency",
    "TrainerConfig",
    "Transport",
    "WeightUpdateMode",
    "WeightsConfig",
    "_require",
    "_require_non_negative",
    "_require_positive",
    "field_choices",
    "iter_fields",
    "opt",
    "register_configs",
]
