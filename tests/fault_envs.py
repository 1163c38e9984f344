"""Environments that inject faults into a real run, for the reliability tests only.

Named on the command line as `tests.fault_envs:Class`; Ray puts the driver's working directory (the
repository root) on the rollout workers' `sys.path`, so the workers import them too.
"""

from __future__ import annotations

import os
import signal

from envs.base import Action, StepResult
from envs.target import TargetEnv


class KillWorkerOnceEnv(TargetEnv):
    """`target`, except that the first step of the whole run (across restarts: `marker` is a file
    that only the first step can create) kills its own process with SIGKILL.

    The engine runs inside the rollout worker's process, so this is the same fault as an engine that
    dies (out of memory, a crash inside vLLM): the worker, its engine and every episode in flight on
    it are gone at once.
    """

    def __init__(self, marker: str, max_words: int = 0) -> None:
        super().__init__(max_words=max_words)
        self.marker = marker

    async def step(self, action: Action) -> StepResult:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return await super().step(action)
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


class ConstantRewardEnv(TargetEnv):
    """`target` whose reward is always 0.5: every group has zero reward variance, so DAPO's dynamic
    sampling drops all of them (the livelock `buffer.max_gen_batches` bounds)."""

    async def step(self, action: Action) -> StepResult:
        result = await super().step(action)
        return StepResult(result.observation, 0.5, result.done, result.info)
