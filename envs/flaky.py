"""`flaky`: a test environment that fails on purpose, to prove failure containment.

Each episode (env instance) decides at reset, with probability `failure_rate`, to fail once in one of
`modes`, either in reset or in one of its steps:
- "raise": raise RuntimeError,
- "hang": sleep `hang_s` seconds (past the rollout's step timeout),
- "malformed": return a malformed value (cycling through: NaN reward, string reward, non-list
  observation, None, non-bool done, a message without content; in reset: a non-list).
Otherwise it runs `num_steps` steps and ends with reward 1.0. The decision is recorded in
`self.planned` (None or (mode, phase)) so a test can account for every failure. With `seed` set the
decision is a deterministic function of (seed, task id); without it, it is random.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

from envs.base import Action, Environment, StepResult
from slime.core.types import Message, Task

MODES = ("raise", "hang", "malformed")
_STEP_MALFORMED: list[Any] = [
    StepResult([], math.nan, True, {}),
    StepResult([], "1.0", True, {}),  # type: ignore[arg-type]
    StepResult("not a list", 0.0, True, {}),  # type: ignore[arg-type]
    None,
    StepResult([], 0.0, "yes", {}),  # type: ignore[arg-type]
    StepResult([{"role": "user"}], 0.0, False, {}),
]


class FlakyEnv(Environment):
    """kwargs: failure_rate (default 0.3), modes (subset of raise/hang/malformed), num_steps (default 2),
    hang_s (default 3600), seed (None = random)."""

    def __init__(
        self,
        failure_rate: float = 0.3,
        modes: list[str] | tuple[str, ...] = MODES,
        num_steps: int = 2,
        hang_s: float = 3600.0,
        seed: int | None = None,
    ):
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes:
            raise ValueError(f"env.kwargs.modes: unknown {unknown or 'empty list'}; choose from {MODES}")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"env.kwargs.failure_rate must be in [0, 1], got {failure_rate}")
        if num_steps < 1:
            raise ValueError(f"env.kwargs.num_steps must be >= 1, got {num_steps}")
        self.failure_rate = failure_rate
        self.modes = tuple(modes)
        self.num_steps = num_steps
        self.hang_s = hang_s
        self.seed = seed
        self.planned: tuple[str, str] | None = None
        self.steps = 0
        self.closed = False
        self.malformed_choice = 0

    @classmethod
    def make_tasks(cls, num: int, seed: int) -> list[Task]:
        return [Task(id=f"flaky-{seed}-{i}", prompt="Say anything.", env="flaky") for i in range(num)]

    async def _fail(self, mode: str, phase: str) -> Any:
        if mode == "raise":
            raise RuntimeError(f"flaky env failed on purpose in {phase}")
        if mode == "hang":
            await asyncio.sleep(self.hang_s)
            return None
        return None  # "malformed": the caller returns its malformed value

    async def reset(self, task: Task) -> list[Message]:
        rng = random.Random(f"{self.seed}-{task.id}") if self.seed is not None else random.Random()
        if rng.random() < self.failure_rate:
            phase = rng.choice(["reset"] + [f"step{i}" for i in range(self.num_steps)])
            self.planned = (rng.choice(self.modes), phase)
        self.malformed_choice = rng.randrange(len(_STEP_MALFORMED))
        if self.planned and self.planned[1] == "reset":
            await self._fail(self.planned[0], "reset")
            return "not a list of messages"  # type: ignore[return-value]
        return task.messages()

    async def step(self, action: Action) -> StepResult:
        phase = f"step{self.steps}"
        self.steps += 1
        if self.planned and self.planned[1] == phase:
            await self._fail(self.planned[0], phase)
            return _STEP_MALFORMED[self.malformed_choice]
        done = self.steps >= self.num_steps
        obs = [] if done else [{"role": "user", "content": "Go on."}]
        return StepResult(obs, 1.0 if done else 0.0, done, {"steps": self.steps})

    async def close(self) -> None:
        self.closed = True
