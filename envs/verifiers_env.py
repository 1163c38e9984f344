"""`verifiers`: train any installed verifiers environment (PyPI `verifiers`, its v1 API).

    python -m slime.train env=verifiers env.id=NAME [env.kwargs.taskset.KEY=VALUE ...]

`env.id` is the environment's id as verifiers' own loaders resolve it (`vf-eval NAME`): the installed
top-level module named after it (`-` -> `_`, an `owner/` prefix and `@version` suffix dropped), whose
`__all__` exports one `Taskset` subclass (and optionally a `Harness` or `Env`). Installing the package
is the registration. `env.kwargs` is the rest of verifiers' environment config, as its CLI's `--env.*`
flags take it: `env.kwargs.taskset.num_tasks=8` is `--env.taskset.num-tasks 8`,
`env.kwargs.agent.harness.id=...` pins the harness, `env.kwargs.env=best-of-n` pairs the taskset
with a reusable verifiers `Env` (verifiers' `--env.id`).

What maps to what:
- tasks: the taskset's tasks (at most `env.dataset.num_tasks`, in the taskset's order); each slime
  task carries the verifiers task's data (`env_args["verifiers_task"]`, JSON), from which each episode
  rebuilds the task exactly as verifiers' env server does (`TaskData` type, then `Task(data,
  taskset.task config)`).
- episodes: each is one `Env.run_episode` (the taskset's Env, `SingleAgentEnv` for a plain taskset)
  whose model client is the episode's slime endpoint (`rollout/agent/`), as an `openai_agent` episode:
  verifiers' harness program makes its model calls through verifiers' interception server, which
  forwards them unchanged (no sampling overrides: the rollout's sampling applies) to slime's endpoint,
  where every call is recorded token-exactly with its logprobs and policy versions. Nothing is
  re-tokenised: the trajectories are the endpoint's own token ids, never verifiers' messages.
- tools: the task's and taskset's MCP tool servers (`Toolset`s) are served by verifiers as for any
  harness; their schemas reach the model through the endpoint's `tools`, their calls come back as
  OpenAI tool calls, the results go back as `tool` messages of the next call (multi-turn).
- reward: the episode's trainable traces' rewards (verifiers' `Trace.reward`: its `@vf.reward`
  functions, judges and rubric, weighted and summed), averaged over traces when an `Env` runs several;
  the per-function rewards and metrics land in the trajectory's `info["env"]["verifiers"]`.

Defaults that make local, offline runs work (each overridable in `env.kwargs`, per agent role):
`agent.runtime.type=subprocess` (verifiers defaults to a remote Prime sandbox), and, when the taskset
bundles no harness of its own, `agent.harness.id=slime-chat` (`envs/verifiers_harness.py`: verifiers'
`null` chat program run in process, since the stock `null`/`bash` harnesses re-resolve a `uv` script
against PyPI in every process). How many model calls an episode makes is verifiers' to decide
(`env.kwargs.agent.max_turns`); slime bounds the episode's time and each call's tokens.

Failures: an id that is not installed, a config verifiers refuses or a taskset that raises while
loading fail at start-up (`check_env`) with verifiers' message and what to change. An episode verifiers
reports as failed (`Episode.ok` false: the harness, a tool server, a reward function or judge raised,
a reward that is not a number, ...) fails that episode only, with verifiers' error as its reason.

All verifiers episodes of a worker share one event loop in a thread of their own (`_ServingLoop`),
where verifiers' serving resources (the interception server, taskset-scoped tool servers) stay up for
the worker's life; the agent thread of each episode (rollout/agent/runner.py) waits on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import importlib.metadata
import importlib.util
import math
import sys
import threading
from typing import Any

from envs.base import import_extra, one_line
from envs.openai_agent import OpenAIAgentEnv
from slime.core.types import Message, Task

LOCAL_RUNTIME = {"type": "subprocess"}
TASK_KEY = "verifiers_task"  # env_args key holding the verifiers task's data


class VerifiersError(ValueError):
    """The verifiers environment cannot be loaded as configured (start-up)."""


class VerifiersEpisodeError(RuntimeError):
    """verifiers reported the episode as failed; the message is its reason."""


def import_verifiers() -> Any:
    """`verifiers.v1`, with the harness module registered under the id verifiers resolves."""
    vf = import_extra("verifiers.v1", "env=verifiers", "verifiers", "verifiers", VerifiersError)
    from envs import verifiers_harness

    sys.modules.setdefault(verifiers_harness.MODULE_NAME, verifiers_harness)
    return vf


def _plain(value: Any) -> Any:
    """Config values as plain dicts/lists (Hydra hands over DictConfig-free values already; be safe)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def build_config(vf: Any, env_id: str, kwargs: dict[str, Any]) -> Any:
    """verifiers' EnvConfig for `env_id` + `kwargs`, with slime's local defaults (module docstring)."""
    from verifiers.v1.configs.agent import AgentConfig

    data = copy.deepcopy(_plain(kwargs))
    pair = data.pop("env", None)
    if "id" in data:
        raise VerifiersError(
            "env.kwargs.id is not used by env=verifiers: the taskset is env.id, a verifiers Env to pair it "
            "with is env.kwargs.env"
        )
    if pair:
        data["id"] = pair
    taskset = data.setdefault("taskset", {})
    if not isinstance(taskset, dict):
        raise VerifiersError(f"env.kwargs.taskset must be a mapping of taskset settings, got {taskset!r}")
    if taskset.get("id") not in (None, env_id):
        raise VerifiersError(
            f"env.kwargs.taskset.id={taskset['id']!r} differs from env.id={env_id!r}: set only env.id"
        )
    taskset["id"] = env_id
    try:
        config = vf.resolve_env_config(data)
        bundled = vf.default_harness_id(env_id)
        roles = [name for name, value in config if isinstance(value, AgentConfig)]
        for role in roles:
            seat = data.setdefault(role, {})
            if not isinstance(seat, dict):
                raise VerifiersError(f"env.kwargs.{role} must be a mapping of agent settings, got {seat!r}")
            seat.setdefault("runtime", dict(LOCAL_RUNTIME))
            if seat.get("harness") is None and bundled == "bash":
                seat["harness"] = {"id": "slime-chat"}
        return vf.resolve_env_config(data)
    except VerifiersError:
        raise
    except ModuleNotFoundError as e:
        raise VerifiersError(
            f"env.id={env_id!r}: {e} Install the environment's package into slime's environment "
            f"(pip install ...), or see `python -m envs list` for the installed ones"
        ) from e
    except Exception as e:
        raise VerifiersError(
            f"env=verifiers env.id={env_id!r}: verifiers refused the config: {one_line(e)}"
        ) from e


