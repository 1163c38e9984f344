"""`long_tail`: a synthetic long-horizon workload with a heavy tail, for benchmarks and tests.

Most tasks are quick (1-2 turns, 0.3 s per environment step); a share of them (`slow_share`, a tenth
by default) take `slow_turns` turns at `slow_step_s` seconds per step, like an agent whose task needs
many slow tool calls. Every step waits its time without holding a core (as a tool behind a network
does), optionally with a lognormal spread (`latency_sigma`), and answers with a tool message of
`result_words` words (0: a short one), so contexts grow turn by turn. Which tasks are slow, their
turns and their step time are part of the task (`env_args`), so every run and every mode sees the
same workload.

The reward is learnable by a tiny random model: each reply is scored as `target` scores it (the share
of its words made of lowercase letters a-z), and the episode's reward is the mean over its turns. Turns
end on `rollout.stop` strings or the turn-end token (a random model rarely writes it: set
`rollout.stop=[" "]` and it ends each turn at its first space).
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

from envs.base import Action, Environment, StepResult, function_tool, tool_message
from envs.target import lowercase_word_fraction
from slime.core.types import Message, Task

TOOL = function_tool("wait", "Wait for the next part of the task.", {}, [])


class LongTailEnv(Environment):
    """kwargs: latency_sigma (lognormal spread of each step's time around the task's step time;
    0 = exact), result_words (words in each tool result; 0 = a short one)."""

    tools = [TOOL]

    def __init__(self, latency_sigma: float = 0.0, result_words: int = 0) -> None:
        if latency_sigma < 0 or result_words < 0:
            raise ValueError(
                f"env.kwargs.latency_sigma and result_words must be >= 0, got {latency_sigma}, {result_words}"
            )
        self.latency_sigma = latency_sigma
        self.result_words = result_words
        self.turns = 1
        self.step_s = 0.0
        self.scores: list[float] = []
        self.rng = random.Random()

    @classmethod
    def make_tasks(
        cls,
        num: int,
        seed: int,
        slow_share: float = 0.1,
        slow_turns: int = 6,
        slow_step_s: float = 3.0,
        fast_turns: tuple[int, int] = (1, 2),
        fast_step_s: float = 0.3,
    ) -> list[Task]:
        """`num` tasks, the first round(slow_share * num) slow, in a seeded order; deterministic."""
        if not 0.0 <= slow_share <= 1.0:
            raise ValueError(f"env.dataset.kwargs.slow_share must be in [0, 1], got {slow_share}")
        lo, hi = fast_turns
        if not 1 <= lo <= hi or slow_turns < 1:
            raise ValueError(
                f"env.dataset.kwargs: turns must be >= 1, got fast {fast_turns}, slow {slow_turns}"
            )
        rng = random.Random(f"long_tail-{seed}")
        n_slow = round(slow_share * num)
        tasks = []
        for i in range(num):
            slow = i < n_slow
            args: dict[str, Any] = {
                "slow": slow,
                "turns": slow_turns if slow else rng.randint(lo, hi),
                "step_s": slow_step_s if slow else fast_step_s,
            }
            prompt = "Write one lowercase word (letters a to z) each turn; tools answer between turns."
            tasks.append(Task(id=f"long_tail-{seed}-{i}", prompt=prompt, env="long_tail", env_args=args))
        rng.shuffle(tasks)
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        self.turns = int(task.env_args.get("turns", 1))
        self.step_s = float(task.env_args.get("step_s", 0.0))
        self.scores = []
        self.rng = random.Random()
        return task.messages()

    async def step(self, action: Action) -> StepResult:
        delay = self.step_s
        if self.latency_sigma > 0:
            delay *= math.exp(self.rng.gauss(0.0, self.latency_sigma))
        if delay > 0:
            await asyncio.sleep(delay)
        self.scores.append(lowercase_word_fraction(action.text_without_tool_calls))
        if len(self.scores) >= self.turns:
            reward = sum(self.scores) / len(self.scores)
            return StepResult([], reward, True, {"turns_needed": self.turns})
        words = " ".join(["part"] * self.result_words) if self.result_words else "ok"
        return StepResult([tool_message(f"step {len(self.scores)} done: {words}")], 0.0, False, {})
