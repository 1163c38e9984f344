"""`target`: an easy, dense, learnable environment for learning tests with tiny random models.

Single turn. The reward is the fraction of the reply's words (whitespace-separated) whose first
character is one of `letters` (default: a-m in either case), over at most `max_words` words; a reply
with no words scores 0. The prompt says so in plain words, so an instruct model can do it at once.

Why this reward: a random model over SmolLM2's 49k-token vocabulary samples nearly uniformly, and its
embeddings are random, so no single direction in the network separates "good" from "bad" tokens;
RL can only raise the probability of the tokens it sampled (tabular learning). That is fastest when
each reward credits tokens as directly and as sharply as possible:
- about 58% of the vocabulary's word-initial tokens (" word") start with a-m/A-M, so the initial
  reward is mid-range (about 0.5) with the largest spread between samples, and every group has signal;
- a word's score is decided by one token (its first), and is 0 or 1, so per-token credit is sharper
  than with a character-fraction reward (where one token moves the reward by a few characters' worth);
- the score is in [0, 1], dense, and cannot be gamed by length: it is a fraction.
"""

from __future__ import annotations

import random
import string

from envs.base import Action, Environment, StepResult
from slime.types import Message, Task

DEFAULT_LETTERS = string.ascii_lowercase[:13] + string.ascii_uppercase[:13]

_TOPICS = ["animals", "the sea", "cities", "music", "food", "weather", "sports", "colours", "trees", "space",
           "books", "games", "tools", "rivers", "machines", "birds"]


def word_score(text: str, letters: str = DEFAULT_LETTERS, max_words: int = 0) -> float:
    """Fraction of the first `max_words` (0 = all) words of `text` that start with one of `letters`."""
    words = text.split()
    if max_words > 0:
        words = words[:max_words]
    if not words:
        return 0.0
    allowed = set(letters)
    return sum(w[0] in allowed for w in words) / len(words)


class TargetEnv(Environment):
    """kwargs: letters (allowed first characters, default a-m and A-M), max_words (0 = all words)."""

    def __init__(self, letters: str = DEFAULT_LETTERS, max_words: int = 0):
        if not letters:
            raise ValueError("env.kwargs.letters must not be empty")
        if max_words < 0:
            raise ValueError(f"env.kwargs.max_words must be >= 0, got {max_words}")
        self.letters = letters
        self.max_words = max_words

    @classmethod
    def make_tasks(cls, num: int, seed: int) -> list[Task]:
        """`num` prompts asking for words starting with a-m on varied topics; deterministic in seed."""
        rng = random.Random(f"target-{seed}")
        tasks = []
        for i in range(num):
            topic = rng.choice(_TOPICS)
            prompt = f"Write a few words about {topic}. Every word must start with a letter from a to m."
            tasks.append(Task(id=f"target-{seed}-{i}", prompt=prompt, env="target"))
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        return task.messages()

    async def step(self, action: Action) -> StepResult:
        score = word_score(action.content, self.letters, self.max_words)
        return StepResult([], score, True, {"words": len(action.content.split())})
