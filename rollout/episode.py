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

MoE routes (engines that capture them): each turn's output carries the routes of its whole request,
prompt (the history, recomputed by its prefill) and generated tokens, so every turn overlays the
previous ones; env tokens appended after the last turn and the last generated token have none
(`RoutedExperts.valid` is False there). Engines without capture leave `routed_experts` None.

Failure containment: any exception, timeout (`rollout.step_timeout_s` on reset/step) or malformed
return from the environment ends only that episode, with status FAILED, reward 0 and a one-line
`info["error"]`; it is never raised. Engine exceptions are not the environment's fault and do propagate
(the rollout worker supervises its engine). asyncio cancellation propagates too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

from envs.base import (
    Action,
    StepResult,
    check_messages,
    coerce_step_result,
    env_tools,
    one_line,
    tool_message,
)
from envs.tool_syntax import CALL_FORMAT_HINT
from rollout.chat import ChatFormat
from rollout.engines.base import Engine
from slime.core.config import RolloutConfig
from slime.core.types import GenerateOutput, RoutedExperts, SamplingParams, Status, Task, Trajectory


class EpisodeError(Exception):
    """An environment failure: ends the episode as FAILED with this one-line reason."""


class _Episode:
    """State of one running episode (the token lists grow together)."""

    def __init__(
        self,
        engine: Engine,
        env: Any,
        task: Task,
        chat: ChatFormat,
        cfg: RolloutConfig,
        sampling: SamplingParams,
    ):
        self.engine, self.env, self.task, self.chat, self.cfg, self.sampling = (
            engine,
            env,
            task,
            chat,
            cfg,
            sampling,
        )
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.routes: RoutedExperts | None = None  # MoE routes so far (engines that capture them)
        self.prompt_len = 0
        self.reward = 0.0
        self.turns = 0
        self.tool_calls = 0
        self.malformed = 0
        self.env_info: dict[str, Any] = {}
        self.generate_s = 0.0
        self.env_s = 0.0
        self.start_version = int(engine.version)
        self.request_prefix = f"{task.id}-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------------------- helpers
    def _append_env(self, ids: list[int]) -> None:
        self.token_ids.extend(ids)
        self.loss_mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))
        self.versions.extend([-1] * len(ids))

    def _append_generated(self, out: GenerateOutput) -> None:
        n = out.check_lengths()
        self.token_ids.extend(int(t) for t in out.token_ids)
        self.loss_mask.extend([1] * n)
        self.logprobs.extend(float(x) for x in out.logprobs)
        self.versions.extend(int(v) for v in out.versions)
        # out.routed_experts covers the request's prompt (all tokens so far) and its output.
        self.routes = RoutedExperts.merge(self.routes, out.routed_experts)

    def final_routes(self) -> RoutedExperts | None:
        """The routes with one row per token (env tokens after the last turn have none)."""
        return None if self.routes is None else self.routes.padded(len(self.token_ids))

    async def _env_call(self, what: str, coro: Any) -> Any:
        """Await an env coroutine under the step timeout; any failure becomes an EpisodeError."""
        t0 = time.perf_counter()
        timeout = self.cfg.step_timeout_s if self.cfg.step_timeout_s and self.cfg.step_timeout_s > 0 else None
        try:
            return await asyncio.wait_for(coro, timeout)
        except TimeoutError:
            raise EpisodeError(f"env.{what} timed out after {self.cfg.step_timeout_s:g}s") from None
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
        """env.step under the step timeout, its return value checked (malformed -> EpisodeError)."""
        raw = await self._env_call("step", self.env.step(action))
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

    # ---------------------------------------------------------------------------------- loop
    async def run(self) -> tuple[Status, str]:
        """Run to the end; returns (status, end_reason). Raises EpisodeError for env failures."""
        messages = await self._env_call("reset", self.env.reset(self.task))
        try:
            check_messages(messages, "reset() result")
            tools = env_tools(self.env)
            prompt = self.chat.initial_prompt_ids(messages, tools)
        except Exception as e:
            raise EpisodeError(one_line(e)) from e
        if len(prompt) >= self.cfg.max_total_tokens:
            raise EpisodeError(
                f"prompt has {len(prompt)} tokens, rollout.max_total_tokens={self.cfg.max_total_tokens} leaves no room"
            )
        self._append_env(prompt)
        self.prompt_len = len(prompt)

        while True:
            budget = self.cfg.max_total_tokens - len(self.token_ids)
            sampling = self._turn_sampling(budget)
            t0 = time.perf_counter()
            out = await self.engine.generate(
                list(self.token_ids), sampling, request_id=f"{self.request_prefix}-{self.turns}"
            )
            self.generate_s += time.perf_counter() - t0
            self._append_generated(out)
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

            delta: list[int] = []
            if not ended_cleanly:
                # Stopped on a stop string: close the turn the way the template does before the delta.
                delta.append(self.chat.turn_end_id)
            try:
                delta += self.chat.delta_ids(result.observation)
            except Exception as e:
                raise EpisodeError(f"cannot render the env's observation: {one_line(e)}") from e
            if len(self.token_ids) + len(delta) >= self.cfg.max_total_tokens:
                return Status.TRUNCATED, "max_total_tokens"
            self._append_env(delta)

    async def close(self) -> str | None:
        """Call env.close() if it exists; returns a one-line error instead of raising."""
        close = getattr(self.env, "close", None)
        if close is None:
            return None
        try:
            await self._env_call("close", close())
        except EpisodeError as e:
            return str(e)
        return None


