"""Black-box agents over the OpenAI-compatible endpoint, on the real session engine (tiny_dense, float32).

The endpoint is exercised with the `openai` client and with plain HTTP (httpx). Agents run as
`run_agent_group` runs them (own thread and loop). The random tiny model never writes a tool call, so
the tool-call paths use a reply text (parsing), a recorded call made by hand (continuation on ids no
re-tokenisation gives) and a scripted engine behind the real server (a whole tool-call exchange
recorded by the server); everything else goes through the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from openai import AsyncOpenAI, BadRequestError, NotFoundError

from envs.calculator import CALCULATOR_TOOL, CalculatorEnv
from rollout.agent.protocol import assistant_message
from rollout.agent.runner import (
    AgentLoadError,
    build_segments,
    coerce_agent_result,
    load_agent,
    run_agent_group,
)
from rollout.agent.server import AgentServer
from rollout.agent.session import CallRecord
from rollout.chat import ChatFormat
from slime.core.config import RolloutConfig
from slime.core.types import GenerateOutput, SamplingParams, Status, Task

REPO = Path(__file__).resolve().parents[1]
CFG = RolloutConfig(max_tokens_per_turn=12, max_total_tokens=1024, max_turns=4, agent_timeout_s=60.0)
TASK = Task(id="t/0", prompt="What is 2 + 3?", env="openai_agent", env_args={"answer": "5"})


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(engine, chat):
    srv = await AgentServer.start(engine, chat, CFG)
    try:
        yield srv
    finally:
        await srv.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def session(server):
    s = server.open_episode()
    try:
        yield s
    finally:
        await server.close_episode(s)


@pytest_asyncio.fixture(loop_scope="session")
async def client(session):
    async with AsyncOpenAI(base_url=session.base_url, api_key="unused", max_retries=0) as c:
        yield c


def mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of consecutive 1s."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_alignment(traj, engine_version: int) -> None:
    """Generated tokens carry logprobs and versions; the others 0.0 and -1."""
    for m, lp, v in zip(traj.loss_mask, traj.behavior_logprobs, traj.versions, strict=True):
        if m:
            assert math.isfinite(lp) and lp <= 0.0 and v == engine_version
        else:
            assert lp == 0.0 and v == -1


# ------------------------------------------------------------------------------ pure parts


def test_load_agent_names_the_problem(tmp_path, monkeypatch):
    (tmp_path / "my_agents.py").write_text(
        textwrap.dedent(
            """
            async def good(base_url, model, task):
                return 1.0
            def sync(base_url, model, task):
                return 1.0
            async def two_args(base_url, model):
                return 1.0
            class Agent:
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO))
    assert load_agent("my_agents:good").__name__ == "good"
    assert load_agent("examples.agents.calculator_agent:run").__name__ == "run"
    for dotted, words in [
        ("my_agents.good", "package.module:function"),
        ("no_such_module_xyz:run", "cannot import module 'no_such_module_xyz'"),
        ("my_agents:missing", "has no attribute 'missing'"),
        ("my_agents:sync", "not an async function"),
        ("my_agents:two_args", "three positional arguments"),
        ("my_agents:Agent", "is a type"),
        ("", "package.module:function"),
    ]:
        with pytest.raises(AgentLoadError, match=words.replace("(", r"\(").replace(")", r"\)")):
            load_agent(dotted)


def test_coerce_agent_result():
    assert coerce_agent_result(1) == (1.0, {})
    assert coerce_agent_result(0.25) == (0.25, {})
    assert coerce_agent_result({"reward": 2, "info": {"a": 1}}) == (2.0, {"a": 1})
    assert coerce_agent_result({"reward": 0.5}) == (0.5, {})
    for bad, words in [
        (True, "bool"),
        ("1.0", "str"),
        (None, "NoneType"),
        (float("nan"), "non-finite"),
        ({"score": 1.0}, "unknown keys"),
        ({"info": {}}, "without 'reward'"),
        ({"reward": 1.0, "info": [1]}, "info of type list"),
        ({"reward": 1.0, "info": {"x": object()}}, "not JSON-serialisable"),
    ]:
        with pytest.raises(Exception, match=words):
            coerce_agent_result(bad)


