"""Environments for the long-horizon end-to-end tests (tests/test_long_horizon_e2e.py), named on the
command line as `tests.long_envs:Class` (Ray puts the repository root on the workers' sys.path)."""

from __future__ import annotations

import time

from envs.base import Action, StepResult
from envs.target import TargetEnv
from slime.core.types import Message, Task


class BlockingTarget(TargetEnv):
    """`target`, except that for one task in `every` the step blocks its thread for an hour, as a
    synchronous tool call or a stuck subprocess would."""

    def __init__(self, every: int = 8, max_words: int = 0) -> None:
        super().__init__(max_words=max_words)
        self.every = every
        self.block = False

    async def reset(self, task: Task) -> list[Message]:
        self.block = int(task.id.rsplit("-", 1)[1]) % self.every == 0
        return await super().reset(task)

    async def step(self, action: Action) -> StepResult:
        if self.block:
            time.sleep(3600)
        return await super().step(action)
