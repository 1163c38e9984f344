"""A verifiers environment (id `vf-faulty`) that fails on purpose, for tests/test_verifiers_env.py.

verifiers resolves the id by importing this module (tests/ is on sys.path under pytest) and taking the
one Taskset subclass in `__all__`. `env.kwargs.taskset.fault` picks the failure: `none`, `load` (the
taskset raises while loading its tasks), `reward_raises`, `reward_text` (a reward that is not a
number) or `reward_nan`. The task id `ok` never fails, so one episode can fail beside a good one.
"""

from __future__ import annotations

import verifiers.v1 as vf

__all__ = ["FaultyTaskset"]


class FaultyData(vf.TaskData):
    fault: str = "none"


class FaultyTask(vf.Task[FaultyData]):
    @vf.reward(weight=1.0)
    async def scored(self, trace: vf.Trace) -> float:
        fault = self.data.fault
        if fault == "reward_raises":
            raise RuntimeError("the reward function broke")
        if fault == "reward_text":
            return "high"  # type: ignore[return-value]  # what the test is about
        if fault == "reward_nan":
            return float("nan")
        return 0.5


class FaultyConfig(vf.TasksetConfig):
    fault: str = "none"
    """Which failure to stage (module docstring)."""


class FaultyTaskset(vf.Taskset[FaultyTask, FaultyConfig]):
    def load(self) -> list[FaultyTask]:
        if self.config.fault == "load":
            raise OSError("the task file is missing")
        return [
            FaultyTask(FaultyData(id=task_id, prompt="Say hi.", fault=fault), self.config.task)
            for task_id, fault in (("faulty", self.config.fault), ("ok", "none"))
        ]
