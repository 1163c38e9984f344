"""The multi-turn episode loop: token in, token out.

One episode alternates engine turns and environment steps:

    prompt = chat.initial_prompt_ids(env.reset(task), env.tools)          mask 0
    repeat up to rollout.max_turns:
        out = engine.generate(tokens so far)                               mask 1, engine logprobs/versions
        action = chat.parse_action(decode(out))
        result = env.step(action)            (or the loop's own reply to a malformed tool call)
        done -> COMPLETED;  else append chat.delta_ids(result.observation)  mask 0
    a reply cut off by a token limit is still scored by env.step (text only, no tool calls) -> TRUNCATED

Generated ids are appended exactly as returned, never re-tokenised; environment messages are
tokenised only as deltas (see rollout/chat.py), so `token_ids` always equals what the engine saw.
Every generated token keeps the version of the weights that produced it: an episode that outlives
weight pushes carries several (a partial rollout; slime/buffer.py says how stale tokens train).

Context limits (`rollout.context_policy`), when the next environment message plus a full turn would
pass `rollout.max_total_tokens`:
- `truncate`: the message is appended while it fits (the next turn then gets what room is left);
  once it does not, the episode ends TRUNCATED ("max_total_tokens") with the rewards its steps gave.
- `recent_tools`: tool results older than the `rollout.keep_tool_results` most recent are replaced
  by a one-line placeholder, as GLM-5 does for its search agents. The token prefix then breaks, so a
  new *segment* starts: the episode so far becomes one training sequence, exactly as generated, and
  the next one starts from the compacted context (every token of it mask 0, generated ids kept
  exactly, only the environment messages re-rendered) followed by what is generated next. One
  episode thus yields several Trajectories (same `episode_id`, `segment` 0, 1, ...) that share the
  episode's reward, status and info; each generated token is in exactly one of them with mask 1.
  When even the compacted context leaves no room, `truncate` applies.

Environments run off the worker's event loop (rollout/env_host.py): a thread of their own by default,
a process with `env.executor=process`.

MoE routes (engines that capture them): each turn's output carries the routes of its whole request,
prompt (the history, recomputed by its prefill) and generated tokens, so every turn overlays the
previous ones of its segment; env tokens appended after the last turn and the last generated token
have none (`RoutedExperts.valid` is False there). Engines without capture leave `routed_experts` None.
Sparse-attention key selections (`indexer_keys`, engines that capture them) are carried the same way.

Failure containment: any exception, timeout (`rollout.step_timeout_s` on reset/step/close) or
malformed return from the environment ends only that episode, with status FAILED, reward 0 and a
one-line `info["error"]`; it is never raised. Engine exceptions are not the environment's fault and
do propagate (the rollout worker supervises its engine). asyncio cancellation propagates too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envs.base import (
    Action,
    StepResult,
    check_messages,
    check_tools,
    coerce_step_result,
    one_line,
    tool_message,
)
from envs.tool_syntax import CALL_FORMAT_HINT
from rollout.chat import ChatFormat
from rollout.engines.base import Engine
from rollout.env_host import EnvHost, EnvTimeout, ThreadHost, delay_s, open_host
from rollout.tokens import TokenLog
from slime.core.config import ContextPolicy, EnvConfig, RolloutConfig
from slime.core.types import Message, SamplingParams, Status, Task, Trajectory

# What an older tool result becomes under rollout.context_policy=recent_tools.
DROPPED_TOOL_RESULT = "[older tool result removed to fit the context]"


class EpisodeError(Exception):
    """An environment failure: ends the episode as FAILED with this one-line reason."""


@dataclass
class _Block:
    """A piece of the current context: the prompt, one generated turn, or one environment delta
    (its messages kept so that a tool result can be replaced by a placeholder later)."""

    ids: list[int]
    messages: list[Message] | None = None  # env deltas only
    turn_end: bool = False  # the delta starts with the turn-end token the reply did not end with
    compacted: bool = False

    @property
    def has_tool_result(self) -> bool:
        return any(m.get("role") == "tool" for m in self.messages or [])


class _Episode:
    """State of one running episode."""

    def __init__(
        self,
        engine: Engine,
        host: EnvHost,
        task: Task,
        chat: ChatFormat,
        cfg: RolloutConfig,
        sampling: SamplingParams,
        env_cfg: EnvConfig | None,
        rng: random.Random,
    ):
        self.engine, self.host, self.task, self.chat, self.cfg = engine, host, task, chat, cfg
        self.sampling, self.env_cfg, self.rng = sampling, env_cfg, rng
        self.seg = TokenLog()
        self.done_segments: list[TokenLog] = []
        self.blocks: list[_Block] = []  # the current segment's context, piece by piece
        self.reward = 0.0
        self.turns = 0
        self.tool_calls = 0
        self.malformed = 0
        self.max_context = 0  # the longest context a turn was generated from
        self.env_info: dict[str, Any] = {}
        self.generate_s = 0.0
        self.env_s = 0.0
        self.start_version = int(engine.version)
        self.request_prefix = f"{task.id}-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------------------- helpers
    def segments(self) -> list[TokenLog]:
        """Every segment, in order."""
        return [*self.done_segments, self.seg]

    def _timeout(self) -> float | None:
        return self.cfg.step_timeout_s if self.cfg.step_timeout_s and self.cfg.step_timeout_s > 0 else None

    async def _env_call(self, what: str, *args: Any) -> Any:
        """Call the env through its host under the step timeout; any failure becomes an EpisodeError."""
        t0 = time.perf_counter()
        try:
            return await self.host.call(what, *args, timeout=self._timeout())
        except EnvTimeout as e:
            raise EpisodeError(str(e)) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise EpisodeError(f"env.{what} raised {one_line(e)}") from e
        finally:
            self.env_s += time.perf_counter() - t0

    def _malformed_reply(self, action: Action) -> StepResult:
        """The loop's own answer to an unparseable tool call (rollout.on_malformed_tool_call=error_message)."""
        content = (
            f"Error: your tool call could not be parsed ({action.malformed}). Call tools as "
            f"{CALL_FORMAT_HINT} or answer in plain text."
        )
        return StepResult(observation=[tool_message(content)], reward=0.0, done=False, info={})

    async def _step(self, action: Action) -> StepResult:
        """env.step under the step timeout, its return value checked (malformed -> EpisodeError).
        A step that runs tools waits the configured tool latency first (a workload knob)."""
        if action.tool_calls and self.env_cfg is not None:
            delay = delay_s(self.env_cfg, self.rng)
            if delay > 0:
                t0 = time.perf_counter()
                await asyncio.sleep(delay)
                self.env_s += time.perf_counter() - t0
        raw = await self._env_call("step", action)
        try:
            return coerce_step_result(raw)
        except (TypeError, ValueError) as e:
            raise EpisodeError(f"env.step returned a malformed result: {one_line(e)}") from e

    def _turn_sampling(self, budget: int) -> SamplingParams:
        limit = self.cfg.max_tokens_per_turn
        if self.sampling.max_tokens and self.sampling.max_tokens > 0:
            limit = min(limit, self.sampling.max_tokens)
        seed = None if self.sampling.seed is None else self.sampling.seed + self.turns
        return dataclasses.replace(self.sampling, max_tokens=min(limit, budget), seed=seed)

    # ---------------------------------------------------------------------------- context
    def _delta(self, messages: list[Message], turn_end: bool) -> _Block:
        try:
            ids = ([self.chat.turn_end_id] if turn_end else []) + self.chat.delta_ids(messages)
        except Exception as e:
            raise EpisodeError(f"cannot render the env's observation: {one_line(e)}") from e
        return _Block(ids, messages=messages, turn_end=turn_end)

    def _compacted(self, incoming: _Block) -> list[_Block] | None:
        """The current context with every tool result but the `keep_tool_results` most recent
        (counting the `incoming` delta's) replaced by a placeholder; None when there is nothing
        left to replace."""
        tool_blocks = [i for i, b in enumerate(self.blocks) if b.has_tool_result and not b.compacted]
        keep = max(0, self.cfg.keep_tool_results - int(incoming.has_tool_result))
        old = tool_blocks[: max(0, len(tool_blocks) - keep)]
        if not old:
            return None
        blocks = list(self.blocks)
        for i in old:
            b = blocks[i]
            messages = [
                {**m, "content": DROPPED_TOOL_RESULT} if m.get("role") == "tool" else m
                for m in b.messages or []
            ]
            blocks[i] = dataclasses.replace(self._delta(messages, b.turn_end), compacted=True)
        return blocks

    def _make_room(self, delta: _Block) -> bool:
        """Append `delta` to the context, compacting it into a new segment first when the policy
        says so and a full turn would not fit otherwise. False when it does not fit at all."""
        limit = self.cfg.max_total_tokens
        if (
            self.cfg.context_policy == ContextPolicy.recent_tools
            and len(self.seg.token_ids) + len(delta.ids) + self.cfg.max_tokens_per_turn > limit
        ):
            blocks = self._compacted(delta)
            if blocks is not None:
                context = [t for b in blocks for t in b.ids]
                if len(context) + len(delta.ids) < limit:
                    self.done_segments.append(self.seg)
                    self.seg = TokenLog()
                    self.seg.add_context(context)
                    self.blocks = blocks
        if len(self.seg.token_ids) + len(delta.ids) >= limit:
            return False
        self.seg.add_context(delta.ids)
        self.blocks.append(delta)
        return True

    # ---------------------------------------------------------------------------------- loop
    async def run(self) -> tuple[Status, str]:
        """Run to the end; returns (status, end_reason). Raises EpisodeError for env failures."""
        messages = await self._env_call("reset", self.task)
        try:
            check_messages(messages, "reset() result")
            tools = [] if self.host.tools is None else check_tools(self.host.tools, "env.tools")
            prompt = self.chat.initial_prompt_ids(messages, tools)
        except Exception as e:
            raise EpisodeError(one_line(e)) from e
        if len(prompt) >= self.cfg.max_total_tokens:
            raise EpisodeError(
                f"prompt has {len(prompt)} tokens, rollout.max_total_tokens={self.cfg.max_total_tokens} leaves no room"
            )
        self.seg.add_context(prompt)
        self.blocks.append(_Block(prompt))

        while True:
            budget = self.cfg.max_total_tokens - len(self.seg.token_ids)
            sampling = self._turn_sampling(budget)
            self.max_context = max(self.max_context, len(self.seg.token_ids))
            t0 = time.perf_counter()
            out = await self.engine.generate(
                list(self.seg.token_ids), sampling, request_id=f"{self.request_prefix}-{self.turns}"
            )
            self.generate_s += time.perf_counter() - t0
            out.check_lengths()
            self.seg.add_generated(
                out.token_ids,
                out.logprobs,
                out.versions,
                out.routed_experts,
                out.indexer_keys,
                kept=out.sample_kept,
            )
            self.blocks.append(_Block([int(t) for t in out.token_ids]))
            self.turns += 1
            if out.finish_reason == "abort":
                return Status.ABORTED, "abort"
            ended_cleanly = bool(out.token_ids) and out.token_ids[-1] in self.chat.stop_ids
            cut_off = out.finish_reason == "length" or (out.finish_reason != "stop" and not ended_cleanly)
            action = self.chat.parse_action(self.chat.decode(out.token_ids))
            if cut_off:
                # No end-of-turn token: the reply was cut off and the episode ends TRUNCATED, but the env
                # still scores what was written (a single-turn env's reward must not depend on whether
                # the model stopped in time; overlong shaping is the algorithm's business). Tool calls
                # in a cut-off reply are not executed.
                reason = "max_total_tokens" if sampling.max_tokens >= budget else "length"
                result = await self._step(Action(content=action.content))
                self.reward += result.reward
                self.env_info.update(result.info)
                return Status.TRUNCATED, reason

            for i, call in enumerate(action.tool_calls):
                call.id = f"call_{self.turns - 1}_{i}"
            if action.malformed is not None:
                self.malformed += 1
                if self.cfg.on_malformed_tool_call == "end_episode":
                    return Status.COMPLETED, "malformed_tool_call"
                result = self._malformed_reply(action)
            else:
                self.tool_calls += len(action.tool_calls)
                result = await self._step(action)
            self.reward += result.reward
            self.env_info.update(result.info)
            if result.done:
                return Status.COMPLETED, "done"
            if self.turns >= self.cfg.max_turns:
                return Status.TRUNCATED, "max_turns"
            # Stopped on a stop string: close the turn the way the template does before the delta.
            if not self._make_room(self._delta(result.observation, turn_end=not ended_cleanly)):
                return Status.TRUNCATED, "max_total_tokens"

    async def close(self) -> str | None:
        """Call env.close() if it exists, then release the host; returns a one-line error instead
        of raising."""
        error = None
        try:
            if self.host.has("close") and not getattr(self.host, "stuck", False):
                await self._env_call("close")
        except EpisodeError as e:
            error = str(e)
        finally:
            await self.host.stop()
        return error


