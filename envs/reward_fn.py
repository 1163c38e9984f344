"""`reward_fn`: single-turn prompts from a dataset, scored by reward functions written as for TRL.

    python -m slime.train env=reward_fn env.dataset.path=data.jsonl \\
        'env.kwargs.reward=[my_pkg.rewards:correct,my_pkg.rewards:short]' 'env.kwargs.reward_weights=[1.0,0.2]'

The model answers each prompt once; the episode's reward is the weighted sum of the reward functions'
values for that answer.

Reward functions have the signature TRL's GRPOTrainer uses, sync or async:

    def correct(prompts: list, completions: list, **columns) -> list[float | None]

They are called by keyword. `prompts` holds the dataset row's `prompt` as it is (a string, or a
list of chat messages), `completions` the model's reply (a string for a string prompt, else
`[{"role": "assistant", "content": reply}]`, as TRL passes them), and each dataset column (a
row's columns other than `id`/`prompt` reach the environment as `task.env_args`, see
envs/dataset.py) is passed as a keyword argument holding a list. A function without `**kwargs`
gets only the columns it names, so `def correct(completions, answer)` works too;
`env.kwargs.columns=[...]` limits what is passed (default: every column). TRL's
`completion_ids` and `trainer_state` are not passed.

Batch semantics: one environment instance runs one episode, so each function is called once per
completion, with lists of length 1 (TRL calls it once per batch). It must return a list of exactly
one value: a number, or None when the function does not apply to the sample (it then adds 0, as
TRL's nan-sum does; NaN counts as None). Sync functions run in a worker thread, so a slow one never
stalls the engine that shares the worker's event loop; calls for different episodes may therefore
run at the same time.

Failures: a function that raises, returns the wrong number of values or a non-number fails that
episode (status FAILED, the reason in `info["error"]`, counted in `episode/failed`), as any
environment failure does. The dotted paths, the functions' signatures and `reward_weights` are
checked when the environment is built, which `slime.train` does once at start-up: a wrong
`env.kwargs.reward` stops the run before any actor starts.

`info["rewards"]` holds each function's value for the episode (None where it did not apply).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from envs.base import Action, Environment, StepResult, one_line
from slime.core.types import Message, Task

_FIX = "set env.kwargs.reward=[package.module:function,...] (functions fn(prompts, completions, **columns))"


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable (fails the episode)."""


@dataclass(frozen=True)
class RewardFunction:
    """One resolved reward function and what its signature accepts."""

    name: str  # shown in info["rewards"] and in errors
    fn: Callable[..., Any]
    weight: float
    is_async: bool
    takes_prompts: bool
    takes_any_column: bool  # it has **kwargs: every selected column is passed
    named: frozenset[str]  # keyword parameters it names
    required: frozenset[str]  # of those, the ones without a default

    def arguments(
        self, prompt: Any, completion: Any, columns: dict[str, Any], task_id: str
    ) -> dict[str, Any]:
        """The keyword arguments of one call (lists of length 1). Raises RewardFunctionError when a
        column the function requires is not in the row."""
        kwargs: dict[str, Any] = {"completions": [completion]}
        if self.takes_prompts:
            kwargs["prompts"] = [prompt]
        for key, value in columns.items():
            if key not in kwargs and (self.takes_any_column or key in self.named):
                kwargs[key] = [value]
        missing = sorted(self.required - kwargs.keys())
        if missing:
            raise RewardFunctionError(
                f"reward function {self.name} needs column(s) {', '.join(missing)}, which task {task_id!r} "
                f"does not pass (its columns: {', '.join(sorted(columns)) or 'none'}; see env.kwargs.columns)"
            )
        return kwargs

    async def __call__(self, kwargs: dict[str, Any]) -> float | None:
        """The function's value for the one completion in `kwargs`: a finite float, or None."""
        try:
            if self.is_async:
                out = await self.fn(**kwargs)
            else:
                out = await asyncio.to_thread(functools.partial(self.fn, **kwargs))
                if inspect.isawaitable(out):
                    out = await out
        except Exception as e:
            raise RewardFunctionError(f"reward function {self.name} raised {one_line(e)}") from e
        return _one_value(out, self.name)


def _one_value(out: Any, name: str) -> float | None:
    """The single value of a reward function's result (a list of one number or None)."""
    if hasattr(out, "tolist") and not isinstance(out, list | tuple):  # numpy arrays, torch tensors
        out = out.tolist()
    if not isinstance(out, list | tuple):
        raise RewardFunctionError(
            f"reward function {name} returned {type(out).__name__}; it must return a list with one float "
            "(or None) per completion"
        )
    if len(out) != 1:
        raise RewardFunctionError(
            f"reward function {name} returned {len(out)} values for 1 completion; it must return one float "
            "(or None) per completion"
        )
    value = out[0]
    if value is None:
        return None
    if not isinstance(value, numbers.Real):
        raise RewardFunctionError(f"reward function {name} returned a {type(value).__name__}, not a number")
    value = float(value)
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise RewardFunctionError(f"reward function {name} returned {value}; rewards must be finite")
    return value


@functools.lru_cache(maxsize=256)
def _import(path: str) -> Callable[..., Any]:
    from envs.registry import import_object

    return import_object(path, f"env.kwargs.reward={path!r}", kind="function")


