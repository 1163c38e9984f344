"""Environments for the long-horizon end-to-end tests (tests/test_long_horizon_e2e.py), named on the
command line as `tests.long_envs:Class` (Ray puts the repository root on the workers' sys.path)."""

from __future__ import annotations

import time

from envs.base import Action, StepResult
from envs.target import TargetEnv


class BlockingTarget(TargetEnv):
    """`target`, except that one environment in `every` (in the order a worker builds them: the
    first episode of each group of `every`) blocks its thread in `step` for an hour, as a synchronous
    tool call or a stuck subprocess would."""

    made = 0  # environments built in this process

    def __init__(self, every: int = 4, max_words: int = 0) -> None:
        super().__init__(max_words=max_words)
        self.block = BlockingTarget.made % every == 0
        BlockingTarget.made += 1

    async def step(self, action: Action) -> StepResult:
        if self.block:
            time.sleep(3600)
        return await super().step(action)
