"""The environment contract: what the episode loop calls and what an environment returns.

An environment is an async, per-episode object (one instance per episode; the rollout worker builds
it with `EnvClass(**env.kwargs)`):

- `tools: list[dict]` -- OpenAI function schemas (`{"type": "function", "function": {"name",
  "description", "parameters"}}`) the model may call; may be empty. Class or instance attribute; an
  environment without the attribute has no tools.
- `async def reset(self, task: Task) -> list[Message]` -- the initial chat messages.
- `async def step(self, action: Action) -> StepResult` -- react to one assistant turn. Tool results
  are messages with role "tool" in `StepResult.observation`.
- optional `@classmethod make_tasks(cls, num: int, seed: int, **kwargs) -> list[Task]` -- for
  environments that generate their own data locally and deterministically from a seed. With the class
  attribute `TASKS_FROM_KWARGS = True` it also receives `env.kwargs` (adapters of other ecosystems,
  whose tasks come from the same configuration as their episodes).
- optional `async def close(self) -> None` -- called once when the episode ends, however it ended.

Subclassing `Environment` is convenient but not required: `check_environment_class` checks the shape
of any class (plugins included) and names exactly what is wrong. Everything an environment needs
imports from here: `from envs.base import Action, Environment, Message, StepResult, Task, ...`.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from envs.tool_syntax import ToolCall, strip_tool_calls
from slime.core.types import Message, Task

__all__ = [
    "Action",
    "Environment",
    "Message",
    "StepResult",
    "Task",
    "ToolCall",
    "check_environment_class",
    "function_tool",
    "tool_message",
]


@dataclass
class Action:
    """One assistant turn as the environment sees it.

    content: the assistant's whole reply text (decoded from the generated tokens, special tokens
    removed), tool-call markup included. tool_calls: the calls parsed from it, in order. malformed:
    set (a one-line reason) when the reply tried to call a tool but the call could not be parsed; the
    episode loop handles that case itself (`rollout.on_malformed_tool_call`) and does not call
    `step` with a malformed action.
    """

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: str | None = None

    @property
    def text_without_tool_calls(self) -> str:
        """The reply with `<tool_call>...</tool_call>` blocks removed (what a user would read)."""
        return strip_tool_calls(self.content)


@dataclass
class StepResult:
    """What `Environment.step` returns. A 4-tuple (observation, reward, done, info) is accepted too."""

    observation: list[Message]
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment:
    """Convenience base class: no tools, `close` does nothing. Subclasses implement reset and step."""

    tools: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unknown env.kwargs: {', '.join(sorted(kwargs))}")

    async def reset(self, task: Task) -> list[Message]:
        raise NotImplementedError

    async def step(self, action: Action) -> StepResult:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def function_tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict:
    """Build an OpenAI function-tool schema."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(required)},
        },
    }


def check_tools(tools: Any, owner: str = "tools") -> list[dict[str, Any]]:
    """Validate a list of OpenAI function schemas; returns it. Raises TypeError/ValueError naming the
    offending entry."""
    if not isinstance(tools, list):
        raise TypeError(f"{owner} must be a list of OpenAI function schemas, got {type(tools).__name__}")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{owner}[{i}]"
        if not isinstance(tool, dict):
            raise TypeError(f"{where} must be a dict, got {type(tool).__name__}")
        if tool.get("type", "function") != "function":
            raise ValueError(f"{where}.type must be 'function', got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where} is missing the 'function' object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.function.name must be a non-empty string")
        if name in names:
            raise ValueError(f"{where}: duplicate tool name {name!r}")
        names.add(name)
        params = fn.get("parameters", {})
        if not isinstance(params, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON-schema object")
    return tools


def check_environment_class(cls: Any) -> None:
    """Check that `cls` satisfies the environment contract.

    Raises TypeError/ValueError whose message names exactly what is missing or wrong, e.g.
    "MyEnv.reset must be async (async def reset(self, task))". Returns None when the class is usable.
    """
    if not inspect.isclass(cls):
        raise TypeError(f"an environment must be a class, got {type(cls).__name__}: {cls!r}")
    name = cls.__name__
    for method, signature in (
        ("reset", "async def reset(self, task)"),
        ("step", "async def step(self, action)"),
    ):
        fn = inspect.getattr_static(cls, method, None)
        if fn is None:
            raise TypeError(f"{name} has no {method} method (expected {signature})")
        if isinstance(fn, staticmethod | classmethod):
            raise TypeError(f"{name}.{method} must be a plain instance method ({signature})")
        fn = getattr(cls, method)
        if fn is getattr(Environment, method):
            raise TypeError(f"{name} does not implement {method} ({signature})")
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"{name}.{method} must be async ({signature})")
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        if len(params) < 2:
            raise TypeError(f"{name}.{method} must take one argument besides self ({signature})")
    close = getattr(cls, "close", None)
    if close is not None and not inspect.iscoroutinefunction(close):
        raise TypeError(f"{name}.close must be async (async def close(self)) when defined")
    make_tasks = inspect.getattr_static(cls, "make_tasks", None)
    if make_tasks is not None and not isinstance(make_tasks, classmethod | staticmethod):
        raise TypeError(f"{name}.make_tasks must be a classmethod (make_tasks(cls, num, seed, **kwargs))")
    tools = inspect.getattr_static(cls, "tools", None)
    if tools is not None and not isinstance(tools, property):
        check_tools(tools, owner=f"{name}.tools")


