"""`parcel`: follow a parcel through a chain of depots with a `track` tool (pointer chasing).

The task names only the start depot ("A parcel starts at depot B2. Where does it end up?"). Each
`track(depot)` returns one step of the route ("B2: the parcel goes on to K7."), so the next call's
argument is known only from the last call's result; the last depot says it is the final stop. The
reward is 1 for a final reply naming the last depot, else 0 (the environment's own check; the prompt
and the tool outputs never name the answer before the chain has been followed to its end). With
`min_hops..max_hops` hops, a correct episode makes hops + 1 calls (4-6 with the defaults 3-5).

`show_previous` adds where the parcel came from ("K7: the parcel came from B2 and goes on to D4."), a
distractor: going back instead of on never reaches the end. `demonstrations` shows worked examples as
earlier turns, on depot codes of other letters (DEMO_LETTERS) than the tasks' (TASK_LETTERS).

Measured with `+experiment=agentic` (SmolLM2-135M-Instruct, 2 worked examples, show_previous,
3-5 hops): the base model follows the chain but does not stop at the final depot (re-tracks it or
goes back) or answers early: reward 0.06 (48 episodes) and 0.12 over the first 10 training steps;
it learns to stop and answer at the end (0.99 over the last 10 of 50 steps, ~5 calls per episode).
Without `show_previous` a run averaged 0.64 over its first 20% of steps (too easy); branching routes (two exits per depot, by
parcel kind) started at 0.02 and collapsed onto "always the second exit" (entropy 0).
"""

from __future__ import annotations

import random
import re
from typing import Any

from envs.base import Action, Environment, StepResult, ToolCall, function_tool, tool_message
from slime.core.types import Message, Task

TRACK_TOOL = function_tool(
    "track",
    "Look up where a parcel goes next from a depot. Returns the next depot, or says that the depot is "
    "the final stop.",
    {"depot": {"type": "string", "description": "a depot code, e.g. R1"}},
    ["depot"],
)

# Depot codes are a letter and a digit. Tasks use TASK_LETTERS, the worked examples DEMO_LETTERS only,
# so no task shares a code with an example.
TASK_LETTERS = "ABCDEFGHJKLMNP"
DEMO_LETTERS = "RSTUVWXYZ"
DIGITS = "123456789"
_CODE = re.compile(r"\b([A-Za-z][1-9])\b")
_ANSWER = re.compile(r"answer\s*[:=]?\s*\**\s*([A-Za-z][1-9])\b", re.IGNORECASE)

SYSTEM_PROMPT = (
    "Find the depot where the parcel ends. Call track on the parcel's depot to see where it goes next, "
    "then track that depot, and so on, until a depot is the final stop. Then reply 'Answer: <depot>' "
    "with no tool call."
)


def track_output(route: list[str], i: int, show_previous: bool = False) -> str:
    """What `track(route[i])` returns: the next depot, or that route[i] is the final stop; with
    `show_previous`, also the depot the parcel came from (a distractor the model must not follow)."""
    depot = route[i]
    came = ""
    if show_previous:
        came = f" came from {route[i - 1]} and" if i > 0 else " starts here and"
    if i + 1 < len(route):
        return f"{depot}: the parcel{came} goes on to {route[i + 1]}."
    if show_previous:
        return f"{depot}: the parcel{came.removesuffix(' and')}. This is the final stop."
    return f"{depot}: final stop."


def make_route(rng: random.Random, letters: str, hops: int) -> list[str]:
    """hops + 1 distinct depot codes: the start, then each next depot; the last is the final stop."""
    codes = rng.sample([a + d for a in letters for d in DIGITS], hops + 1)
    return codes


def question(start: str) -> str:
    return f"A parcel starts at depot {start}. Where does it end up?"


# Worked examples (routes in DEMO_LETTERS) for `demonstrations`: different lengths, so the examples
# show that the chain ends where track says "final stop", not after a fixed number of calls.
DEMONSTRATIONS: list[list[str]] = [
    ["S4", "W2", "T7", "Y5"],
    ["V3", "R8", "Z6", "U1", "X9"],
    ["T2", "Y8", "R5"],
]


def demonstration_messages(count: int, show_previous: bool = False) -> list[Message]:
    """The first `count` worked examples as conversation turns: the question, one track call per depot
    (each its own assistant turn, answered by the tool), then "Answer: <final depot>"."""
    messages: list[Message] = []
    for i, route in enumerate(DEMONSTRATIONS[:count]):
        messages.append({"role": "user", "content": question(route[0])})
        for j, depot in enumerate(route):
            call_id = f"example_{i}_{j}"
            call = {"name": "track", "arguments": {"depot": depot}}
            out = track_output(route, j, show_previous)
            messages += [
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"id": call_id, "type": "function", "function": call}],
                },
                {"role": "tool", "content": out, "tool_call_id": call_id, "name": "track"},
            ]
        messages.append({"role": "assistant", "content": f"Answer: {route[-1]}"})
    return messages