async def run_episode(
    engine: Engine, env: Any, task: Task, chat: ChatFormat, cfg: RolloutConfig, sampling: SamplingParams
) -> Trajectory:
    """Run one episode of `env` on `task` with `engine`; never raises for environment failures.

    Returns a Trajectory whose token lists line up: prompt and delta tokens with mask 0, logprob 0.0,
    version -1; generated tokens with mask 1 and the engine's logprobs and versions. `reward` is the
    sum of step rewards (0 when FAILED). `info` holds end_reason, tool_calls, malformed_tool_calls,
    env (the merged step infos) and, when FAILED, error. Timings: generate_s, env_s, total_s.
    """
    t0 = time.perf_counter()
    ep = _Episode(engine, env, task, chat, cfg, sampling)
    info: dict[str, Any] = {}
    try:
        status, end_reason = await ep.run()
    except EpisodeError as e:
        status, end_reason = Status.FAILED, "error"
        info["error"] = str(e)
    close_error = await ep.close()
    if close_error is not None:
        info["close_error"] = close_error
    info.update(
        end_reason=end_reason,
        tool_calls=ep.tool_calls,
        malformed_tool_calls=ep.malformed,
        env=ep.env_info,
    )
    return Trajectory(
        task_id=task.id,
        token_ids=ep.token_ids,
        loss_mask=ep.loss_mask,
        behavior_logprobs=ep.logprobs,
        versions=ep.versions,
        prompt_len=ep.prompt_len,
        reward=0.0 if status is Status.FAILED else ep.reward,
        status=status,
        turns=ep.turns,
        info=info,
        timings={"generate_s": ep.generate_s, "env_s": ep.env_s, "total_s": time.perf_counter() - t0},
        start_version=ep.start_version,
        routed_experts=ep.final_routes(),
    )


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
) -> list[Trajectory]:
    """Run `n` episodes of `task` concurrently, each with a fresh `env_factory()` environment.

    Returns the n trajectories in order. A factory that raises yields a FAILED trajectory for that
    episode. When `sampling.seed` is set, episode i samples with seed + i * 1_000_003 so the group's
    members differ. An engine exception cancels the sibling episodes and propagates.
    """

    async def one(i: int) -> Trajectory:
        try:
            env = env_factory()
        except Exception as e:
            return failed_trajectory(task, int(engine.version), f"env construction raised {one_line(e)}")
        sp = (
            sampling
            if sampling.seed is None
            else dataclasses.replace(sampling, seed=sampling.seed + i * 1_000_003)
        )
        return await run_episode(engine, env, task, chat, cfg, sp)

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        # An engine error (or our own cancellation): stop the siblings, then raise the original
        # exception itself rather than a TaskGroup's ExceptionGroup, so callers can catch it by type.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
