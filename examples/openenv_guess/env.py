"""The OpenEnv environment: guess a secret integer with higher/lower hints.

The same game and reward as slime's `guess_number` (envs/guess_number.py), so the two can be compared
on one task: the secret is drawn from `reset(seed=...)`, each action is a guess (the last integer of
its text), the reward when guessed is `1 - shaping * (guesses - 1) / max_guesses`, 0 when the guesses
run out. `reward_kind="text"` makes every reward a string (a broken environment, for tests).
"""

from __future__ import annotations

import random
import re
from typing import Any

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State

_INT = re.compile(r"-?\d+")


class GuessAction(Action):
    guess: str
    """The player's reply; its last integer is the guess."""


class GuessObservation(Observation):
    message: str
    """What the game says: the rules at reset, then a hint after each wrong guess."""


class GuessEnvironment(Environment[GuessAction, GuessObservation, State]):
    # Each WebSocket session gets its own instance (no shared state): the server may run many at once.
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(
        self,
        low: int = 1,
        high: int = 100,
        max_guesses: int = 7,
        shaping: float = 0.5,
        reward_kind: str = "number",
    ) -> None:
        super().__init__()
        if high <= low:
            raise ValueError(f"high ({high}) must be > low ({low})")
        self.low, self.high, self.max_guesses, self.shaping = low, high, max_guesses, shaping
        self.reward_kind = reward_kind
        self.target = low
        self._state = State(step_count=0)

    def reset(
        self, seed: int | None = None, episode_id: str | None = None, **kwargs: Any
    ) -> GuessObservation:
        self.target = random.Random(seed).randint(self.low, self.high)
        self._state = State(episode_id=episode_id, step_count=0)
        return GuessObservation(
            message=(
                f"I am thinking of an integer between {self.low} and {self.high}. Guess it! After each guess I "
                "will tell you whether my number is higher or lower. Reply with just your guess."
            ),
        )

    def step(self, action: GuessAction, timeout_s: float | None = None, **kwargs: Any) -> GuessObservation:
        self._state.step_count += 1
        guesses = self._state.step_count
        numbers = _INT.findall(action.guess)
        guess = int(numbers[-1]) if numbers else None
        if guess == self.target:
            reward = 1.0 - self.shaping * (guesses - 1) / self.max_guesses
            return self._observation("Correct!", reward, done=True)
        if guesses >= self.max_guesses:
            return self._observation(f"Out of guesses; it was {self.target}.", 0.0, done=True)
        left = self.max_guesses - guesses
        if guess is None:
            hint = f"Please reply with a single integer between {self.low} and {self.high}."
        else:
            hint = f"My number is {'higher' if self.target > guess else 'lower'} than {guess}."
        return self._observation(f"{hint} {left} guess{'es' if left != 1 else ''} left.", 0.0, done=False)

    def _observation(self, message: str, reward: float, done: bool) -> GuessObservation:
        obs = GuessObservation(message=message, done=done, reward=reward)
        if self.reward_kind == "text":
            # Observation.reward is typed: only a raw dict (what a server of another version or language
            # might send) can carry a string, so the broken variant writes it past validation.
            object.__setattr__(obs, "reward", f"{reward:.1f} points")
        return obs

    @property
    def state(self) -> State:
        return self._state