def env_tools(env: Any) -> list[dict[str, Any]]:
    """The instance's tools, validated (an environment without `tools` has none)."""
    tools = getattr(env, "tools", None)
    if tools is None:
        return []
    return check_tools(tools, owner=f"{type(env).__name__}.tools")


def check_messages(messages: Any, where: str) -> list[Message]:
    """Validate chat messages returned by an environment: a list of dicts with a string role and
    string content. Returns the list; raises TypeError/ValueError naming `where`."""
    if not isinstance(messages, list):
        raise TypeError(f"{where} must be a list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"{where}[{i}] must be a dict, got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise ValueError(f"{where}[{i}] has no string 'role'")
        if not isinstance(m.get("content"), str):
            raise TypeError(f"{where}[{i}].content must be a string, got {type(m.get('content')).__name__}")
    return messages


def coerce_step_result(result: Any) -> StepResult:
    """Normalise what `step` returned into a valid StepResult.

    Accepts a StepResult or a 4-tuple/list (observation, reward, done, info). Raises TypeError or
    ValueError with a one-line reason for wrong types, a non-finite reward, or a non-bool `done`.
    """
    if isinstance(result, StepResult):
        obs, reward, done, info = result.observation, result.reward, result.done, result.info
    elif isinstance(result, tuple | list) and len(result) == 4:
        obs, reward, done, info = result
    else:
        raise TypeError(
            f"step returned {type(result).__name__}, expected StepResult or (obs, reward, done, info)"
        )
    check_messages(obs, "step observation")
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise TypeError(f"step reward must be a float, got {type(reward).__name__}")
    if not math.isfinite(reward):
        raise ValueError(f"step reward must be finite, got {reward}")
    if not isinstance(done, bool):
        raise TypeError(f"step done must be a bool, got {type(done).__name__}")
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise TypeError(f"step info must be a dict, got {type(info).__name__}")
    return StepResult(observation=list(obs), reward=float(reward), done=done, info=dict(info))


def one_line(e: BaseException) -> str:
    """`Type: message` on one line, at most 300 characters: the form failure reasons take in
    `info["error"]` and in error messages that quote an exception."""
    text = " ".join(str(e).split())
    reason = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return reason[:300]


def import_extra(module: str, needed_by: str, library: str, extra: str, error: type[Exception]) -> Any:
    """`module`, from a library only one of pyproject's extras installs (the adapters of other
    ecosystems: openenv, verifiers). Missing, it raises `error` (the adapter's start-up error, so the
    driver's checks report it before Ray starts) saying what needs it and which extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = f"install the extra: pip install -e '.[{extra}]' (make setup installs it)"
        raise error(f"{needed_by} needs the {library} library ({one_line(e)}): {hint}") from e


def tool_message(content: str, call: ToolCall | None = None) -> Message:
    """A tool-result message (role "tool"), linked to the call it answers."""
    msg: Message = {"role": "tool", "content": content}
    if call is not None:
        msg["tool_call_id"] = call.id
        msg["name"] = call.name
    return msg