async def run_episode(
    engine: Engine,
    env: Any,
    task: Task,
    chat: ChatFormat,
    cfg: RolloutConfig,
    sampling: SamplingParams,
    env_cfg: EnvConfig | None = None,
) -> list[Trajectory]:
    """Run one episode of `env` on `task` with `engine`; never raises for environment failures.

    `env` is an EnvHost (rollout/env_host.py) or an environment object, which then runs on a thread
    host of its own. `env_cfg` gives the tool latency (None: none).

    Returns the episode's segments in order, usually one (several under
    rollout.context_policy=recent_tools; see the module docstring). In each, the token lists line
    up: prompt and delta tokens with mask 0, logprob 0.0, version -1; generated tokens with mask 1
    and the engine's logprobs and versions. Every segment carries the episode's `reward` (the sum of
    step rewards, 0 when FAILED), status, turns and `info`: end_reason, tool_calls,
    malformed_tool_calls, segments, context_tokens (the longest context a turn saw), env (the merged
    step infos) and, when FAILED, error. Timings: generate_s, env_s, total_s.
    """
    t0 = time.perf_counter()
    host = env if hasattr(env, "call") and hasattr(env, "stop") else ThreadHost(env)
    rng = random.Random(f"{task.id}-{sampling.seed}-{uuid.uuid4().hex if sampling.seed is None else ''}")
    ep = _Episode(engine, host, task, chat, cfg, sampling, env_cfg, rng)
    info: dict[str, Any] = {}
    try:
        status, end_reason = await ep.run()
    except EpisodeError as e:
        status, end_reason = Status.FAILED, "error"
        info["error"] = str(e)
    close_error = await ep.close()
    if close_error is not None:
        info["close_error"] = close_error
    segments = ep.segments()
    info.update(
        end_reason=end_reason,
        tool_calls=ep.tool_calls,
        malformed_tool_calls=ep.malformed,
        segments=len(segments),
        context_tokens=ep.max_context,
        env=ep.env_info,
    )
    timings = {"generate_s": ep.generate_s, "env_s": ep.env_s, "total_s": time.perf_counter() - t0}
    return [
        Trajectory(
            task_id=task.id,
            token_ids=s.token_ids,
            loss_mask=s.loss_mask,
            behavior_logprobs=s.logprobs,
            versions=s.versions,
            prompt_len=s.prompt_len,
            reward=0.0 if status is Status.FAILED else ep.reward,
            status=status,
            turns=ep.turns,
            info=info,
            timings=timings,
            start_version=ep.start_version,
            routed_experts=s.final_routes(),
            indexer_keys=s.final_keys(),
            sample_kept=s.final_kept(),
            episode_id=ep.request_prefix,
            segment=i,
        )
        for i, s in enumerate(segments)
    ]