def _check_local(config: Any) -> None:
    """The in-process harness needs a local runtime (its MCP URLs must be reachable from here)."""
    from verifiers.v1.configs.agent import AgentConfig

    for role, seat in config:
        if not isinstance(seat, AgentConfig) or seat.harness is None:
            continue
        if seat.harness.id == "slime-chat" and getattr(seat.runtime, "type", None) != "subprocess":
            raise VerifiersError(
                f"env.kwargs.{role}.runtime.type={seat.runtime.type!r}: the slime-chat harness runs in the "
                f"rollout worker's process, so it needs env.kwargs.{role}.runtime.type=subprocess"
            )


def _messages(data: Any) -> list[Message]:
    """The task's prompt as slime chat messages (for display and the agent's task dict)."""
    from verifiers.v1.types import content_text

    out: list[Message] = []
    if data.system_prompt:
        out.append({"role": "system", "content": data.system_prompt})
    if isinstance(data.prompt, str):
        out.append({"role": "user", "content": data.prompt})
    else:
        for m in data.prompt or []:
            out.append({"role": str(m.role), "content": content_text(m.content) or ""})
    if not any(m["role"] != "system" for m in out):
        out.append({"role": "user", "content": "(this verifiers task has no prompt: its environment opens)"})
    return out


class _ServingLoop:
    """verifiers' `Env.serving()` held open on an event loop in a daemon thread; episodes run there."""

    def __init__(self, vf_env: Any) -> None:
        self.vf_env = vf_env
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: concurrent.futures.Future[None] | None = None

    def _start(self) -> concurrent.futures.Future[None]:
        with self._lock:
            if self._ready is None:
                self._ready = concurrent.futures.Future()
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="slime-verifiers", daemon=True).start()
                self._loop = loop
                asyncio.run_coroutine_threadsafe(self._serve(), loop)
            return self._ready

    async def _serve(self) -> None:
        assert self._ready is not None
        try:
            self._cm = self.vf_env.serving()
            await self._cm.__aenter__()
        except BaseException as e:  # noqa: BLE001 - every episode of this worker reports it
            self._ready.set_exception(VerifiersEpisodeError(f"verifiers Env.serving() failed: {one_line(e)}"))
        else:
            self._ready.set_result(None)

    async def run(self, make: Any) -> Any:
        """Await `make()` (a coroutine function) on the serving loop; cancelling this cancels it there."""
        await asyncio.wrap_future(self._start())
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(make(), self._loop)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is None or self._ready is None or not self._ready.done() or self._ready.exception():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._cm.__aexit__(None, None, None), self._loop).result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)