def _rec(i: int, prompt: list[int], completion: list[int]) -> CallRecord:
    return CallRecord(
        index=i,
        kind="chat",
        request_id=f"r{i}",
        prompt_ids=prompt,
        completion_ids=completion,
        logprobs=[-0.5 - i] * len(completion),
        versions=[i] * len(completion),
        finish_reason="stop",
        reused_prefix=0,
        sampling={},
        generate_s=0.0,
    )


def test_build_segments_extension_and_new_conversations():
    calls = [
        _rec(0, [1, 2, 3], [10, 11]),  # conversation A
        _rec(1, [7, 8], [20]),  # conversation B (does not extend A)
        _rec(2, [1, 2, 3, 10, 11, 4, 5], [12]),  # extends A
        _rec(3, [7, 8, 20, 9], [21, 22]),  # extends B
        _rec(4, [1, 2, 3, 10], [30]),  # branches from inside A: a new segment
    ]
    segs = build_segments(calls)
    assert len(segs) == 3
    a, b, c = segs
    assert a.token_ids == [1, 2, 3, 10, 11, 4, 5, 12]
    assert a.loss_mask == [0, 0, 0, 1, 1, 0, 0, 1]
    assert a.logprobs == [0.0, 0.0, 0.0, -0.5, -0.5, 0.0, 0.0, -2.5]
    assert a.versions == [-1, -1, -1, 0, 0, -1, -1, 2]
    assert a.prompt_len == 3 and [x.index for x in a.calls] == [0, 2]
    assert b.token_ids == [7, 8, 20, 9, 21, 22] and b.loss_mask == [0, 0, 1, 0, 1, 1]
    assert c.token_ids == [1, 2, 3, 10, 30] and c.loss_mask == [0, 0, 0, 0, 1]


def test_assistant_message_parses_tool_calls():
    text = (
        'Let me compute.<tool_call>[{"name": "calculator", "arguments": {"expression": "2 + 3"}}]</tool_call>'
    )
    message, parsed, malformed = assistant_message(text, parse_tools=True)
    assert not malformed and parsed == [("calculator", {"expression": "2 + 3"})]
    assert message["content"] == "Let me compute."
    (call,) = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "2 + 3"}'}
    # Qwen style (one object per block) parses too; content is None when nothing else is left.
    message, parsed, _ = assistant_message('<tool_call>{"name": "f", "arguments": {}}</tool_call>', True)
    assert message["content"] is None and parsed == [("f", {})]
    # Malformed calls come back as plain text; without tools nothing is parsed.
    message, parsed, malformed = assistant_message("<tool_call>{oops</tool_call>", True)
    assert (
        malformed
        and parsed == []
        and message == {"role": "assistant", "content": "<tool_call>{oops</tool_call>"}
    )
    message, parsed, malformed = assistant_message(text, parse_tools=False)
    assert message == {"role": "assistant", "content": text} and not parsed and not malformed


# ------------------------------------------------------------------------------ the endpoint


async def test_chat_openai_client_token_exact(engine, server, session, chat, client):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    r = await client.chat.completions.create(
        model=server.model_name,
        messages=messages,
        max_tokens=8,
        seed=1234,
        logprobs=True,
        extra_body={"return_token_ids": True},
    )
    (rec,) = session.calls
    assert rec.prompt_ids == chat.initial_prompt_ids(messages)
    assert r.model_extra["prompt_token_ids"] == rec.prompt_ids
    assert r.choices[0].model_extra["token_ids"] == rec.completion_ids
    assert 1 <= len(rec.completion_ids) <= 8
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == chat.decode(rec.completion_ids)
    assert [c.logprob for c in r.choices[0].logprobs.content] == rec.logprobs
    assert rec.versions == [engine.version] * len(rec.completion_ids)
    assert r.usage.prompt_tokens == len(rec.prompt_ids) and r.usage.completion_tokens == len(
        rec.completion_ids
    )
    assert rec.sampling["temperature"] == CFG.temperature and rec.sampling["max_tokens"] == 8
    # The ids are the engine's own: the same request straight to the engine (same seed) gives them.
    direct = await engine.generate(rec.prompt_ids, SamplingParams(max_tokens=8, seed=1234))
    assert direct.token_ids == rec.completion_ids
    assert direct.logprobs == pytest.approx(rec.logprobs, abs=1e-4)
    # max_tokens above the rollout cap is capped.
    await client.chat.completions.create(model=server.model_name, messages=messages, max_tokens=500)
    assert session.calls[1].sampling["max_tokens"] == CFG.max_tokens_per_turn
    assert len(session.calls[1].completion_ids) <= CFG.max_tokens_per_turn


