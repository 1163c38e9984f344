"""`reasoning_gym`: an adapter over the installed `reasoning_gym` package (100+ procedurally generated
reasoning tasks, generated locally, scored by the package's own `score_answer`).

Tasks come from `reasoning_gym.create_dataset(task, size=num, seed=seed, **config)`; each Task
records (task, size, seed, config, index) so the env can rebuild the exact entry -- metadata included,
with its original Python types -- and score with that dataset's `score_answer`. The answer is the last
`<answer>...</answer>` of the reply (the format of reasoning_gym's system prompts), else the reply's
final line.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from envs.base import Action, Environment, StepResult
from slime.core.types import Message, Task

DEFAULT_SYSTEM_PROMPT = (
    "Answer the question. Think briefly if you need to, then give only the final answer between "
    "<answer> and </answer> tags."
)


@functools.lru_cache(maxsize=16)
def _dataset(task: str, size: int, seed: int, config_json: str) -> Any:
    import reasoning_gym

    return reasoning_gym.create_dataset(task, size=size, seed=seed, **json.loads(config_json))


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def extract_rg_answer(text: str) -> str:
    """The last <answer>...</answer> content, else the last non-empty line of the reply."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(text)
    if tagged is not None:
        return tagged
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


class ReasoningGymEnv(Environment):
    """Single turn, reward = reasoning_gym's score in [0, 1]. kwargs: system_prompt."""

    def __init__(self, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.system_prompt = system_prompt
        self.entry: dict[str, Any] = {}
        self.dataset: Any = None

    @classmethod
    def make_tasks(cls, num: int, seed: int, task: str = "leg_counting", **config: Any) -> list[Task]:
        """`num` entries of reasoning_gym dataset `task` (extra kwargs go to its config)."""
        try:
            ds = _dataset(task, int(num), int(seed), _config_key(config))
        except Exception as e:
            raise ValueError(
                f"env.dataset.kwargs: reasoning_gym cannot create {task!r} with {config}: {e}"
            ) from e
        tasks = []
        for i in range(len(ds)):
            entry = ds[i]
            tasks.append(
                Task(
                    id=f"rg-{task}-{seed}-{i}",
                    prompt=entry["question"],
                    env="reasoning_gym",
                    env_args={
                        "task": task,
                        "size": int(num),
                        "seed": int(seed),
                        "config": dict(config),
                        "index": i,
                        "answer": str(entry["answer"]),
                    },
                )
            )
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        args = task.env_args
        missing = [k for k in ("task", "size", "seed", "index") if k not in args]
        if missing:
            raise ValueError(
                f"task {task.id!r}: env_args lacks {', '.join(missing)} (make it with make_tasks)"
            )
        self.dataset = _dataset(
            args["task"], int(args["size"]), int(args["seed"]), _config_key(args.get("config", {}))
        )
        self.entry = self.dataset[int(args["index"])]
        messages = task.messages()
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    async def step(self, action: Action) -> StepResult:
        answer = extract_rg_answer(action.content)
        score = float(self.dataset.score_answer(answer, self.entry))
        # Some scorers return small partial credit; clamp so rewards stay in [0, 1].
        score = min(1.0, max(0.0, score))
        return StepResult([], score, True, {"extracted": answer, "correct": score >= 1.0})
