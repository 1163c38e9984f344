"""`reverse`: reply with the given word spelled backwards. A minimal slime environment plugin."""

from __future__ import annotations

import random

from envs.base import Action, Environment, Message, StepResult, Task


class ReverseEnv(Environment):
    """One turn: the model gets a word and must answer with it reversed. Reward 1 if exact, else the
    fraction of leading characters it got right."""

    @classmethod
    def make_tasks(cls, num: int, seed: int, min_len: int = 3, max_len: int = 6) -> list[Task]:
        rng = random.Random(f"reverse-{seed}")
        letters = "abcdefghijklmnopqrstuvwxyz"
        words = ["".join(rng.choices(letters, k=rng.randint(min_len, max_len))) for _ in range(num)]
        prompt = "Reverse the word '{}'. Reply with the reversed word only."
        return [
            Task(
                id=f"reverse-{seed}-{i}", prompt=prompt.format(w), env="reverse", env_args={"answer": w[::-1]}
            )
            for i, w in enumerate(words)
        ]

    async def reset(self, task: Task) -> list[Message]:
        self.answer = str(task.env_args["answer"])
        return task.messages()

    async def step(self, action: Action) -> StepResult:
        reply = action.text_without_tool_calls.strip().strip("'\".").lower()
        right = 0
        while right < min(len(reply), len(self.answer)) and reply[right] == self.answer[right]:
            right += 1
        reward = 1.0 if reply == self.answer else right / len(self.answer)
        return StepResult(observation=[], reward=reward, done=True, info={"exact": reply == self.answer})
