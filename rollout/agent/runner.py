"""Black-box agent episodes: an agent function talks to the OpenAI-compatible endpoint; its calls
become trajectories.

The agent (`env=openai_agent env.agent=package.module:function`) is

    async def run(base_url: str, model: str, task: dict) -> float | dict

returning the episode's reward, or `{"reward": float, "info": dict}`. `task` is the dataset row as a
dict: `id`, `prompt` (as stored), `messages` (the prompt as chat messages), `env`, `env_args`. Each
episode gets its own session on the worker's `AgentServer` (rollout/agent/server.py) and so its own
base URL; every model call is recorded token-exactly there.

From calls to trajectories (`build_segments`): calls are taken in completion order. A call whose
prompt ids start with the full token sequence of an existing segment (its prompt and completions so
far) continues that segment: the new prompt ids beyond that sequence are appended with loss_mask 0,
then the generated ids with loss_mask 1, their logprobs and versions. When several segments match, the
longest wins. Any other call starts a new segment (a new Trajectory). With one conversation this is
exactly "extends the previous call"; agents that run several conversations at once (sub-agents) get
one segment per conversation instead of one per call. Every segment gets the episode's reward.

Containment: the agent runs in its own thread with its own event loop, so an agent that blocks (a
synchronous HTTP client inside `async def`, CPU work) cannot stall the worker's loop where the engine
and the endpoint run. An agent that raises, runs past the timeout (`rollout.agent_timeout_s`, or
`rollout.step_timeout_s * rollout.max_turns` when that is 0) or returns a malformed value fails that
episode only: one Trajectory with status FAILED, reward 0 and a one-line `info["error"]` (holding the
tokens of the last segment, if any). When the endpoint refused the agent's last request (a tool type it
does not know, sampling the trainer cannot score, ...), the reason starts with that refusal
(`/v1/messages refused: tools[0]: ...`), then the agent's own error in parentheses. An agent that made no model call fails too (there is nothing to
train on). Engine exceptions are not the agent's fault: they propagate, as in rollout/episode.py.

Segment status: COMPLETED, or TRUNCATED when its last call stopped at the token limit (`length`), or
ABORTED when a call in it was aborted by the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from envs.base import one_line
from envs.registry import import_object
from rollout.agent.session import CallRecord
from rollout.chat import ChatFormat
from rollout.engines.base import Engine
from rollout.episode import failed_trajectory
from rollout.tokens import TokenLog
from slime.core.config import RolloutConfig
from slime.core.types import Status, Task, Trajectory

if TYPE_CHECKING:  # the server imports FastAPI: loading an agent (slime.train) must not need it
    from rollout.agent.server import AgentServer

AgentFn = Callable[[str, str, dict[str, Any]], Any]


# Client libraries agents are written with, by import name -> pip name.
_CLIENT_PACKAGES = {"openai": "openai", "anthropic": "anthropic"}


class AgentLoadError(ValueError):
    """`env.agent` does not name a usable agent function."""


class AgentFailure(Exception):
    """The agent failed this episode; the message is the one-line reason."""


# ------------------------------------------------------------------------------ loading


def load_agent(dotted: str) -> AgentFn:
    """Import `package.module:function` and check that it is `async def f(base_url, model, task)`.

    Raises AgentLoadError (a ValueError) whose message names what is wrong: the format, the module
    that fails to import (with the pip command when it needs an API client library that is missing), the missing attribute, a non-async target, or a signature that cannot take
    the three positional arguments.
    """
    if not isinstance(dotted, str) or not dotted.strip():
        raise AgentLoadError("env.agent must name the agent as package.module:function")
    dotted = dotted.strip()
    try:
        obj = import_object(dotted, f"env.agent={dotted!r}", kind="function", error=AgentLoadError)
    except AgentLoadError as e:
        missing = e.__cause__.name if isinstance(e.__cause__, ModuleNotFoundError) else None
        if missing in _CLIENT_PACKAGES:
            # An agent written for an API whose client library is not installed here.
            raise AgentLoadError(
                f"{e}: install the {missing} client library (`pip install {_CLIENT_PACKAGES[missing]}`; "
                "`make setup` installs it with slime's dependencies)"
            ) from e
        raise
    attr = dotted.partition(":")[2]
    if inspect.isclass(obj) or not callable(obj):
        raise AgentLoadError(
            f"env.agent={dotted!r} is a {type(obj).__name__}, "
            f"expected async def {attr}(base_url, model, task)"
        )
    if not inspect.iscoroutinefunction(obj):
        raise AgentLoadError(
            f"env.agent={dotted!r} is not an async function; "
            f"define it as async def {attr}(base_url, model, task)"
        )
    try:
        inspect.signature(obj).bind("http://127.0.0.1:1/v1", "model", {})
    except TypeError:
        raise AgentLoadError(
            f"env.agent={dotted!r} must take three positional arguments (base_url, model, task); "
            f"its signature is {attr}{inspect.signature(obj)}"
        ) from None
    except ValueError:
        pass  # no introspectable signature (some builtins): let the call decide
    return obj


def env_agent(env: Any, agent: str) -> AgentFn:
    """The agent function of an agent environment instance: its own `run_agent` method when it has
    one (env=verifiers: the agent is the ecosystem's harness, built from env.kwargs), else the function
    `env.agent` names. AgentLoadError when `env.agent` is missing, unloadable, or set for an
    environment that brings its own agent."""
    own = getattr(env, "run_agent", None)
    if own is None:
        return load_agent(agent)
    if agent:
        raise AgentLoadError(
            f"env.agent={agent!r} is set but {type(env).__name__} runs its own agent "
            "(its episodes are driven by its ecosystem's harness): remove env.agent"
        )
    if not inspect.iscoroutinefunction(own):
        raise AgentLoadError(
            f"{type(env).__name__}.run_agent must be async def run_agent(base_url, model, task)"
        )
    return own


def coerce_agent_result(value: Any) -> tuple[float, dict[str, Any]]:
    """(reward, info) from what the agent returned: a finite number, or {"reward": number, "info": dict}.

    Raises AgentFailure naming what is malformed (bools are rejected: a reward is a number; info must
    be JSON-serialisable, since accepted trajectories are recorded as JSON).
    """

    def number(x: Any, what: str) -> float:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise AgentFailure(f"agent returned {what} of type {type(x).__name__}; expected a float")
        if not math.isfinite(x):
            raise AgentFailure(f"agent returned a non-finite {what}: {x}")
        return float(x)

    if isinstance(value, dict):
        unknown = sorted(set(value) - {"reward", "info"})
        if unknown:
            raise AgentFailure(
                f"agent returned a dict with unknown keys {unknown}; expected 'reward' and 'info'"
            )
        if "reward" not in value:
            raise AgentFailure("agent returned a dict without 'reward'")
        info = value.get("info") or {}
        if not isinstance(info, dict):
            raise AgentFailure(f"agent returned info of type {type(info).__name__}; expected a dict")
        try:
            # The buffer records trajectories as JSON: an info that cannot be written would fail later,
            # far from its cause.
            json.dumps(info)
        except (TypeError, ValueError) as e:
            raise AgentFailure(f"agent returned an info dict that is not JSON-serialisable ({e})") from None
        return number(value["reward"], "reward"), dict(info)
    return number(value, "a reward"), {}


# ------------------------------------------------------------------------------ segments


@dataclass
class Segment(TokenLog):
    """One trajectory's worth of calls (see the module docstring): their token log and the calls."""

    calls: list[CallRecord] = field(default_factory=list)

    def add(self, call: CallRecord) -> None:
        """Append the call's new prompt ids (mask 0) and its generated ids (mask 1)."""
        if not self.calls:
            self.prompt_len = len(call.prompt_ids)
        self.add_context(call.prompt_ids[len(self.token_ids) :])
        self.add_generated(
            call.completion_ids,
            call.logprobs,
            call.versions,
            call.routed_experts,
            call.indexer_keys,
            kept=call.sample_kept,
        )
        self.calls.append(call)


def build_segments(calls: list[CallRecord]) -> list[Segment]:
    """Group calls into token-exact segments (see the module docstring). Pure; order-preserving."""
    segments: list[Segment] = []
    for call in calls:
        target: Segment | None = None
        for seg in segments:
            n = len(seg.token_ids)
            if len(call.prompt_ids) >= n and call.prompt_ids[:n] == seg.token_ids:
                if target is None or n > len(target.token_ids):
                    target = seg
        if target is None:
            target = Segment()
            segments.append(target)
        target.add(call)
    return segments


def _segment_status(seg: Segment) -> tuple[Status, str]:
    if any(c.finish_reason == "abort" for c in seg.calls):
        return Status.ABORTED, "abort"
    if seg.calls[-1].finish_reason == "length":
        return Status.TRUNCATED, "length"
    return Status.COMPLETED, "done"


# ------------------------------------------------------------------------------ running agents


def agent_timeout(cfg: RolloutConfig) -> float | None:
    """Seconds one agent episode may run: rollout.agent_timeout_s, else step_timeout_s * max_turns."""
    explicit = float(getattr(cfg, "agent_timeout_s", 0.0) or 0.0)
    if explicit > 0:
        return explicit
    if cfg.step_timeout_s and cfg.step_timeout_s > 0:
        return float(cfg.step_timeout_s) * max(1, cfg.max_turns)
    return None


async def _call_in_thread(agent_fn: AgentFn, args: tuple[Any, ...], name: str) -> Any:
    """Run `await agent_fn(*args)` on a fresh event loop in a daemon thread; await its result here.

    Cancelling the awaiting task cancels the agent's task in its loop (an agent stuck in blocking code
    finishes whenever that code returns; its thread is a daemon and its later calls find the session
    closed).
    """
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()
    handle: dict[str, Any] = {}
    cancel_requested = threading.Event()

    async def main() -> Any:
        handle["loop"], handle["task"] = asyncio.get_running_loop(), asyncio.current_task()
        if cancel_requested.is_set():
            raise asyncio.CancelledError
        return await agent_fn(*args)

    def thread_main() -> None:
        # The awaiting side may cancel `done` at any moment: a result that arrives after that is dropped.
        try:
            result = asyncio.run(main())
        except BaseException as e:  # everything the agent raises goes back to the episode
            if not isinstance(e, Exception):
                # SystemExit, KeyboardInterrupt or its own CancelledError must not reach the worker's
                # loop as such: they end this episode only.
                e = RuntimeError(f"{type(e).__name__} {e}".strip())
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                done.set_exception(e)
        else:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                done.set_result(result)

    threading.Thread(target=thread_main, name=name, daemon=True).start()
    try:
        return await asyncio.wrap_future(done)
    except asyncio.CancelledError:
        cancel_requested.set()
        loop, task = handle.get("loop"), handle.get("task")
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the agent's loop closed in the meantime: it is finished anyway
        raise


async def _run_agent(
    agent_fn: AgentFn,
    session_url: str,
    model: str,
    task: dict[str, Any],
    timeout: float | None,
    engine_failed: asyncio.Event,
    name: str,
) -> Any:
    """The agent's return value; AgentFailure for raise / timeout; engine errors re-raised by the caller."""
    agent = asyncio.ensure_future(_call_in_thread(agent_fn, (session_url, model, task), name))
    engine_wait = asyncio.ensure_future(engine_failed.wait())
    try:
        done, _ = await asyncio.wait(
            {agent, engine_wait}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for fut in (agent, engine_wait):
            if not fut.done():
                fut.cancel()
        # Let the cancellation reach the thread hand-off before returning.
        await asyncio.gather(agent, engine_wait, return_exceptions=True)
    if agent in done:
        exc = agent.exception()
        if exc is not None:
            raise AgentFailure(f"agent raised {one_line(exc)}") from exc
        return agent.result()
    if engine_wait in done:
        return None  # the caller sees session.engine_error
    raise AgentFailure(f"agent timed out after {timeout:g}s")


def _task_dict(task: Task) -> dict[str, Any]:
    d = dataclasses.asdict(task)  # a deep copy: the agent cannot change the shared task
    d["messages"] = task.messages()
    return d


async def run_agent_episode(
    engine: Engine,
    server: AgentServer,
    task: Task,
    agent_fn: AgentFn,
    cfg: RolloutConfig,
    episode_index: int = 0,
) -> list[Trajectory]:
    """Run one agent episode; returns its segments as trajectories (one FAILED trajectory on failure).

    Never raises for agent failures; raises RuntimeError (from the engine's exception) when the engine
    failed during one of the agent's calls. Each trajectory's info: end_reason (its segment's),
    segment, num_segments, and, episode-level and the same in every segment, tool_calls,
    malformed_tool_calls, segments, env (the agent's info dict), episode_id, episode, calls, and
    error when FAILED. Timings: generate_s (this segment's calls), env_s (episode time
    outside generation), total_s (episode wall time).
    """
    t0 = time.perf_counter()
    start_version = int(engine.version)
    # The id is a URL path segment: keep it readable (task id first) but plain.
    eid = re.sub(r"[^A-Za-z0-9._-]", "_", f"{task.id}")[:64] + f"-{episode_index}-{uuid.uuid4().hex[:8]}"
    session = server.open_episode(eid)
    error: str | None = None
    reward, agent_info = 0.0, {}
    try:
        try:
            value = await _run_agent(
                agent_fn,
                session.base_url,
                server.model_name,
                _task_dict(task),
                agent_timeout(cfg),
                session.engine_failed,
                name=f"agent-{session.episode_id}",
            )
            if session.engine_error is None:
                reward, agent_info = coerce_agent_result(value)
        except AgentFailure as e:
            error = str(e)
    finally:
        await server.close_episode(session)
    if session.engine_error is not None:
        raise RuntimeError(
            f"engine failed during agent episode {session.episode_id}"
        ) from session.engine_error

    total_s = time.perf_counter() - t0
    segments = build_segments(session.calls)
    generate_all = sum(c.generate_s for c in session.calls)
    if error is None and not segments:
        error = "agent made no model calls"
    if error is not None and session.refused is not None:
        # The agent gave up after the endpoint refused a request: that refusal names what to fix (an
        # unsupported tool type, sampling the trainer cannot score, ...); the agent's own error follows.
        error = f"{session.refused} ({error})"
    # Episode-level, shared by every segment (as rollout/episode.py's segments share theirs).
    common = {
        "episode_id": session.episode_id,
        "episode": episode_index,
        "calls": len(session.calls),
        "tool_calls": sum(c.tool_calls for c in session.calls),
        "malformed_tool_calls": sum(c.malformed_tool_call for c in session.calls),
        "segments": len(segments),
        "env": agent_info,
    }

    if error is not None:
        traj = failed_trajectory(task, start_version, error)
        if segments:
            seg = segments[-1]
            traj = dataclasses.replace(
                traj,
                token_ids=seg.token_ids,
                loss_mask=seg.loss_mask,
                behavior_logprobs=seg.logprobs,
                versions=seg.versions,
                prompt_len=seg.prompt_len,
                turns=len(seg.calls),
                routed_experts=seg.final_routes(),
                indexer_keys=seg.final_keys(),
                sample_kept=seg.final_kept(),
            )
        traj.info.update(common, segment=len(segments) - 1, num_segments=len(segments))
        traj.episode_id = session.episode_id
        traj.timings = {
            "generate_s": generate_all,
            "env_s": max(0.0, total_s - generate_all),
            "total_s": total_s,
        }
        return [traj]

    out = []
    for j, seg in enumerate(segments):
        status, end_reason = _segment_status(seg)
        generate_s = sum(c.generate_s for c in seg.calls)
        out.append(
            Trajectory(
                task_id=task.id,
                token_ids=seg.token_ids,
                loss_mask=seg.loss_mask,
                behavior_logprobs=seg.logprobs,
                versions=seg.versions,
                prompt_len=seg.prompt_len,
                reward=reward,
                status=status,
                turns=len(session.calls),
                info={
                    "end_reason": end_reason,
                    **common,
                    "env": dict(agent_info),
                    "segment": j,
                    "num_segments": len(segments),
                },
                timings={
                    "generate_s": generate_s,
                    "env_s": max(0.0, total_s - generate_all),
                    "total_s": total_s,
                },
                start_version=start_version,
                routed_experts=seg.final_routes(),
                indexer_keys=seg.final_keys(),
                sample_kept=seg.final_kept(),
                episode_id=session.episode_id,
                segment=j,
            )
        )
    return out


async def run_agent_group(
    engine: Engine,
    server: AgentServer,
    chat: ChatFormat,
    task: Task,
    n: int,
    agent_fn: AgentFn,
    cfg: RolloutConfig,
) -> list[Trajectory]:
    """Run `n` agent episodes of `task` concurrently; returns all their trajectories, episode by episode.

    An episode that used several conversations contributes several trajectories (info["episode"] and
    info["segment"] tell them apart), so the list can be longer than n; a failed episode contributes
    one FAILED trajectory. An engine exception cancels the sibling episodes and propagates. `chat` must
    be the ChatFormat the server renders with (the recorded token ids come from it); ValueError otherwise.
    """
    if chat is not server.chat:
        raise ValueError("run_agent_group: `chat` is not the ChatFormat the AgentServer was started with")
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run_agent_episode(engine, server, task, agent_fn, cfg, i)) for i in range(n)]
    return [traj for t in tasks for traj in t.result()]