async def test_chat_with_tools_plain_http(server, session, chat):
    """Tools are rendered exactly as the env loop renders env tools; a tool-call history is rendered in
    the format the parser reads back; the response has the OpenAI shape."""
    tools = [CALCULATOR_TOOL]
    args = {"expression": "2 + 3"}
    messages = [
        {"role": "system", "content": "Use the calculator."},
        {"role": "user", "content": "What is 2 + 3?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_x",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_x", "content": "5"},
    ]
    async with httpx.AsyncClient(base_url=session.base_url, timeout=60) as http:
        resp = await http.post(
            "/chat/completions",
            json={
                "model": server.model_name,
                "messages": messages,
                "tools": tools,
                "max_tokens": 6,
                "logprobs": True,
            },
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == server.model_name
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == session.calls[0].logprobs
    call = '{"name": "calculator", "arguments": {"expression": "2 + 3"}}'
    rendered = [
        messages[0],
        messages[1],
        {"role": "assistant", "content": f"<tool_call>[{call}]</tool_call>"},
        {"role": "tool", "content": "5", "tool_call_id": "call_x"},
    ]
    expected = chat.initial_prompt_ids(rendered, tools)
    assert session.calls[0].prompt_ids == expected
    assert "<tools>" in chat.tokenizer.decode(expected)
    # The env loop's tools render the same way (one ChatFormat path for both).
    assert chat.initial_prompt_ids(messages[:2], CalculatorEnv().tools) == chat.initial_prompt_ids(
        messages[:2], tools
    )


async def test_chat_continues_after_tool_call_reply_token_exact(server, session, chat, client):
    """A reply with tool calls, sent back as the client received it, continues on the generated ids."""
    tools = [CALCULATOR_TOOL]
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    reply_text = '<tool_call>[{"name": "calculator", "arguments": {"expression": "2 + 3"}}]</tool_call>'
    # Stand-in for a model that wrote a tool call, spelled in ids no re-tokenisation would produce (one
    # token per character), ending with <|im_end|>: only reuse of the recorded ids reproduces them.
    generated = [i for ch in reply_text for i in chat.tokenizer.encode(ch, add_special_tokens=False)]
    generated.append(chat.turn_end_id)
    assert generated[:-1] != chat.tokenizer.encode(reply_text, add_special_tokens=False)
    message, parsed, _ = assistant_message(chat.decode(generated), parse_tools=True)
    rec = _rec(0, chat.initial_prompt_ids(messages, tools), generated)
    rec.messages = (("user", "What is 2 + 3?", (), "", ""),)
    rec.tools_key = json.dumps(tools, sort_keys=True)
    rec.reply = (
        "assistant",
        "",
        (("calculator", json.dumps({"expression": "2 + 3"}, sort_keys=True)),),
        "",
        "",
    )
    session.calls.append(rec)
    call_id = message["tool_calls"][0]["id"]
    follow = [*messages, message, {"role": "tool", "tool_call_id": call_id, "content": "5"}]
    await client.chat.completions.create(model=server.model_name, messages=follow, tools=tools, max_tokens=4)
    new = session.calls[1]
    delta = chat.delta_ids([{"role": "tool", "content": "5", "tool_call_id": call_id}])
    assert new.prompt_ids == rec.prompt_ids + generated + delta
    assert new.reused_prefix == len(rec.prompt_ids) + len(generated)
    # Changing the reply (or the tools) breaks the match: rendered from scratch.
    edited = [*messages, {"role": "assistant", "content": "I will not."}, follow[-1]]
    await client.chat.completions.create(model=server.model_name, messages=edited, tools=tools, max_tokens=4)
    assert session.calls[2].reused_prefix == 0


class ToolCallingEngine:
    """Stands in for a policy that calls a tool (the random tiny model never writes one): each call
    returns the next scripted reply as token ids ending with the turn-end token, and keeps its prompt."""

    def __init__(self, chat: ChatFormat, replies: list[str]) -> None:
        self.chat, self.replies, self.version = chat, list(replies), 3
        self.prompts: list[list[int]] = []

    async def generate(self, prompt_ids, sampling, request_id=None) -> GenerateOutput:
        self.prompts.append(list(prompt_ids))
        ids = self.chat.tokenizer.encode(self.replies.pop(0), add_special_tokens=False)
        ids.append(self.chat.turn_end_id)
        return GenerateOutput(ids, [-0.25] * len(ids), [self.version] * len(ids), "stop")

    async def abort(self, request_id: str) -> None:
        return None


async def calculator_tool_agent(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """Asks, runs the tool call the model returned, sends the result back, reads the answer."""
    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        messages = list(task["messages"])
        first = await client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR_TOOL])
        reply = first.choices[0].message
        messages.append(reply.model_dump(exclude_none=True))
        for call in reply.tool_calls or []:
            expression = json.loads(call.function.arguments)["expression"]
            a, b = expression.split("+")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": str(int(a) + int(b))})
        second = await client.chat.completions.create(model=model, messages=messages, tools=[CALCULATOR_TOOL])
    return {
        "reward": 1.0,
        "info": {
            "finish": [first.choices[0].finish_reason, second.choices[0].finish_reason],
            "content": [reply.content, second.choices[0].message.content],
        },
    }


async def test_tool_call_exchange_recorded_token_exact(chat):
    """A real tool-call round trip through the endpoint: the model's reply with a call becomes OpenAI
    `tool_calls`, the agent sends it back with the tool's result, and the recorded trajectory is the
    chat template's own rendering of that conversation, with loss mask 1 exactly on the model's turns.

    The call is written in compact JSON, not the spacing `format_tool_calls` writes: re-rendering the
    history instead of reusing the generated ids would give other tokens (and a second trajectory)."""
    tools = [CALCULATOR_TOOL]
    call_reply = 'I will use the calculator.\n<tool_call>[{"name":"calculator","arguments":{"expression":"2+3"}}]</tool_call>'
    answer = "The answer is 5."
    eng = ToolCallingEngine(chat, [call_reply, answer])
    srv = await AgentServer.start(eng, chat, CFG)
    try:
        (traj,) = await run_agent_group(eng, srv, chat, TASK, 1, calculator_tool_agent, CFG)
    finally:
        await srv.stop()
    assert traj.status == Status.COMPLETED and traj.reward == 1.0, traj.info
    assert traj.info["env"]["finish"] == ["tool_calls", "stop"]
    assert traj.info["env"]["content"] == ["I will use the calculator.", answer]
    assert traj.info["calls"] == 2 and traj.info["num_segments"] == 1 and traj.info["tool_calls"] == 1
    # The template's rendering of the whole conversation, the model's turns as it wrote them, up to the
    # end of the last assistant turn.
    conversation = [
        *TASK.messages(),
        {"role": "assistant", "content": call_reply},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": answer},
    ]
    text = chat.tokenizer.apply_chat_template(chat.with_tools(conversation, tools), tokenize=False)
    text = text[: text.rindex(chat.turn_end_token) + len(chat.turn_end_token)]
    assert traj.token_ids == chat.tokenizer.encode(text, add_special_tokens=False)
    # Loss mask 1 exactly on the two generated turns (reply text + turn-end token), as the engine sent them.
    g1 = chat.tokenizer.encode(call_reply, add_special_tokens=False) + [chat.turn_end_id]
    g2 = chat.tokenizer.encode(answer, add_special_tokens=False) + [chat.turn_end_id]
    p1 = chat.initial_prompt_ids(TASK.messages(), tools)
    n = len(traj.token_ids)
    assert mask_runs(traj.loss_mask) == [(len(p1), len(p1) + len(g1)), (n - len(g2), n)]
    assert traj.token_ids[len(p1) : len(p1) + len(g1)] == g1 and traj.token_ids[n - len(g2) :] == g2
    assert traj.prompt_len == len(p1) and eng.prompts == [p1, traj.token_ids[: n - len(g2)]]
    check_alignment(traj, eng.version)


async def test_completions_openai_client_and_token_ids(server, session, chat, client):
    prompt = "Once upon a time"
    r = await client.completions.create(
        model=server.model_name,
        prompt=prompt,
        max_tokens=6,
        logprobs=1,
        seed=7,
        extra_body={"return_token_ids": True},
    )
    rec = session.calls[0]
    assert rec.kind == "completion" and rec.prompt_ids == list(chat.tokenizer.encode(prompt))
    assert r.choices[0].model_extra["token_ids"] == rec.completion_ids
    assert r.choices[0].text == chat.tokenizer.decode(rec.completion_ids, skip_special_tokens=True)
    assert r.choices[0].logprobs.token_logprobs == rec.logprobs
    assert len(r.choices[0].logprobs.tokens) == len(rec.completion_ids)
    # A prompt given as token ids is used exactly.
    ids = [1, 2, 3, 500, 1000, 42]
    async with httpx.AsyncClient(base_url=session.base_url, timeout=60) as http:
        resp = await http.post("/completions", json={"model": "any", "prompt": ids, "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert session.calls[1].prompt_ids == ids
    assert resp.json()["choices"][0]["text"] == chat.tokenizer.decode(
        session.calls[1].completion_ids, skip_special_tokens=True
    )


async def test_streaming_chat(server, session, chat, client):
    stream = await client.chat.completions.create(
        model=server.model_name,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    content, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    rec = session.calls[0]
    assert content == chat.decode(rec.completion_ids)
    assert finish in ("stop", "length") and usage.completion_tokens == len(rec.completion_ids)


async def test_request_errors(server, session, client):
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(BadRequestError, match="n=1"):
        await client.chat.completions.create(model="m", messages=msgs, n=2)
    with pytest.raises(BadRequestError, match="presence_penalty"):
        await client.chat.completions.create(model="m", messages=msgs, presence_penalty=0.5)
    with pytest.raises(BadRequestError, match="role"):
        await client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(BadRequestError) as e:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "word " * 1200}]
        )
    assert e.value.code == "context_length_exceeded"
    url = f"{server.url}/episodes/no-such-episode/v1"
    async with AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as other:
        with pytest.raises(NotFoundError):
            await other.chat.completions.create(model="m", messages=msgs)
    async with httpx.AsyncClient(timeout=30) as http:
        bad = await http.post(f"{session.base_url}/chat/completions", content=b"{not json")
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        models = await http.get(f"{session.base_url}/models")
        assert models.json()["data"][0]["id"] == server.model_name
        assert (await http.get(f"{server.url}/v1/models")).status_code == 200
    assert session.calls == []  # refused requests are not recorded


# ------------------------------------------------------------------------------ agents -> trajectories


async def two_turn_chat_agent(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """Two calls in one conversation; reports what the endpoint returned so the test can compare."""
    seen = []
    async with AsyncOpenAI(base_url=base_url, api_key="unused") as client:
        messages = list(task["messages"])
        for question in ("Are you sure?", None):
            r = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=6, extra_body={"return_token_ids": True}
            )
            seen.append((r.model_extra["prompt_token_ids"], r.choices[0].model_extra["token_ids"]))
            if question:
                messages.append(r.choices[0].message.model_dump(exclude_none=True))
                messages.append({"role": "user", "content": question})
    return {"reward": 0.75, "info": {"seen": seen}}


async def test_agent_calls_extending_form_one_trajectory(engine, server, chat):
    trajs = await run_agent_group(engine, server, chat, TASK, 2, two_turn_chat_agent, CFG)
    assert len(trajs) == 2
    for i, t in enumerate(trajs):
        assert t.status in (Status.COMPLETED, Status.TRUNCATED) and t.reward == 0.75
        assert (
            t.info["episode"] == i and t.info["num_segments"] == 1 and t.info["calls"] == 2 and t.turns == 2
        )
        (p1, g1), (p2, g2) = t.info["env"]["seen"]
        assert p1 == chat.initial_prompt_ids(TASK.messages()) and t.prompt_len == len(p1)
        # The second prompt is the first sequence, exactly, then the new user turn.
        closing = [] if g1[-1] in chat.stop_ids else [chat.turn_end_id]
        assert p2 == p1 + g1 + closing + chat.delta_ids([{"role": "user", "content": "Are you sure?"}])
        assert t.token_ids == p2 + g2
        runs = mask_runs(t.loss_mask)
        assert [t.token_ids[a:b] for a, b in runs] == [g1, g2]
        assert runs[0][0] == len(p1) and runs[1][0] == len(p2)
        check_alignment(t, engine.version)
    assert not server.sessions  # every episode closed its session


async def unrelated_calls_agent(base_url: str, model: str, task: dict[str, Any]) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        for text in ("First question?", "A different question."):
            r = await http.post(
                "/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}]}
            )
            r.raise_for_status()
    return 1.0


async def test_agent_calls_not_extending_form_segments(engine, server, chat):
    (a, b) = await run_agent_group(engine, server, chat, TASK, 1, unrelated_calls_agent, CFG)
    assert (a.info["segment"], b.info["segment"]) == (0, 1) and a.info["num_segments"] == 2
    assert a.reward == b.reward == 1.0 and a.turns == b.turns == 2  # episode-level: both calls
    assert a.episode_id == b.episode_id and (a.segment, b.segment) == (0, 1)
    assert a.token_ids[: a.prompt_len] == chat.initial_prompt_ids(
        [{"role": "user", "content": "First question?"}]
    )
    assert b.token_ids[: b.prompt_len] == chat.initial_prompt_ids(
        [{"role": "user", "content": "A different question."}]
    )
    for t in (a, b):
        assert len(mask_runs(t.loss_mask)) == 1 and mask_runs(t.loss_mask)[0] == (
            t.prompt_len,
            len(t.token_ids),
        )
        check_alignment(t, engine.version)


async def completion_chain_agent(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """Completions: the second prompt is the first prompt + the returned text + more text."""
    async with AsyncOpenAI(base_url=base_url, api_key="unused") as client:
        prompt = "Question: " + task["prompt"] + "\nAnswer:"
        r1 = await client.completions.create(model=model, prompt=prompt, max_tokens=5, seed=11)
        r2 = await client.completions.create(
            model=model, prompt=prompt + r1.choices[0].text + "\nCheck:", max_tokens=5
        )
    return {
        "reward": 0.0,
        "info": {"prompt": prompt, "text1": r1.choices[0].text, "text2": r2.choices[0].text},
    }


async def test_completion_chain_is_token_exact(engine, server, chat):
    (t,) = await run_agent_group(engine, server, chat, TASK, 1, completion_chain_agent, CFG)
    tok = chat.tokenizer
    p1 = list(tok.encode(t.info["env"]["prompt"]))
    (a1, b1), (a2, b2) = mask_runs(t.loss_mask)
    g1 = t.token_ids[a1:b1]
    assert t.token_ids[:a1] == p1 and a1 == t.prompt_len
    assert tok.decode(g1, skip_special_tokens=True) == t.info["env"]["text1"]
    assert t.token_ids[b1:a2] == list(tok.encode("\nCheck:", add_special_tokens=False))
    assert tok.decode(t.token_ids[a2:b2], skip_special_tokens=True) == t.info["env"]["text2"]
    check_alignment(t, engine.version)


async def test_example_calculator_agent(engine, server, chat, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    agent = load_agent("examples.agents.calculator_agent:run")
    task = CalculatorEnv.make_tasks(1, seed=3)[0]
    trajs = await run_agent_group(engine, server, chat, task, 1, agent, CFG)
    assert trajs and all(t.status != Status.FAILED for t in trajs), [t.info.get("error") for t in trajs]
    assert trajs[0].reward in (0.0, 1.0) and "tool_calls" in trajs[0].info["env"]
    for t in trajs:
        check_alignment(t, engine.version)


# ------------------------------------------------------------------------------ containment


async def mixed_agent(base_url: str, model: str, task: dict[str, Any]) -> Any:
    mode = task["env_args"]["mode"]
    if mode == "no_calls":
        return 1.0
    if mode == "exit":
        raise SystemExit(3)
    if mode == "blocking":
        # A synchronous client inside `async def`: only its own thread waits.
        with httpx.Client(base_url=base_url, timeout=60) as http:
            r = http.post(
                "/chat/completions", json={"model": model, "messages": task["messages"], "max_tokens": 3}
            )
            r.raise_for_status()
        return 1.0
    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        await client.chat.completions.create(model=model, messages=task["messages"], max_tokens=3)
        if mode == "raise":
            raise ValueError("boom")
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "malformed":
            return "yes"
        if mode == "bad_dict":
            return {"score": 1.0}
    return {"reward": 1.0, "info": {"mode": mode}}


async def test_agent_failures_fail_only_their_episode(engine, server, chat):
    cfg = dataclasses.replace(CFG, agent_timeout_s=4.0)
    modes = ["ok", "raise", "hang", "malformed", "bad_dict", "no_calls", "exit", "blocking"]
    tasks = [Task(id=f"m-{m}", prompt="Hi there", env_args={"mode": m}) for m in modes]
    groups = await asyncio.gather(
        *(run_agent_group(engine, server, chat, t, 1, mixed_agent, cfg) for t in tasks)
    )
    by_mode = {m: g for m, g in zip(modes, groups, strict=True)}
    for m in ("ok", "blocking"):
        (t,) = by_mode[m]
        assert t.status != Status.FAILED and t.reward == 1.0, t.info
    expected = {
        "raise": "agent raised ValueError: boom",
        "hang": "agent timed out after 4s",
        "malformed": "agent returned a reward of type str",
        "bad_dict": "unknown keys ['score']",
        "no_calls": "agent made no model calls",
        "exit": "agent raised RuntimeError: SystemExit 3",
    }
    for m, words in expected.items():
        (t,) = by_mode[m]
        assert t.status == Status.FAILED and t.reward == 0.0 and words in t.info["error"], (m, t.info)
    # A failed episode keeps the tokens of its call for inspection.
    (raised,) = by_mode["raise"]
    assert sum(raised.loss_mask) >= 1 and raised.info["calls"] == 1
    assert not server.sessions  # the hung agent's session is closed; its later calls would get 404


async def test_engine_errors_propagate(engine, chat):
    """An engine exception is the worker's problem, not the agent's: run_agent_group raises."""
    # max_total_tokens above the engine's max_model_len lets an over-long prompt reach the engine.
    cfg = dataclasses.replace(CFG, max_total_tokens=4096)
    srv = await AgentServer.start(engine, chat, cfg)
    try:

        async def long_prompt_agent(base_url: str, model: str, task: dict[str, Any]) -> float:
            async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
                await client.completions.create(model=model, prompt=list(range(100, 2600)), max_tokens=2)
            return 1.0

        with pytest.raises(ExceptionGroup) as info:
            await run_agent_group(engine, srv, chat, TASK, 1, long_prompt_agent, cfg)
        (err,) = info.value.exceptions
        assert isinstance(err, RuntimeError) and "engine failed" in str(err) and err.__cause__ is not None
        assert not srv.sessions
    finally:
        await srv.stop()
    assert await engine.health()