def extract_depot(text: str) -> str | None:
    """The depot a final reply names: after the last "Answer:", else the last depot code in it."""
    found = _ANSWER.findall(text)
    if found:
        return found[-1].upper()
    codes = _CODE.findall(text)
    return codes[-1].upper() if codes else None


class ParcelEnv(Environment):
    """See the module docstring. kwargs: max_turns, demonstrations, system_prompt."""

    tools = [TRACK_TOOL]

    def __init__(
        self,
        max_turns: int = 10,
        demonstrations: int = 0,
        show_previous: bool = False,
        system_prompt: str = SYSTEM_PROMPT,
    ):
        if max_turns < 1:
            raise ValueError(f"env.kwargs.max_turns must be >= 1, got {max_turns}")
        if not 0 <= demonstrations <= len(DEMONSTRATIONS):
            raise ValueError(
                f"env.kwargs.demonstrations must be in [0, {len(DEMONSTRATIONS)}], got {demonstrations}"
            )
        self.max_turns = max_turns
        self.demonstrations = demonstrations
        self.show_previous = bool(show_previous)
        self.system_prompt = system_prompt
        self.route: list[str] = []
        self.index: dict[str, int] = {}
        self.turns = 0
        self.tool_ok = 0
        self.tool_errors = 0
        self.visited: set[str] = set()

    @classmethod
    def make_tasks(cls, num: int, seed: int, min_hops: int = 3, max_hops: int = 5) -> list[Task]:
        if not 1 <= min_hops <= max_hops:
            raise ValueError(
                f"env.dataset.kwargs: need 1 <= min_hops <= max_hops, got min_hops={min_hops}, "
                f"max_hops={max_hops}"
            )
        if max_hops + 1 > len(TASK_LETTERS) * len(DIGITS):
            raise ValueError(f"env.dataset.kwargs.max_hops must be < {len(TASK_LETTERS) * len(DIGITS)}")
        rng = random.Random(f"parcel-{seed}")
        tasks = []
        for i in range(num):
            route = make_route(rng, TASK_LETTERS, rng.randint(min_hops, max_hops))
            tasks.append(
                Task(
                    id=f"parcel-{seed}-{i}",
                    prompt=question(route[0]),
                    env="parcel",
                    env_args={"route": route, "answer": route[-1]},
                )
            )
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        route = task.env_args.get("route")
        if not isinstance(route, list) or len(route) < 2:
            raise ValueError(f"task {task.id!r} has no env_args['route'] (a list of >= 2 depot codes)")
        self.route = [str(r).upper() for r in route]
        self.index = {d: i for i, d in enumerate(self.route)}
        messages = task.messages()
        if self.demonstrations:
            messages[0:0] = demonstration_messages(self.demonstrations, self.show_previous)
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def _track(self, call: ToolCall) -> tuple[str, bool]:
        if call.name != "track":
            return f"Error: unknown tool {call.name!r}; available: track", False
        depot = call.arguments.get("depot")
        if not isinstance(depot, str) or not depot.strip():
            return "Error: track needs a string argument 'depot'", False
        key = depot.strip().upper()
        if key not in self.index:
            return f"{depot.strip()}: no record of this parcel at this depot.", False
        self.visited.add(key)
        return track_output(self.route, self.index[key], self.show_previous), True

    def _info(self) -> dict[str, Any]:
        return {
            "tool_ok": self.tool_ok,
            "tool_errors": self.tool_errors,
            "hops": len(self.route) - 1,
            "reached_final": self.route[-1] in self.visited,
        }

    async def step(self, action: Action) -> StepResult:
        self.turns += 1
        if action.tool_calls:
            observation = []
            for call in action.tool_calls:
                out, ok = self._track(call)
                self.tool_ok += ok
                self.tool_errors += not ok
                observation.append(tool_message(out, call))
            done = self.turns >= self.max_turns
            info = self._info()
            if done:
                info.update(correct=False, answered=False)
            return StepResult(observation, 0.0, done, info)
        predicted = extract_depot(action.content)
        correct = predicted == self.route[-1]
        info = {**self._info(), "correct": correct, "answered": predicted is not None, "extracted": predicted}
        return StepResult([], float(correct), True, info)
