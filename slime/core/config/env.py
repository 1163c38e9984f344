"""The `env` group (configs/env/): the environment every episode runs in, and where its tasks come from."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from slime.core.config.fields import _require, _require_non_negative, _require_positive, opt


class EnvExecutor(enum.StrEnum):
    thread = "thread"  # the env's coroutines on an event loop in a thread of the episode's own
    process = "process"  # the env in a child process of the episode's own (killed on a timeout)


class ToolLatency(enum.StrEnum):
    fixed = "fixed"
    lognormal = "lognormal"  # median env.tool_latency_s, shape env.tool_latency_sigma: heavy-tailed


@dataclass
class DatasetConfig:
    """Where tasks come from: a dataset (local file or directory, or a hub id), or the environment's own
    generator."""

    path: str = opt(
        "",
        "JSONL/Parquet file, save_to_disk directory or hub id owner/name[:config] (`@split` picks a split); "
        "columns prompt, optional id and env_args, other columns join env_args (empty: the env generates)",
    )
    num_tasks: int = opt(1000, "tasks to generate when the env generates them")
    kwargs: dict[str, Any] = opt({}, "passed to the env's make_tasks(num, seed, **kwargs)")
    shuffle: bool = opt(True, "reshuffle every epoch (seeded)")

    def validate(self) -> None:
        if not self.path:
            _require_positive(self, "env.dataset", "num_tasks")


@dataclass
class EnvArgs:
    """Arguments for one environment, applied only while `env.name` selects it."""

    kwargs: dict[str, Any] = opt({}, "constructor arguments; a key also in env.kwargs is overridden by it")
    dataset_kwargs: dict[str, Any] = opt(
        {}, "make_tasks() arguments; a key also in env.dataset.kwargs is overridden by it"
    )


@dataclass
class EnvConfig:
    """The environment every episode runs in."""

    name: str = opt(MISSING, "built-in short name, `package.module:Class`, or a `slime.envs` entry point")
    id: str = opt(
        "",
        "which environment of another ecosystem: env=verifiers its id (an installed verifiers environment), "
        "env=openenv `package.module:Class` of an OpenEnv Environment (reaches the env as its argument id)",
    )
    kwargs: dict[str, Any] = opt({}, "passed to the environment's constructor")
    dataset: DatasetConfig = opt(DatasetConfig, "task source")
    agent: str = opt("", "for env=openai_agent: `package.module:function` of the black-box agent")
    executor: EnvExecutor = opt(
        EnvExecutor.thread,
        "where reset/step/close run, off the worker's event loop: a thread per episode, or a process per "
        "episode (killed when a call overruns rollout.step_timeout_s; for CPU-bound or crashing envs)",
    )
    tool_latency_s: float = opt(
        0.0, "artificial latency of every step that calls tools, in seconds (a workload knob; 0 = none)"
    )
    tool_latency: ToolLatency = opt(
        ToolLatency.fixed, "fixed, or lognormal with median tool_latency_s (heavy-tailed)"
    )
    tool_latency_sigma: float = opt(
        1.0, "the lognormal's shape: the p99 call takes exp(2.33 sigma) x the median"
    )
    by_name: dict[str, EnvArgs] = opt(
        {},
        "per-environment arguments keyed by env name, used only for the selected env (experiments set "
        "them here so that choosing another env never receives them)",
    )

    def select(self) -> None:
        """Fold `by_name[name]` under `kwargs` and `dataset.kwargs` (explicit keys win), then clear
        `by_name`, and pass `id` (when set) as `kwargs["id"]`: afterwards the section says exactly what
        the selected environment gets."""
        chosen = self.by_name.get(self.name)
        if chosen is not None:
            self.kwargs = {**chosen.kwargs, **self.kwargs}
            self.dataset.kwargs = {**chosen.dataset_kwargs, **self.dataset.kwargs}
        self.by_name = {}
        if self.id:  # the environment gets env.id as its argument `id`
            if self.kwargs.get("id", self.id) != self.id:
                raise ValueError(
                    f"env.id={self.id!r} and env.kwargs.id={self.kwargs['id']!r} disagree: set only env.id"
                )
            self.kwargs = {"id": self.id, **self.kwargs}

    def validate(self) -> None:
        _require(
            isinstance(self.name, str) and bool(self.name.strip()),
            "env.name must name an environment (a built-in, package.module:Class or an entry point)",
        )
        _require(
            self.name != "openai_agent" or bool(self.agent),
            "env.agent=package.module:function is required when env.name=openai_agent",
        )
        _require_non_negative(self, "env", "tool_latency_s", "tool_latency_sigma")
        self.dataset.validate()
