"""Shared data types: the contracts between rollout, buffer and trainer.

Plain, picklable dataclasses with Python lists (no tensors), so they cross Ray boundaries cheaply and
can be written to JSONL for replay. Token-level lists of a Trajectory are all the same length.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

# Chat message in OpenAI form: {"role": ..., "content": ..., optional "tool_calls"/"tool_call_id"/"name"}.
Message = dict[str, Any]


class Status(enum.StrEnum):
    """How an episode ended."""

    COMPLETED = "completed"  # the environment said done
    TRUNCATED = "truncated"  # a turn/token limit ended it
    ABORTED = "aborted"  # the engine aborted the request (shutdown, weight update in `abort` mode)
    FAILED = "failed"  # the environment or agent raised, hung or returned malformed values


@dataclass
class Task:
    """One dataset row."""

    id: str
    prompt: str | list[Message]  # text (becomes one user message) or chat messages
    env: str = ""  # name of the environment the row was made for (informational)
    env_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"answer": "42"}

    def messages(self) -> list[Message]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]


@dataclass
class Trajectory:
    """One episode, token in / token out.

    token_ids holds the prompt and every turn exactly as the engine produced them or the chat template
    appended them; loss_mask is 1 only on tokens the policy generated; behavior_logprobs and versions
    are per token (0.0 and -1 where loss_mask is 0).
    """

    task_id: str
    token_ids: list[int]
    loss_mask: list[int]
    behavior_logprobs: list[float]
    versions: list[int]
    prompt_len: int  # length of the first prompt (before the first generated token)
    reward: float = 0.0
    status: Status = Status.COMPLETED
    turns: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # generate_s, env_s, total_s
    start_version: int = 0  # engine version when the episode started

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        for name in ("loss_mask", "behavior_logprobs", "versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trajectory.{name} has {len(getattr(self, name))} entries, token_ids {n}")

    @property
    def num_generated(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def min_version(self) -> int:
        """Oldest policy version among generated tokens (start_version when nothing was generated)."""
        gen = [v for v, m in zip(self.versions, self.loss_mask, strict=True) if m]
        return min(gen) if gen else self.start_version

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["status"] = self.status.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        d = dict(d)
        d["status"] = Status(d["status"])
        return cls(**d)


@dataclass
class Group:
    """The n trajectories of one task (group baselines need all of them)."""

    task: Task
    trajectories: list[Trajectory]
    ticket: int = 0  # admission ticket from the buffer (global start order)
    start_version: int = 0  # policy version at admission
    worker: int = 0  # rollout worker index

    @property
    def min_version(self) -> int:
        return min((t.min_version for t in self.trajectories), default=self.start_version)

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": dataclasses.asdict(self.task),
            "trajectories": [t.to_dict() for t in self.trajectories],
            "ticket": self.ticket,
            "start_version": self.start_version,
            "worker": self.worker,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        return cls(
            task=Task(**d["task"]),
            trajectories=[Trajectory.from_dict(t) for t in d["trajectories"]],
            ticket=d.get("ticket", 0),
            start_version=d.get("start_version", 0),
            worker=d.get("worker", 0),
        )


@dataclass
class SamplingParams:
    """Engine-independent sampling parameters for one generate call."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class GenerateOutput:
    """What an engine returns for one request: only the new tokens."""

    token_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token under softmax(logits / temperature)
    versions: list[int]  # policy version that produced each token
    finish_reason: str  # "stop" | "length" | "abort"


@dataclass
class WeightManifest:
    """A versioned set of weight buckets on storage the engines can read (safetensors files)."""

    version: int
    files: list[str]  # one safetensors file per bucket, transformers parameter names
    num_bytes: int
    num_tensors: int
