"""Long-horizon episodes (rollout/episode.py, rollout/env_host.py): context policies and segments,
and environments that block, spin or take time, which fail only their own episode.

Pure logic with the scripted engine of tests/test_episode.py (real SmolLM2 tokenizer); the real loop
(engine, trainer, Ray) is tests/test_long_horizon_e2e.py.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
from test_episode import ScriptedEngine, cfg

from envs.base import Action, Environment, StepResult, function_tool, tool_message
from rollout.chat import ChatFormat
from rollout.env_host import EnvTimeout, ProcessHost, ThreadHost, delay_s
from rollout.episode import DROPPED_TOOL_RESULT, run_env_group, run_episode
from slime.core.config import EnvConfig
from slime.core.types import SamplingParams, Status, Task

SAMPLING = SamplingParams(max_tokens=64, temperature=1.0)
LOOKUP = '<tool_call>[{"name": "lookup", "arguments": {"key": "k"}}]</tool_call>'


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


class Lookups(Environment):
    """Every tool call returns a long result (`words` words, numbered by call); an answer ends the
    episode with reward 1."""

    tools = [function_tool("lookup", "Look a key up.", {"key": {"type": "string"}}, ["key"])]

    def __init__(self, words: int = 60):
        self.words = words
        self.calls = 0

    async def reset(self, task):
        return task.messages()

    async def step(self, action: Action) -> StepResult:
        if not action.tool_calls:
            return StepResult([], 1.0, True, {"tool_errors": 0})
        self.calls += 1
        text = f"result{self.calls} " + " ".join(f"w{self.calls}" for _ in range(self.words))
        return StepResult([tool_message(text, c) for c in action.tool_calls], 0.0, False, {})


def replies(n_calls: int) -> list[str]:
    return [LOOKUP] * n_calls + ["The answer is done."]


async def test_truncate_ends_the_episode_at_the_limit(chat):
    engine = ScriptedEngine(chat, replies(8))
    trajs = await run_episode(
        engine, Lookups(), Task(id="t", prompt="q"), chat, cfg(max_total_tokens=600, max_turns=12), SAMPLING
    )
    (traj,) = trajs
    assert traj.status is Status.TRUNCATED and traj.info["end_reason"] == "max_total_tokens"
    assert traj.info["segments"] == 1 and len(traj.token_ids) < 600


async def test_recent_tools_splits_the_episode_into_token_exact_segments(chat):
    engine = ScriptedEngine(chat, replies(8))
    c = cfg(max_total_tokens=900, max_turns=12, context_policy="recent_tools", keep_tool_results=2)
    env = Lookups(words=30)
    trajs = await run_episode(engine, env, Task(id="t", prompt="q"), chat, c, SAMPLING)
    assert len(trajs) >= 2 and trajs[-1].status is Status.COMPLETED
    assert all(t.reward == 1.0 and t.episode_id == trajs[0].episode_id for t in trajs)
    assert [t.segment for t in trajs] == list(range(len(trajs)))
    assert all(len(t.token_ids) < 900 for t in trajs)
    # Each engine call's prompt is exactly a prefix of the segment it was generated in, and every
    # generated token is in exactly one segment with mask 1: the engine's outputs in order.
    outputs = iter(engine.outputs)
    for t in trajs:
        spans = [i for i, m in enumerate(t.loss_mask) if m]
        generated = [t.token_ids[i] for i in spans]
        got: list[int] = []
        while len(got) < len(generated):
            got += next(outputs).token_ids
        assert got == generated
    assert next(outputs, None) is None
    for prompt, _, _ in engine.calls:
        assert any(t.token_ids[: len(prompt)] == prompt for t in trajs)
    # The later segments start from the compacted context: the oldest results are placeholders,
    # the two most recent are still there, the generated turns are the model's own tokens.
    later = chat.tokenizer.decode(trajs[-1].token_ids)
    assert DROPPED_TOOL_RESULT in later and "result1 " not in later
    assert f"result{env.calls} " in later and f"result{env.calls - 1} " in later
    assert later.count("lookup") >= env.calls  # every call kept
    for t in trajs[1:]:  # the compacted context is prompt: mask 0, logprob 0.0, version -1
        assert set(t.loss_mask[: t.prompt_len]) == {0} and set(t.versions[: t.prompt_len]) == {-1}
        assert set(t.behavior_logprobs[: t.prompt_len]) == {0.0}


async def test_recent_tools_truncates_when_compaction_leaves_no_room(chat):
    engine = ScriptedEngine(chat, replies(8))
    c = cfg(max_total_tokens=400, max_turns=12, context_policy="recent_tools", keep_tool_results=3)
    trajs = await run_episode(engine, Lookups(words=90), Task(id="t", prompt="q"), chat, c, SAMPLING)
    assert trajs[-1].status is Status.TRUNCATED and trajs[-1].info["end_reason"] == "max_total_tokens"


# ------------------------------------------------------------------------------ blocking environments
# Set when a test is over: the abandoned thread of a blocked or spinning step then ends. Without it a
# spinning thread outlives its test and holds the GIL half the time for the rest of the session (it
# made every later in-process test about 2x slower).
RELEASE = threading.Event()


@pytest.fixture(autouse=True)
def _release_blocked_threads():
    RELEASE.clear()
    yield
    RELEASE.set()


class Blocking(Environment):
    """`step` blocks its thread (a synchronous tool, a stuck subprocess) or spins the CPU, for the
    task whose id says so, until the test is over (RELEASE); any other task answers at once."""

    async def reset(self, task):
        self.mode = task.id
        return task.messages()

    async def step(self, action):
        if self.mode == "sleep":
            RELEASE.wait(3600)  # a blocking call, as time.sleep: the thread does not yield to the loop
        elif self.mode == "spin":
            while not RELEASE.is_set():
                pass
        return StepResult([], 1.0, True, {})


@pytest.mark.parametrize("mode", ["sleep", "spin"])
async def test_a_blocking_step_fails_its_episode_and_the_others_keep_running(chat, mode):
    engine = ScriptedEngine(chat, lambda _: "done")
    c = cfg(step_timeout_s=1.0)
    t0 = time.perf_counter()
    stuck, *fine = await asyncio.gather(
        run_env_group(engine, Blocking, Task(id=mode, prompt="x"), 1, chat, c, SAMPLING),
        *(
            run_env_group(engine, Blocking, Task(id=f"ok{i}", prompt="x"), 2, chat, c, SAMPLING)
            for i in range(4)
        ),
    )
    assert time.perf_counter() - t0 < 10  # nobody waited for the blocked step
    assert stuck[0].status is Status.FAILED and "timed out after 1s" in stuck[0].info["error"]
    assert all(t.status is Status.COMPLETED and t.reward == 1.0 for g in fine for t in g)


async def test_the_process_executor_kills_a_spinning_env(chat):
    env_cfg = EnvConfig(name="test_long_horizon:Blocking", executor="process")
    engine = ScriptedEngine(chat, lambda _: "done")
    trajs = await run_env_group(
        engine, Blocking, Task(id="spin", prompt="x"), 1, chat, cfg(step_timeout_s=2.0), SAMPLING, env_cfg
    )
    assert trajs[0].status is Status.FAILED and "timed out" in trajs[0].info["error"]
    ok = await run_env_group(
        engine, Blocking, Task(id="ok", prompt="x"), 2, chat, cfg(step_timeout_s=20.0), SAMPLING, env_cfg
    )
    assert [t.reward for t in ok] == [1.0, 1.0]


async def test_process_host_reports_env_errors_and_stops(tmp_path):
    host = ProcessHost("calculator", {"max_turns": 2})
    await host.start(30)
    assert [t["function"]["name"] for t in host.tools] == ["calculator"]
    with pytest.raises(AttributeError, match="env_args"):
        await host.call("reset", object(), timeout=30)  # not a Task: the env's own error comes back
    await host.stop()
    assert not host._proc.is_alive()


async def test_a_thread_host_timeout_on_a_cooperative_hang_keeps_the_host_usable():
    class Slow(Environment):
        async def reset(self, task):
            await asyncio.sleep(3600)

        async def step(self, action):
            return StepResult([], 0.0, True, {})

    host = ThreadHost(Slow())
    with pytest.raises(EnvTimeout):
        await host.call("reset", None, timeout=0.1)
    assert not host.stuck  # the cancelled sleep returned the loop
    assert (await host.call("step", Action(content="x"), timeout=1)).done
    await host.stop()


def test_tool_latency_fixed_and_heavy_tailed():
    rng = random.Random(0)
    fixed = EnvConfig(name="x", tool_latency_s=2.0)
    assert delay_s(fixed, rng) == 2.0
    heavy = EnvConfig(name="x", tool_latency_s=2.0, tool_latency="lognormal", tool_latency_sigma=1.0)
    draws = sorted(delay_s(heavy, rng) for _ in range(4000))
    assert 1.8 < draws[2000] < 2.2  # the median is the configured latency
    assert draws[3960] > 15.0  # p99 ~ 2 * e^2.33 = 20.6 s: a long tail
    assert delay_s(EnvConfig(name="x"), rng) == 0.0


async def test_long_tail_tasks_and_rewards():
    from envs.long_tail import LongTailEnv

    tasks = LongTailEnv.make_tasks(40, seed=3)
    assert tasks == LongTailEnv.make_tasks(40, seed=3)  # deterministic
    slow = [t for t in tasks if t.env_args["slow"]]
    assert len(slow) == 4 and all(t.env_args == {"slow": True, "turns": 6, "step_s": 3.0} for t in slow)
    assert {t.env_args["turns"] for t in tasks if not t.env_args["slow"]} == {1, 2}
    env = LongTailEnv(result_words=3)
    await env.reset(Task(id="x", prompt="p", env_args={"turns": 2, "step_s": 0.0}))
    first = await env.step(Action(content="hello"))
    assert not first.done and first.observation[0]["content"] == "step 1 done: part part part"
    last = await env.step(Action(content="Hello there"))  # 1 of 2 words lowercase
    assert last.done and last.reward == 0.75  # (1.0 + 0.5) / 2
