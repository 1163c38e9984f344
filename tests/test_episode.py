"""rollout/episode.py: the token-exact multi-turn loop, limits, failure containment.

Pure-logic tests use a scripted fake engine (replies as text, tokenised with the real SmolLM2
tokenizer); the last tests drive the shared real vLLM engine (`engine` fixture, tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from collections.abc import Callable

import pytest

from envs.base import Action, Environment, StepResult
from envs.calculator import CalculatorEnv
from envs.flaky import FlakyEnv
from envs.guess_number import GuessNumberEnv
from rollout.chat import ChatFormat
from rollout.episode import run_env_group, run_episode
from slime.core.config import RolloutConfig
from slime.core.types import GenerateOutput, SamplingParams, Status, Task, Trajectory

SAMPLING = SamplingParams(max_tokens=64, temperature=1.0)


class ScriptedEngine:
    """A fake engine: `reply(prompt_text)` gives the next reply text; returns its tokens + EOS.

    Logprobs are distinct negative numbers so misplaced ones are caught; versions are the engine's
    version at call time. `finish` overrides the finish reason; `eos=False` omits the EOS token.
    """

    def __init__(
        self,
        chat: ChatFormat,
        reply: Callable[[str], str] | list[str],
        eos: bool = True,
        finish: str = "stop",
        bump_version: bool = False,
        hold_until: int = 0,
    ):
        self.chat = chat
        self.replies = iter(reply) if isinstance(reply, list) else None
        self.reply_fn = reply if callable(reply) else None
        self.eos = eos
        self.finish = finish
        self.bump_version = bump_version
        self.version = 0
        self.calls: list[tuple[list[int], SamplingParams, str | None]] = []
        self.outputs: list[GenerateOutput] = []
        self.in_flight = 0
        self.max_in_flight = 0
        # Concurrency checks: a call waits (up to 5 s) until this many are in flight together.
        self.hold_until = hold_until
        self._crowd = asyncio.Event()

    async def generate(self, prompt_ids, sampling, request_id=None) -> GenerateOutput:
        self.calls.append((list(prompt_ids), sampling, request_id))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.hold_until and self.in_flight >= self.hold_until:
            self._crowd.set()
        if self.hold_until:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._crowd.wait(), 5)
        await asyncio.sleep(0.001)  # let concurrent episodes interleave
        self.in_flight -= 1
        text = next(self.replies) if self.replies else self.reply_fn(self.chat.tokenizer.decode(prompt_ids))
        ids = self.chat.tokenizer.encode(text, add_special_tokens=False) + (
            [self.chat.turn_end_id] if self.eos else []
        )
        finish = self.finish
        if len(ids) > sampling.max_tokens:
            ids, finish = ids[: sampling.max_tokens], "length"
        out = GenerateOutput(
            token_ids=ids,
            logprobs=[-0.01 * (len(self.calls) + i + 1) for i in range(len(ids))],
            versions=[self.version] * len(ids),
            finish_reason=finish,
        )
        self.outputs.append(out)
        if self.bump_version:
            self.version += 1
        return out


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


def cfg(**kw) -> RolloutConfig:
    base = dict(max_turns=6, max_tokens_per_turn=64, max_total_tokens=1024, step_timeout_s=5.0)
    base.update(kw)
    return RolloutConfig(**base)


def spans(traj: Trajectory) -> list[tuple[int, int, int]]:
    """(mask value, start, end) runs of the loss mask."""
    out, start = [], 0
    for i in range(1, len(traj.loss_mask) + 1):
        if i == len(traj.loss_mask) or traj.loss_mask[i] != traj.loss_mask[start]:
            out.append((traj.loss_mask[start], start, i))
            start = i
    return out


def assert_token_exact(traj: Trajectory, engine: ScriptedEngine) -> None:
    """Every generated span is exactly an engine output with its logprobs/versions; every prompt the
    engine saw is a prefix of the final token list; env tokens carry 0.0 / -1."""
    n = len(traj.token_ids)
    assert len(traj.loss_mask) == len(traj.behavior_logprobs) == len(traj.versions) == n
    gen_spans = [(s, e) for m, s, e in spans(traj) if m == 1]
    assert len(gen_spans) == len(engine.outputs) == traj.turns
    for (s, e), out in zip(gen_spans, engine.outputs, strict=True):
        assert traj.token_ids[s:e] == out.token_ids
        assert traj.behavior_logprobs[s:e] == out.logprobs
        assert traj.versions[s:e] == out.versions
    for (prompt, _, _), (s, _) in zip(engine.calls, gen_spans, strict=True):
        assert prompt == traj.token_ids[:s]
    for m, lp, v in zip(traj.loss_mask, traj.behavior_logprobs, traj.versions, strict=True):
        if m == 0:
            assert lp == 0.0 and v == -1
    assert traj.prompt_len == gen_spans[0][0]
    assert len(engine.calls) == traj.turns


CALC_TASK = Task(
    id="calc-1",
    prompt="A farmer has 47 apples. Then 19 are sold. Then 25 more are sold. How many are left?",
    env="calculator",
    env_args={"answer": "3"},
)
CALL = '<tool_call>[{"name": "calculator", "arguments": {"expression": "(47 - 19) - 25"}}]</tool_call>'


async def test_calculator_episode_is_token_exact(chat):
    engine = ScriptedEngine(chat, [CALL, "The calculator says 3. Answer: 3"], bump_version=True)
    env = CalculatorEnv()
    (traj,) = await run_episode(engine, env, CALC_TASK, chat, cfg(), SAMPLING)
    assert traj.status is Status.COMPLETED and traj.reward == 1.0 and traj.turns == 2
    assert traj.info["tool_calls"] == 1 and traj.info["end_reason"] == "done" and traj.info["env"]["correct"]
    assert_token_exact(traj, engine)
    assert [m for m, _, _ in spans(traj)] == [0, 1, 0, 1]
    # Versions: the engine bumped its version between turns, the start version is the first one.
    assert traj.start_version == 0 and set(traj.versions) == {-1, 0, 1} and traj.min_version == 0
    # The env's delta is the tool result as the template renders it.
    delta = [traj.token_ids[s:e] for m, s, e in spans(traj) if m == 0][1]
    assert chat.tokenizer.decode(delta) == "\n<|im_start|>tool\n3<|im_end|>\n<|im_start|>assistant\n"
    # The whole sequence is what the template renders for the conversation (replies re-tokenise the
    # same here, as they start without whitespace).
    conversation = [
        {"role": "system", "content": env.system_prompt},
        {"role": "user", "content": CALC_TASK.prompt},
        {"role": "assistant", "content": CALL},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "The calculator says 3. Answer: 3"},
    ]
    text = chat.tokenizer.apply_chat_template(chat.with_tools(conversation, env.tools), tokenize=False)
    assert chat.tokenizer.decode(traj.token_ids) + "\n" == text
    assert set(traj.timings) == {"generate_s", "env_s", "total_s"}
    assert traj.timings["total_s"] >= traj.timings["generate_s"]
    # Sampling per turn: capped by max_tokens_per_turn; request ids unique.
    assert all(sp.max_tokens == 64 for _, sp, _ in engine.calls)
    assert len({rid for _, _, rid in engine.calls}) == 2


async def test_tool_errors_go_back_to_the_model(chat):
    bad = '<tool_call>[{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}, {"name": "web", "arguments": {}}]</tool_call>'
    engine = ScriptedEngine(chat, [bad, "Answer: 3"])
    (traj,) = await run_episode(engine, CalculatorEnv(tool_bonus=0.2), CALC_TASK, chat, cfg(), SAMPLING)
    text = chat.tokenizer.decode(traj.token_ids)
    assert "Error: unsupported element Call" in text and "Error: unknown tool 'web'" in text
    assert traj.status is Status.COMPLETED and traj.info["tool_calls"] == 2
    assert traj.reward == pytest.approx(0.8)  # correct, but no successful tool call: no bonus
    assert traj.info["env"]["tool_errors"] == 2


async def test_malformed_tool_call_error_message(chat):
    engine = ScriptedEngine(
        chat, ['<tool_call>{"name": "calculator", "arguments": {</tool_call>', CALL, "Answer: 3"]
    )
    (traj,) = await run_episode(engine, CalculatorEnv(tool_bonus=0.5), CALC_TASK, chat, cfg(), SAMPLING)
    assert traj.status is Status.COMPLETED and traj.turns == 3 and traj.reward == 1.0
    assert traj.info["malformed_tool_calls"] == 1 and traj.info["tool_calls"] == 1
    assert "could not be parsed (invalid JSON" in chat.tokenizer.decode(traj.token_ids)
    assert_token_exact(traj, engine)


async def test_malformed_tool_call_end_episode(chat):
    engine = ScriptedEngine(chat, ['<tool_call>{"name": "calculator"', "never used"])
    (traj,) = await run_episode(
        engine, CalculatorEnv(), CALC_TASK, chat, cfg(on_malformed_tool_call="end_episode"), SAMPLING
    )
    assert traj.status is Status.COMPLETED and traj.reward == 0.0 and traj.turns == 1
    assert traj.info["end_reason"] == "malformed_tool_call" and traj.info["malformed_tool_calls"] == 1


async def test_require_tool_call_reminds_the_model(chat):
    engine = ScriptedEngine(chat, ["Answer: 3", CALL, "Answer: 3"])
    (traj,) = await run_episode(
        engine, CalculatorEnv(require_tool_call=True), CALC_TASK, chat, cfg(), SAMPLING
    )
    assert traj.turns == 3 and traj.reward == 1.0
    assert "Use the calculator tool before giving the final answer." in chat.tokenizer.decode(traj.token_ids)


def bisect_reply(prompt_text: str) -> str:
    """A perfect guess_number player: binary search on the feedback so far."""
    low, high = 1, 100
    guesses = re.findall(r"<\|im_start\|>assistant\n(-?\d+)<\|im_end\|>", prompt_text)
    feedback = re.findall(r"My number is (higher|lower) than (-?\d+)", prompt_text)
    for direction, g in feedback:
        if direction == "higher":
            low = max(low, int(g) + 1)
        else:
            high = min(high, int(g) - 1)
    assert len(feedback) == len(guesses)
    return str((low + high) // 2)


async def test_guess_number_binary_search(chat):
    for target in (1, 37, 100):
        task = Task(id=f"g{target}", prompt="Guess my number between 1 and 100.", env_args={"target": target})
        engine = ScriptedEngine(chat, bisect_reply)
        (traj,) = await run_episode(
            engine, GuessNumberEnv(max_guesses=7, shaping=0.5), task, chat, cfg(max_turns=10), SAMPLING
        )
        assert traj.status is Status.COMPLETED and traj.info["env"]["solved"]
        assert traj.turns <= 7
        assert traj.reward == pytest.approx(1.0 - 0.5 * (traj.turns - 1) / 7)
        assert_token_exact(traj, engine)


async def test_truncation_by_length_scores_the_cut_off_reply(chat):
    """A reply cut by max_tokens_per_turn ends the episode TRUNCATED; the env still scores the text
    (single-turn rewards must not depend on stopping in time), but no tool call in it is executed."""
    seen: list[Action] = []

    class Recorder(GuessNumberEnv):
        async def step(self, action: Action) -> StepResult:
            seen.append(action)
            return StepResult([], 0.25, False, {"scored": True})

    engine = ScriptedEngine(chat, [CALL + " and more words " * 20])
    task = Task(id="t", prompt="Guess.", env_args={"target": 5})
    (traj,) = await run_episode(engine, Recorder(), task, chat, cfg(max_tokens_per_turn=40), SAMPLING)
    assert traj.status is Status.TRUNCATED and traj.info["end_reason"] == "length"
    assert traj.num_generated == 40 and traj.turns == 1 and traj.reward == 0.25
    assert len(seen) == 1 and seen[0].tool_calls == [] and seen[0].content.startswith("<tool_call>")
    assert traj.info["env"] == {"scored": True} and traj.info["tool_calls"] == 0


async def test_max_total_tokens(chat):
    task = Task(id="t", prompt="Guess.", env_args={"target": 5})
    engine = ScriptedEngine(chat, lambda _: "50")
    c = cfg(max_turns=100, max_total_tokens=120, max_tokens_per_turn=16)
    (traj,) = await run_episode(engine, GuessNumberEnv(max_guesses=100), task, chat, c, SAMPLING)
    assert traj.status is Status.TRUNCATED and traj.info["end_reason"] == "max_total_tokens"
    assert len(traj.token_ids) <= 120 and traj.turns > 1
    assert_token_exact(traj, engine)
    # The last generate call was never allowed past the total budget.
    prompt, sampling, _ = engine.calls[-1]
    assert len(prompt) + sampling.max_tokens <= 120


async def test_max_turns(chat):
    task = Task(id="t", prompt="Guess.", env_args={"target": 5})
    engine = ScriptedEngine(chat, lambda _: "50")
    (traj,) = await run_episode(
        engine, GuessNumberEnv(max_guesses=100), task, chat, cfg(max_turns=3), SAMPLING
    )
    assert traj.status is Status.TRUNCATED and traj.info["end_reason"] == "max_turns" and traj.turns == 3


async def test_prompt_too_long_fails(chat):
    task = Task(id="t", prompt="word " * 300, env_args={"target": 5})
    (traj,) = await run_episode(
        ScriptedEngine(chat, ["1"]), GuessNumberEnv(), task, chat, cfg(max_total_tokens=100), SAMPLING
    )
    assert traj.status is Status.FAILED and "max_total_tokens" in traj.info["error"]


async def test_stop_string_turn_is_closed_with_turn_end(chat):
    """A reply ended by a stop string has no EOS: the loop appends the turn-end token (mask 0)."""
    task = Task(id="t", prompt="Guess.", env_args={"target": 7})
    engine = ScriptedEngine(chat, ["50", "7"], eos=False)
    (traj,) = await run_episode(engine, GuessNumberEnv(), task, chat, cfg(), SAMPLING)
    assert traj.status is Status.COMPLETED and traj.turns == 2
    (_, s1, e1), (_, s2, _) = [sp for sp in spans(traj) if sp[0] == 1]
    assert traj.token_ids[e1] == chat.turn_end_id and traj.loss_mask[e1] == 0
    assert chat.tokenizer.decode(traj.token_ids[e1:s2]).startswith("<|im_end|>\n<|im_start|>user\n")


async def test_abort_is_reported(chat):
    task = Task(id="t", prompt="Guess.", env_args={"target": 7})
    (traj,) = await run_episode(
        ScriptedEngine(chat, ["5"], eos=False, finish="abort"), GuessNumberEnv(), task, chat, cfg(), SAMPLING
    )
    assert traj.status is Status.ABORTED and traj.num_generated > 0


async def test_sampling_seed_and_params_are_passed(chat):
    engine = ScriptedEngine(chat, lambda _: "50")
    task = Task(id="t", prompt="Guess.", env_args={"target": 5})
    sp = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=11)
    await run_episode(engine, GuessNumberEnv(max_guesses=3), task, chat, cfg(max_tokens_per_turn=64), sp)
    assert [c[1].seed for c in engine.calls] == [11, 12, 13]
    assert all(c[1].max_tokens == 32 and c[1].temperature == 0.7 and c[1].top_p == 0.9 for c in engine.calls)


# ------------------------------------------------------------------------------- failure containment
class Broken(Environment):
    def __init__(self, where: str, what: str):
        self.where, self.what = where, what
        self.closed = False

    async def _act(self):
        if self.what == "raise":
            raise KeyError("missing\nsecond line")
        await asyncio.sleep(3600)

    async def reset(self, task):
        if self.where == "reset":
            await self._act()
        return task.messages()

    async def step(self, action):
        if self.where == "step":
            await self._act()
        return StepResult([], 1.0, True, {})

    async def close(self):
        self.closed = True


@pytest.mark.parametrize("where", ["reset", "step"])
@pytest.mark.parametrize("what", ["raise", "hang"])
async def test_env_failures_are_contained(chat, where, what):
    env = Broken(where, what)
    engine = ScriptedEngine(chat, lambda _: "hi")
    (traj,) = await run_episode(
        engine, env, Task(id="t", prompt="x"), chat, cfg(step_timeout_s=0.1), SAMPLING
    )
    assert traj.status is Status.FAILED and traj.reward == 0.0 and env.closed
    error = traj.info["error"]
    assert "\n" not in error and error.startswith(f"env.{where}")
    assert ("timed out after 0.1s" in error) if what == "hang" else ("KeyError" in error)


@pytest.mark.parametrize(
    "result, reason",
    [
        (StepResult([], float("nan"), True, {}), "finite"),
        (StepResult([], "1", True, {}), "reward must be a float"),
        (StepResult("obs", 0.0, True, {}), "must be a list"),
        (None, "expected StepResult"),
        (StepResult([], 0.0, 1, {}), "done must be a bool"),
        (StepResult([{"role": "user"}], 0.0, False, {}), "content must be a string"),
        (StepResult([], 0.0, True, "info"), "info must be a dict"),
        (([], 1.0, True, {}), None),  # a gym-style 4-tuple is accepted
    ],
)
async def test_malformed_step_results(chat, result, reason):
    class Env(Environment):
        async def reset(self, task):
            return task.messages()

        async def step(self, action):
            return result

    (traj,) = await run_episode(
        ScriptedEngine(chat, ["hi"]), Env(), Task(id="t", prompt="x"), chat, cfg(), SAMPLING
    )
    if reason is None:
        assert traj.status is Status.COMPLETED and traj.reward == 1.0
    else:
        assert traj.status is Status.FAILED and traj.reward == 0.0
        assert "malformed result" in traj.info["error"] and reason in traj.info["error"]


async def test_bad_reset_messages_fail(chat):
    class Env(Environment):
        async def reset(self, task):
            return [{"role": "user", "content": 5}]

        async def step(self, action):
            return StepResult([], 0.0, True, {})

    (traj,) = await run_episode(
        ScriptedEngine(chat, ["hi"]), Env(), Task(id="t", prompt="x"), chat, cfg(), SAMPLING
    )
    assert traj.status is Status.FAILED and "reset() result[0].content" in traj.info["error"]


async def test_flaky_containment_100_episodes(chat):
    """100 episodes, 30% planned failures (raise / hang / malformed, in reset or a step): nothing
    escapes, and every planned failure is one FAILED trajectory with its reason recorded."""
    envs: list[FlakyEnv] = []

    def factory() -> FlakyEnv:
        envs.append(FlakyEnv(failure_rate=0.3, num_steps=2, seed=1234))
        return envs[-1]

    tasks = FlakyEnv.make_tasks(25, seed=0)
    engine = ScriptedEngine(chat, lambda _: "ok")
    c = cfg(step_timeout_s=0.2, max_turns=4)
    groups = await asyncio.gather(*(run_env_group(engine, factory, t, 4, chat, c, SAMPLING) for t in tasks))
    trajs = [t for g in groups for t in g]
    assert len(trajs) == len(envs) == 100

    async def plan_of(task: Task) -> tuple[str, str] | None:
        """What a fresh env decides for `task` (seeded: the same for every episode of the task),
        read back without running the failure itself (a planned hang in reset is cut short)."""
        probe = FlakyEnv(failure_rate=0.3, num_steps=2, seed=1234)
        try:
            await asyncio.wait_for(probe.reset(task), 0.05)
        except (RuntimeError, TimeoutError):
            pass
        return probe.planned

    plans = {t.id: await plan_of(t) for t in tasks}
    # Trajectory by trajectory: exactly the planned episodes failed, each for its planned reason.
    expected = [plans[t.task_id] for t in trajs]
    assert [t.task_id for t in trajs] == [t.id for t in tasks for _ in range(4)]
    assert [t.status is Status.FAILED for t in trajs] == [p is not None for p in expected]
    assert sorted(map(str, (e.planned for e in envs))) == sorted(map(str, expected))
    n_failed = sum(p is not None for p in expected)
    assert 10 <= n_failed <= 50  # seeded: about 30%
    assert {p[0] for p in expected if p} == {"raise", "hang", "malformed"}
    for t, plan in zip(trajs, expected, strict=True):
        if plan is None:
            assert t.status is Status.COMPLETED and t.reward == 1.0 and t.turns == 2, (t.task_id, t.info)
            continue
        mode, phase = plan
        error = t.info["error"]
        assert t.reward == 0.0 and t.turns == (0 if phase == "reset" else int(phase[-1]) + 1), (plan, t.turns)
        if mode == "raise":
            assert f"flaky env failed on purpose in {phase}" in error and "RuntimeError" in error, error
        elif mode == "hang":
            where = "reset" if phase == "reset" else "step"
            assert error.startswith(f"env.{where} timed out"), (plan, error)
        else:
            assert ("reset() result" if phase == "reset" else "malformed") in error, (plan, error)
    assert all(e.closed for e in envs)


async def test_run_group_is_concurrent_and_contains_factory_errors(chat):
    engine = ScriptedEngine(chat, lambda _: "50", hold_until=6)
    task = Task(id="t", prompt="Guess.", env_args={"target": 50})
    sp = dataclasses.replace(SAMPLING, seed=5)
    trajs = await run_env_group(engine, lambda: GuessNumberEnv(), task, 6, chat, cfg(), sp)
    assert [t.status for t in trajs] == [Status.COMPLETED] * 6 and engine.max_in_flight == 6
    assert sorted(c[1].seed for c in engine.calls) == sorted(5 + i * 1_000_003 for i in range(6))

    def bad_factory():
        raise ValueError("no such kwarg")

    trajs = await run_env_group(engine, bad_factory, task, 3, chat, cfg(), SAMPLING)
    assert all(
        t.status is Status.FAILED and "env construction raised ValueError" in t.info["error"] for t in trajs
    )


async def test_engine_errors_propagate(chat):
    class Dead:
        version = 0

        async def generate(self, prompt_ids, sampling, request_id=None):
            raise ConnectionError("engine died")

    with pytest.raises(ConnectionError):
        await run_env_group(
            Dead(), GuessNumberEnv, Task(id="t", prompt="x", env_args={"target": 1}), 3, chat, cfg(), SAMPLING
        )
    with pytest.raises(ConnectionError):
        await run_episode(
            Dead(), GuessNumberEnv(), Task(id="t", prompt="x", env_args={"target": 1}), chat, cfg(), SAMPLING
        )


# ------------------------------------------------------------------------------------ real engine
class Recording:
    """Wraps the real engine and keeps every output (to compare spans against)."""

    def __init__(self, engine):
        self.engine = engine
        self.outputs: list[GenerateOutput] = []
        self.calls: list[tuple[list[int], SamplingParams, str | None]] = []

    @property
    def version(self) -> int:
        return self.engine.version

    async def generate(self, prompt_ids, sampling, request_id=None):
        self.calls.append((list(prompt_ids), sampling, request_id))
        out = await self.engine.generate(prompt_ids, sampling, request_id=request_id)
        self.outputs.append(out)
        return out


def assert_real_alignment(traj: Trajectory, rec: Recording, chat: ChatFormat) -> None:
    assert_token_exact(traj, rec)  # spans == engine outputs, prompts are prefixes, env tokens 0/-1
    for m, s, e in spans(traj):
        if m == 1:
            gen = traj.token_ids[s:e]
            assert all(lp <= 0.0 for lp in traj.behavior_logprobs[s:e])
            assert all(v == rec.engine.version for v in traj.versions[s:e])
            # Decoding the span and comparing with the engine's ids: the span *is* the engine's ids,
            # and its text decodes identically (no re-tokenisation happened anywhere).
            out = rec.outputs[[x for x in spans(traj) if x[0] == 1].index((m, s, e))]
            assert chat.tokenizer.decode(gen) == chat.tokenizer.decode(out.token_ids)


# A random tiny model practically never samples its EOS token (1 in 49k), so its replies would all be
# cut by length. A stop string ends its turns instead (the loop then closes each turn with the
# turn-end token itself): "e" occurs in most replies within a few tokens.
RANDOM_MODEL_SAMPLING = SamplingParams(max_tokens=16, temperature=1.0, stop=["e"], seed=7)


async def test_real_engine_calculator_multi_turn(engine, chat):
    """A random tiny model never calls the tool, so with require_tool_call the env keeps reminding
    it: a multi-turn episode whose generated spans are the engine's tokens exactly."""
    rec = Recording(engine)
    task = CalculatorEnv.make_tasks(1, seed=3)[0]
    c = cfg(max_turns=3, max_tokens_per_turn=16, max_total_tokens=1024)
    (traj,) = await run_episode(
        rec, CalculatorEnv(require_tool_call=True, max_turns=3), task, chat, c, RANDOM_MODEL_SAMPLING
    )
    assert traj.status in (Status.TRUNCATED, Status.COMPLETED) and traj.turns >= 2
    assert "Use the calculator tool before giving the final answer." in chat.tokenizer.decode(traj.token_ids)
    assert_real_alignment(traj, rec, chat)
    assert "<tools>" in chat.tokenizer.decode(traj.token_ids[: traj.prompt_len])


async def test_real_engine_guess_number(engine, chat):
    rec = Recording(engine)
    task = GuessNumberEnv.make_tasks(1, seed=0)[0]
    c = cfg(max_turns=4, max_tokens_per_turn=8, max_total_tokens=1024)
    trajs = await run_env_group(
        rec,
        lambda: GuessNumberEnv(max_guesses=4),
        task,
        2,
        chat,
        c,
        dataclasses.replace(RANDOM_MODEL_SAMPLING, max_tokens=8),
    )
    assert sum(t.turns for t in trajs) > 2
    for traj in trajs:
        assert traj.status in (Status.TRUNCATED, Status.COMPLETED)
        assert len(traj.token_ids) == len(traj.loss_mask) == len(traj.behavior_logprobs) == len(traj.versions)
        for m, s, e in spans(traj):
            if m == 1:
                assert any(out.token_ids == traj.token_ids[s:e] for out in rec.outputs)
        assert traj.prompt_len == chat.initial_prompt_ids(task.messages()).__len__()