class VerifiersEnv(OpenAIAgentEnv):
    """`env=verifiers env.id=NAME`: a verifiers environment's episodes as black-box agent episodes."""

    TASKS_FROM_KWARGS = True  # make_tasks gets env.kwargs too: the taskset is part of the environment

    def __init__(self, id: str = "", **config: Any) -> None:  # noqa: A002 - env.id
        if not isinstance(id, str) or not id.strip():
            raise VerifiersError("env=verifiers needs env.id=NAME: the verifiers environment (taskset) id")
        self.vf = import_verifiers()
        self.env_id = id.strip()
        self.config = build_config(self.vf, self.env_id, config)
        _check_local(self.config)
        try:
            self.vf_env = self.vf.load_environment(self.config)
        except Exception as e:
            raise VerifiersError(
                f"env=verifiers env.id={self.env_id!r}: loading the environment raised {one_line(e)}"
            ) from e
        self.task_cls = type(self.vf_env.taskset).task_type()
        self.data_cls = self.task_cls.data_type()
        excluded = [n for n, f in self.data_cls.model_fields.items() if f.exclude]
        if excluded:
            raise VerifiersError(
                f"env.id={self.env_id!r}: {self.data_cls.__name__} excludes {excluded} from serialization; slime "
                "carries each task as its data, so every field must survive model_dump (drop exclude=True)"
            )
        self._serving = _ServingLoop(self.vf_env)

    # ------------------------------------------------------------------ tasks

    @classmethod
    def make_tasks(cls, num: int, seed: int, id: str = "", **config: Any) -> list[Task]:  # noqa: A002
        """The taskset's first `num` tasks as slime tasks (`seed` is slime's: it shuffles them per epoch)."""
        return cls(id=id, **config).tasks(num)

    def tasks(self, num: int) -> list[Task]:
        taskset = self.vf_env.taskset
        try:
            loaded = list(taskset.take(num) if num else taskset)
        except Exception as e:
            raise VerifiersError(
                f"env=verifiers env.id={self.env_id!r}: loading its tasks raised {one_line(e)}"
            ) from e
        out = []
        for vf_task in loaded:
            data = vf_task.data
            task_id = str(data.id) if data.id is not None else f"{self.env_id}-{data.idx}"
            out.append(
                Task(
                    id=task_id,
                    prompt=_messages(data),
                    env="verifiers",
                    env_args={TASK_KEY: data.model_dump(mode="json")},
                )
            )
        return out

    def verifiers_task(self, task: dict[str, Any]) -> Any:
        """The verifiers task a slime task carries, rebuilt as verifiers' env server rebuilds one."""
        raw = (task.get("env_args") or {}).get(TASK_KEY)
        if not isinstance(raw, dict):
            raise VerifiersEpisodeError(
                f"task {task.get('id')!r} carries no verifiers task (env_args[{TASK_KEY!r}]): env=verifiers "
                "makes its own tasks; leave env.dataset.path unset"
            )
        return self.task_cls(self.data_cls.model_validate(raw), self.vf_env.config.taskset.task)

    # ------------------------------------------------------------------ episodes

    async def run_agent(self, base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
        """One verifiers episode against the episode's endpoint (the agent function of this env)."""
        vf = self.vf
        vf_task = self.verifiers_task(task)
        ctx = vf.ModelContext(
            model=model,
            client=vf.EvalClientConfig(base_url=base_url, api_key_var="SLIME_ENDPOINT_KEY"),
            sampling=vf.Sampling(),  # none: the endpoint applies the rollout's sampling
        )

        async def episode() -> Any:
            return await self.vf_env.run_episode(vf_task, ctx)

        ep = await self._serving.run(episode)
        return episode_result(ep)

    async def close(self) -> None:
        """Shut the serving resources down (the worker calls this when it stops)."""
        await asyncio.to_thread(self._serving.stop)


def episode_result(ep: Any) -> dict[str, Any]:
    """{"reward", "info"} of a finished verifiers Episode; VerifiersEpisodeError when it failed."""
    if not ep.ok:
        raise VerifiersEpisodeError(f"verifiers episode failed: {failure_reason(ep)}")
    traces = [t for t in ep.traces if t.agent.trainable] or list(ep.traces)
    rewards = [t.reward for t in traces]
    bad = [r for r in rewards if not isinstance(r, int | float) or not math.isfinite(r)]
    if bad:
        raise VerifiersEpisodeError(f"verifiers episode's reward is not a finite number: {bad[0]!r}")
    per_trace = [
        {
            "agent": t.agent.name,
            "reward": float(t.reward),
            "rewards": {k: (None if r is None else float(r.value)) for k, r in t.rewards.items()},
            "metrics": {k: _finite_or_none(v) for k, v in t.metrics.items()},
            "stop": t.stop_condition,
        }
        for t in ep.traces
    ]
    return {
        "reward": float(sum(rewards) / len(rewards)),
        "info": {"verifiers": {"episode": ep.id, "traces": per_trace}},
    }


def _finite_or_none(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def failure_reason(ep: Any) -> str:
    """The most specific error verifiers recorded on a failed episode, on one line."""
    errors = [*(e for t in ep.traces for e in t.errors), *ep.errors]
    if not errors:
        return "no error recorded (a trace did not complete)"
    e = errors[0]
    text = " ".join(f"{e.type}: {e.message}".split())
    return text[:400]


# ------------------------------------------------------------------ discovery (python -m envs list)


def installed_environments() -> dict[str, str]:
    """Installed verifiers environments: id -> "module:TasksetClass", for packages that depend on
    verifiers and export a Taskset subclass (verifiers has no registry: installing is registering).
    Empty when verifiers is not installed. Imports each candidate module."""
    try:
        import_verifiers()
    except VerifiersError:
        return {}
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or ""
        requires = dist.requires or []
        if name.lower() == "verifiers" or not any(_req_name(r) == "verifiers" for r in requires):
            continue
        module = name.replace("-", "_").lower()
        if importlib.util.find_spec(module) is None:
            continue
        try:
            from verifiers.v1.utils.loaders import taskset_class

            cls = taskset_class(name)
        except Exception:  # noqa: BLE001 - a package that depends on verifiers but exports no taskset
            continue
        found[name] = f"{cls.__module__}:{cls.__qualname__}"
    return dict(sorted(found.items()))


def _req_name(requirement: str) -> str:
    import re

    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")