def failed_trajectory(task: Task, start_version: int, error: str) -> Trajectory:
    """An empty FAILED trajectory (the environment could not even be built)."""
    return Trajectory(
        task_id=task.id,
        token_ids=[],
        loss_mask=[],
        behavior_logprobs=[],
        versions=[],
        prompt_len=0,
        reward=0.0,
        status=Status.FAILED,
        info={"error": error, "end_reason": "error", "tool_calls": 0, "malformed_tool_calls": 0, "env": {}},
        timings={"generate_s": 0.0, "env_s": 0.0, "total_s": 0.0},
        start_version=start_version,
    )


async def run_env_group(
    engine: Engine,
    env_factory: Callable[[], Any],
    task: Task,
    n: int,
    chat: ChatFormat,
    cfg: RolloutConfig,
    sampling: SamplingParams,
    env_cfg: EnvConfig | None = None,
) -> list[Trajectory]:
    """Run `n` episodes of `task` concurrently, each with a fresh environment on a host of its own
    (`env_cfg.executor`; a thread host of an `env_factory()` environment without `env_cfg`).

    Returns the episodes' trajectories in order (an episode's segments together). A factory or host
    that fails yields a FAILED trajectory for that episode. When `sampling.seed` is set, episode i
    samples with seed + i * 1_000_003 so the group's members differ. An engine exception cancels the
    sibling episodes and propagates.
    """

    async def one(i: int) -> list[Trajectory]:
        version = int(engine.version)
        try:
            if env_cfg is None:
                host: EnvHost = ThreadHost(env_factory())
            else:
                host = await open_host(env_cfg, env_factory, cfg.step_timeout_s or None)
        except Exception as e:
            return [failed_trajectory(task, version, f"env construction raised {one_line(e)}")]
        sp = (
            sampling
            if sampling.seed is None
            else dataclasses.replace(sampling, seed=sampling.seed + i * 1_000_003)
        )
        return await run_episode(engine, host, task, chat, cfg, sp, env_cfg)

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    try:
        return [t for episode in await asyncio.gather(*tasks) for t in episode]
    except BaseException:
        # An engine error (or our own cancellation): stop the siblings, then raise the original
        # exception itself rather than a TaskGroup's ExceptionGroup, so callers can catch it by type.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