def load_reward_function(
    spec: str | Callable[..., Any], weight: float = 1.0, columns: Sequence[str] | None = None
) -> RewardFunction:
    """Resolve `spec` (`package.module:function`, or a callable) and check its signature.

    `columns`: the columns that will be passed (None: any). Raises ValueError naming
    `env.kwargs.reward` and what to change when the path does not resolve to a callable, or the
    signature cannot take `completions` (and the required columns) by keyword.
    """
    if isinstance(spec, str):
        fn = _import(spec.strip())
        name = spec.strip()
    elif callable(spec):
        fn, name = spec, getattr(spec, "__qualname__", None) or repr(spec)
    else:
        raise ValueError(f"env.kwargs.reward: {spec!r} is neither a string nor a callable; {_FIX}")
    where = f"env.kwargs.reward: {name}"
    if inspect.isclass(fn) or not callable(fn):
        raise ValueError(f"{where} is a {type(fn).__name__}, not a function; {_FIX}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its signature cannot be read ({one_line(e)}); wrap it in a def") from e
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    keyword = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    positional_only = [p.name for p in params if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only:
        raise ValueError(
            f"{where} has positional-only parameters ({', '.join(positional_only)}); reward functions are "
            "called by keyword: fn(prompts=[...], completions=[...], **columns)"
        )
    named = frozenset(p.name for p in keyword)
    if "completions" not in named and not var_kw:
        raise ValueError(
            f"{where} does not accept `completions`; write it as fn(prompts, completions, **columns) "
            "(the names matter: it is called by keyword)"
        )
    required = frozenset(p.name for p in keyword if p.default is p.empty)
    if columns is not None:
        unknown = sorted(required - {"prompts", "completions"} - set(columns))
        if unknown:
            raise ValueError(
                f"{where} requires {', '.join(unknown)}, which env.kwargs.columns={list(columns)} does not "
                "pass: add them to env.kwargs.columns, or give those parameters defaults"
            )
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"env.kwargs.reward_weights: {weight!r} for {name} must be a finite number")
    return RewardFunction(
        name=name,
        fn=fn,
        weight=float(weight),
        # An async def, or an object whose __call__ is one.
        is_async=inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__),
        takes_prompts="prompts" in named or var_kw,
        takes_any_column=var_kw,
        named=named,
        required=required,
    )


class RewardFnEnv(Environment):
    """Single turn, rewarded by TRL-style reward functions (see the module docstring).

    kwargs: reward (one `package.module:function` or a list of them; required), reward_weights
    (one number per function; default 1.0 each), columns (the dataset columns passed to the
    functions; default all), system_prompt (prepended as a system message when the prompt has none).
    """

    tools: list[dict[str, Any]] = []

    def __init__(
        self,
        reward: str | Sequence[str | Callable[..., Any]] = MISSING,  # required (docs/config.md says so)
        reward_weights: Sequence[float] | None = None,
        columns: Sequence[str] | None = None,
        system_prompt: str = "",
    ):
        single = isinstance(reward, str) or callable(reward) or not isinstance(reward, Iterable)
        specs = [reward] if single else list(reward)
        if not specs or specs == [MISSING]:
            raise ValueError(f"env.kwargs.reward is required: {_FIX}")
        weights = [1.0] * len(specs) if reward_weights is None else list(reward_weights)
        if len(weights) != len(specs):
            raise ValueError(
                f"env.kwargs.reward_weights has {len(weights)} entries for {len(specs)} reward functions: "
                "give one weight per function in env.kwargs.reward, in the same order"
            )
        if columns is not None and (isinstance(columns, str) or not all(isinstance(c, str) for c in columns)):
            raise ValueError(f"env.kwargs.columns must be a list of column names, got {columns!r}")
        self.columns = None if columns is None else list(columns)
        self.functions = [
            load_reward_function(s, w, self.columns) for s, w in zip(specs, weights, strict=True)
        ]
        names = [f.name.rpartition(":")[2] for f in self.functions]
        # Short names in info["rewards"] unless two functions share one.
        self._labels = names if len(set(names)) == len(names) else [f.name for f in self.functions]
        self.system_prompt = system_prompt
        self.task: Task | None = None

    async def reset(self, task: Task) -> list[Message]:
        if self.columns is not None:
            missing = [c for c in self.columns if c not in task.env_args]
            if missing:
                raise ValueError(
                    f"task {task.id!r} has no column(s) {', '.join(missing)} named in env.kwargs.columns "
                    f"(its columns: {', '.join(sorted(task.env_args)) or 'none'})"
                )
        self.task = task
        messages = task.messages()
        if self.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    async def step(self, action: Action) -> StepResult:
        task = self.task
        if task is None:
            raise RuntimeError("step before reset")
        text = action.content
        completion: Any = text if isinstance(task.prompt, str) else [{"role": "assistant", "content": text}]
        columns = dict(task.env_args) if self.columns is None else {c: task.env_args[c] for c in self.columns}
        calls = [f.arguments(task.prompt, completion, columns, task.id) for f in self.functions]
        results = await asyncio.gather(
            *(f(kw) for f, kw in zip(self.functions, calls, strict=True)), return_exceptions=True
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r
        values: list[float | None] = list(results)  # type: ignore[arg-type]
        reward = sum(f.weight * v for f, v in zip(self.functions, values, strict=True) if v is not None)
        return StepResult(
            observation=[],
            reward=float(reward),
            done=True,
            info={"rewards": dict(zip(self._labels, values, strict=True))},
        )
