"""`target`: an easy, dense, learnable environment for learning tests with tiny random models.

Single turn. The reward is the fraction of the reply's words (whitespace-separated) that consist only
of lowercase ASCII letters, over at most `max_words` words (0 = all); a reply without words scores 0.
The prompt asks for exactly that, so an instruct model scores high at once.

Why this reward (measured, see docs/environments.md): a random model over SmolLM2's 49k-token
vocabulary samples almost uniformly and its embeddings are random, so no direction in the network
separates "good" tokens from "bad" ones; GRPO first raises the tokens it happened to sample in good
replies and then, as their probability compounds, collapses onto a few of them. This reward suits
that:
- every token counts: a word-start token (" word") or a continuation ("ing") either keeps its word
  lowercase or breaks it (capitals, digits, punctuation, other scripts), so the credit is not diluted
  over tokens that cannot matter;
- it starts mid-range (about 0.6 for a random model) with spread inside each group, so every group has
  signal, and it leaves room to rise to 1.0;
- most tokens are good, so the collapse that fast learning rates cause usually lands on a good one.
Other rewards rose less in the same runs: the share of characters in a-m or of vowels (per-token
scores vary little, so the credit is diluted), words starting with a-m (continuation tokens do not
matter). The learning rate matters more than the reward: use about 5e-2 for tiny random models (at
1e-3 no token-level reward can rise by 0.1 in 16 steps; docs/environments.md has the numbers).
"""

from __future__ import annotations

import random

from envs.base import Action, Environment, StepResult
from slime.core.types import Message, Task

_TOPICS = [
    "animals",
    "the sea",
    "cities",
    "music",
    "food",
    "weather",
    "sports",
    "colours",
    "trees",
    "space",
    "books",
    "games",
    "tools",
    "rivers",
    "machines",
    "birds",
]


def is_lowercase_word(word: str) -> bool:
    """True for a non-empty word of ASCII letters a-z only."""
    return word.isascii() and word.isalpha() and word.islower()


def lowercase_word_fraction(text: str, max_words: int = 0) -> float:
    """Fraction of the first `max_words` (0 = all) words of `text` made only of letters a-z; 0 when
    there are no words."""
    words = text.split()
    if max_words > 0:
        words = words[:max_words]
    if not words:
        return 0.0
    return sum(is_lowercase_word(w) for w in words) / len(words)


class TargetEnv(Environment):
    """kwargs: max_words (score only the first N words; 0 = all)."""

    def __init__(self, max_words: int = 0):
        if max_words < 0:
            raise ValueError(f"env.kwargs.max_words must be >= 0, got {max_words}")
        self.max_words = max_words

    @classmethod
    def make_tasks(cls, num: int, seed: int) -> list[Task]:
        """`num` prompts on varied topics; deterministic in seed."""
        rng = random.Random(f"target-{seed}")
        tasks = []
        for i in range(num):
            topic = rng.choice(_TOPICS)
            prompt = (
                f"Write some words about {topic}. Use only lowercase letters a to z, separated by spaces: "
                "no capitals, digits or punctuation."
            )
            tasks.append(Task(id=f"target-{seed}-{i}", prompt=prompt, env="target"))
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        return task.messages()

    async def step(self, action: Action) -> StepResult:
        words = action.content.split()
        score = lowercase_word_fraction(action.content, self.max_words)
        return StepResult([], score, True, {"words": len(words)})
