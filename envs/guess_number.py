"""`guess_number`: a multi-turn game. The env holds a secret integer in [low, high]; each assistant
turn is a guess (the last integer in the reply); the env answers "higher" or "lower" as a user
message. Reward when guessed: `1 - shaping * (guesses - 1) / max_guesses` (shaping=0 gives a plain
1.0); 0 when `max_guesses` run out. A reply without an integer, or outside the range, uses up a guess
and gets a reminder.
"""

from __future__ import annotations

import random
import re

from envs.base import Action, Environment, StepResult
from slime.core.types import Message, Task

_INT = re.compile(r"-?\d+")


class GuessNumberEnv(Environment):
    """kwargs: max_guesses (default 7, enough for binary search over 1..100), shaping (in [0, 1],
    default 0.5: fewer guesses, more reward)."""

    def __init__(self, max_guesses: int = 7, shaping: float = 0.5):
        if max_guesses < 1:
            raise ValueError(f"env.kwargs.max_guesses must be >= 1, got {max_guesses}")
        if not 0.0 <= shaping <= 1.0:
            raise ValueError(f"env.kwargs.shaping must be in [0, 1], got {shaping}")
        self.max_guesses = max_guesses
        self.shaping = shaping
        self.target = 0
        self.low = 1
        self.high = 100
        self.guesses = 0

    @classmethod
    def make_tasks(cls, num: int, seed: int, low: int = 1, high: int = 100) -> list[Task]:
        """`num` secret numbers drawn uniformly from [low, high]; deterministic in (seed, low, high)."""
        if high <= low:
            raise ValueError(f"env.dataset.kwargs: high ({high}) must be > low ({low})")
        rng = random.Random(f"guess_number-{seed}")
        tasks = []
        for i in range(num):
            prompt = (
                f"I am thinking of an integer between {low} and {high}. Guess it! After each guess I will tell "
                "you whether my number is higher or lower. Reply with just your guess."
            )
            tasks.append(
                Task(
                    id=f"guess_number-{seed}-{i}",
                    prompt=prompt,
                    env="guess_number",
                    env_args={"target": rng.randint(low, high), "low": low, "high": high},
                )
            )
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        args = task.env_args
        if "target" not in args:
            raise ValueError(f"task {task.id!r} has no env_args['target']")
        self.target = int(args["target"])
        self.low, self.high = int(args.get("low", 1)), int(args.get("high", 100))
        self.guesses = 0
        return task.messages()

    async def step(self, action: Action) -> StepResult:
        self.guesses += 1
        numbers = _INT.findall(action.content)
        guess = int(numbers[-1]) if numbers else None
        info = {"guesses": self.guesses, "guess": guess, "target": self.target}
        if guess == self.target:
            reward = 1.0 - self.shaping * (self.guesses - 1) / self.max_guesses
            return StepResult([], reward, True, {**info, "solved": True})
        if self.guesses >= self.max_guesses:
            return StepResult([], 0.0, True, {**info, "solved": False})
        left = self.max_guesses - self.guesses
        if guess is None:
            reply = f"Please reply with a single integer between {self.low} and {self.high}."
        elif not self.low <= guess <= self.high:
            reply = f"{guess} is outside the range. My number is between {self.low} and {self.high}."
        else:
            reply = f"My number is {'higher' if self.target > guess else 'lower'} than {guess}."
        reply += f" {left} guess{'es' if left != 1 else ''} left."
        return StepResult([{"role": "user", "content": reply}], 0.0, False, {**info, "solved": False})
