"""Environments for the end-to-end tests only, named on the command line as `tests.e2e_envs:Class`.

Rollout workers import them too: Ray puts the driver's working directory (the repository root, where
pytest runs) on the workers' `sys.path`, and `tests/` is a namespace package there.
"""

from __future__ import annotations

from envs.base import Action, StepResult
from envs.target import TargetEnv


class InvertedTargetEnv(TargetEnv):
    """`target` with its reward turned upside down: 1 - the lowercase-word fraction.

    The control for the learning test: the same model, data and optimiser must drive the `target`
    score (kept in `info["target_score"]`) down when the reward asks for that, which entropy collapse
    or any other reward-blind drift cannot do in both runs at once.
    """

    async def step(self, action: Action) -> StepResult:
        result = await super().step(action)
        return StepResult([], 1.0 - result.reward, True, {**result.info, "target_score": result.reward})


class WorkerBug(BaseException):
    """Not an `Exception`: it passes the episode loop's containment (which catches `Exception`) the
    way a bug in the rollout worker's own code would, and ends the worker's run loop."""


WORKER_BUG_MESSAGE = "injected rollout worker bug 7f3a"


class CrashingEnv(TargetEnv):
    """Constructs fine (the driver's start-up checks pass) and kills the worker's loop on its first step."""

    async def step(self, action: Action) -> StepResult:
        raise WorkerBug(WORKER_BUG_MESSAGE)
