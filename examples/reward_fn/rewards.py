"""Reward functions for examples/reward_fn/data.jsonl, written exactly as for TRL's GRPOTrainer.

    python -m slime.train +experiment=tiny env=reward_fn env.dataset.path=examples/reward_fn/data.jsonl \\
        'env.kwargs.reward=[examples.reward_fn.rewards:correct,examples.reward_fn.rewards:short]'

Each function receives lists (one entry per completion) and returns one float per completion. The
dataset's `answer` column arrives as the keyword argument `answer`.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _text(completion: Any) -> str:
    """A completion's text: a string for string prompts, [{"role": "assistant", ...}] for chat prompts."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def correct(prompts: list[Any], completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """1.0 when the last number in the reply equals the reference answer, else 0.0."""
    out = []
    for completion, ref in zip(completions, answer, strict=True):
        numbers = _NUMBER.findall(_text(completion))
        out.append(1.0 if numbers and float(numbers[-1]) == float(ref) else 0.0)
    return out


def short(completions: list[Any], **kwargs: Any) -> list[float]:
    """Format: the prompt asks for the number only, so 1.0 up to 3 words, falling linearly to 0.0 at 13."""
    return [max(0.0, min(1.0, (13 - len(_text(c).split())) / 10)) for c in completions]
