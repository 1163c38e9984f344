"""The agent endpoint's other APIs: OpenAI's Responses API (`/v1/responses`) and Anthropic's Messages
API (`/v1/messages`).

Pure tests parse hand-written payloads and check the envelopes and event streams against the client
libraries' own types. Then the real `openai` and `anthropic` clients, as an agent uses them, against
the endpoint on the shared session engine (tiny_dense, float32): token-exact prompts and replies,
continuation, streaming, refusals. The random tiny model never writes a tool call, so tool-call
round trips use the scripted engine of test_openai_agent.py behind the real server, with the example
agents: the three APIs give the same trajectory. The two-step training runs of the example agents are
in test_readme_commands.py (the commands docs/environments.md gives).
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from anthropic import AsyncAnthropic
from anthropic import BadRequestError as AnthropicBadRequest
from anthropic.types import Message, RawMessageStreamEvent
from openai import AsyncOpenAI, BadRequestError
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from test_openai_agent import CFG, TASK, ToolCallingEngine, check_alignment, mask_runs

from rollout.agent import messages, protocol, responses
from rollout.agent.protocol import RequestError
from rollout.agent.runner import load_agent, run_agent_group
from rollout.agent.server import AgentServer
from rollout.chat import ChatFormat
from slime.core.config import RolloutConfig
from slime.core.types import Status, Task

REPO = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}
CHAT_TOOL = {
    "type": "function",
    "function": {"name": "calculator", "description": "Math.", "parameters": SCHEMA},
}
RESPONSES_TOOL = {"type": "function", "name": "calculator", "description": "Math.", "parameters": SCHEMA}
ANTHROPIC_TOOL = {"name": "calculator", "description": "Math.", "input_schema": SCHEMA}


def refused(fn, *args, **kwargs) -> str:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    assert info.value.status == 400
    return info.value.message


# ------------------------------------------------------------------------------ Responses, pure


def test_responses_input_becomes_the_chat_conversation():
    body = {
        "instructions": "Use the calculator.",
        "tools": [RESPONSES_TOOL],
        "input": [
            {"role": "user", "content": "What is 2 + 3?"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me compute.", "annotations": []}],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "calculator",
                "arguments": '{"expression": "2+3"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "5"},
            {"role": "developer", "content": [{"type": "input_text", "text": "Answer briefly."}]},
        ],
    }
    req, conversation = responses.parse_responses_request(body, {})
    chat = protocol.parse_chat_request(
        {
            "tools": [CHAT_TOOL],
            "messages": [
                {"role": "system", "content": "Use the calculator."},
                {"role": "user", "content": "What is 2 + 3?"},
                {
                    "role": "assistant",
                    "content": "Let me compute.",
                    "tool_calls": [
                        {
                            "id": "x",
                            "type": "function",
                            "function": {"name": "calculator", "arguments": '{"expression": "2+3"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "5"},
                {"role": "system", "content": "Answer briefly."},
            ],
        }
    )
    # The same conversation and tools as Chat Completions: the same prompt ids, the same continuation.
    assert req.canon == chat.canon and req.tools_key == chat.tools_key and req.tools == chat.tools
    assert req.parse_tools and conversation == req.messages[1:]  # kept without the instructions
    # A string is one user message; calls without text start an assistant message of their own.
    req, _ = responses.parse_responses_request({"input": "Hi"}, {})
    assert req.canon == (("user", "Hi", (), "", ""),) and req.tools is None
    req, _ = responses.parse_responses_request(
        {
            "input": [
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"role": "user", "content": "x"},
            ]
        },
        {},
    )
    assert [m["role"] for m in req.messages] == ["assistant", "user"] and req.messages[0]["tool_calls"] == [
        ("f", {})
    ]


def test_responses_previous_response_id_continues_the_episode_conversation():
    first = [protocol.normal_message("user", "Hi"), protocol.normal_message("assistant", "Hello.")]
    body = {"instructions": "Be brief.", "previous_response_id": "resp_1", "input": "And now?"}
    req, conversation = responses.parse_responses_request(body, {"resp_1": first})
    assert [m["content"] for m in req.messages] == ["Be brief.", "Hi", "Hello.", "And now?"]
    assert conversation == [*first, protocol.normal_message("user", "And now?")]
    assert "not a response of this episode" in refused(
        responses.parse_responses_request, {"previous_response_id": "resp_x", "input": "x"}, {}
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tool type 'web_search' is not supported"),
        (
            {"input": "x", "tools": [{"type": "custom", "name": "f"}]},
            'declare the tool as a function tool {"type": "function"',
        ),
        ({"input": "x", "tools": [CHAT_TOOL]}, "Chat Completions shape"),
        ({"input": "x", "tools": [{"type": "function"}]}, "tools[0].name must be a non-empty string"),
        (
            {"input": [{"type": "web_search_call", "id": "w"}]},
            "input item type 'web_search_call' is not supported",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "'input_image' is not supported",
        ),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role must be one of"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{oops"}]}, "arguments is not JSON"),
        ({"input": []}, "input must be a string or a non-empty list"),
        ({"input": "x", "tool_choice": {"type": "function", "name": "f"}}, "cannot force a particular tool"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}, "structured output"),
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning is not supported"),
        ({"input": "x", "background": True}, "background is not supported"),
    ],
)
def test_responses_requests_it_cannot_honour_are_refused(body, words):
    assert words in refused(responses.parse_responses_request, body, {})


def test_responses_sampling_names_the_responses_keys():
    cfg = RolloutConfig(temperature=0.7, max_tokens_per_turn=32, max_total_tokens=256)
    assert responses.sampling({"max_output_tokens": 8}, cfg, 10).max_tokens == 8
    assert responses.sampling({"max_output_tokens": 999}, cfg, 10).max_tokens == 32
    with pytest.raises(RequestError) as info:
        responses.sampling({"temperature": 1.0}, cfg, 10)
    assert info.value.param == "temperature" and "set rollout.temperature=1.0" in info.value.message
    assert info.value.body()["error"]["type"] == "invalid_request_error"  # OpenAI's error object
    with pytest.raises(RequestError) as info:
        responses.sampling({"max_output_tokens": 0}, cfg, 10)
    assert info.value.param == "max_output_tokens"
    with pytest.raises(RequestError) as info:
        responses.sampling({}, cfg, 300)
    assert info.value.code == "context_length_exceeded" and info.value.param == "input"


def test_responses_object_and_events_parse_as_the_openai_client_types():
    calls = [("calculator", {"expression": "2+3"})]
    lp = protocol.chat_logprobs(["Let", " me"], [-0.1, -0.2], 0)
    obj = responses.response_object(
        model="m", body={"tools": [RESPONSES_TOOL]}, content="Let me.", calls=calls, finish_reason="stop",
        prompt_tokens=10, completion_tokens=4, cached_tokens=6, logprobs=lp,
    )  # fmt: skip
    parsed = Response.model_validate(obj)
    assert parsed.status == "completed" and parsed.output_text == "Let me."
    message, call = parsed.output
    assert message.type == "message" and message.content[0].logprobs[1].logprob == -0.2
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.name == "calculator"
    assert json.loads(call.arguments) == {"expression": "2+3"}
    assert parsed.usage.input_tokens_details.cached_tokens == 6 and parsed.usage.total_tokens == 14
    # Only calls: no message item. The token limit: incomplete, max_output_tokens.
    only_calls = responses.response_object(
        model="m", body={}, content="", calls=calls, finish_reason="stop",
        prompt_tokens=1, completion_tokens=1, cached_tokens=0,
    )  # fmt: skip
    assert [i["type"] for i in only_calls["output"]] == ["function_call"]
    cut = responses.response_object(
        model="m", body={}, content="", calls=[], finish_reason="length",
        prompt_tokens=1, completion_tokens=1, cached_tokens=0,
    )  # fmt: skip
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [i["type"] for i in cut["output"]] == ["message"]

    events = responses.stream_events(obj)
    adapter = TypeAdapter(ResponseStreamEvent)
    for e in events:
        adapter.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[4]["delta"] == "Let me." and events[9]["delta"] == call.arguments
    assert responses.stream_events(cut)[-1]["type"] == "response.incomplete"


# ------------------------------------------------------------------------------ Messages, pure


def test_messages_conversation_becomes_the_chat_conversation():
    body = {
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Use the calculator."}],
        "tools": [ANTHROPIC_TOOL],
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "calculator",
                        "input": {"expression": "2+3"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "5"}],
                    },
                    {"type": "text", "text": "Answer briefly."},
                ],
            },
        ],
    }
    req = messages.parse_messages_request(body)
    assert req.canon == (
        ("system", "Use the calculator.", (), "", ""),
        ("user", "What is 2 + 3?", (), "", ""),
        ("assistant", "Let me compute.", (("calculator", '{"expression": "2+3"}'),), "", ""),
        ("tool", "5", (), "toolu_1", ""),
        ("user", "Answer briefly.", (), "", ""),
    )
    assert req.tools == [CHAT_TOOL] and req.parse_tools
    assert not messages.parse_messages_request(dict(body, tool_choice={"type": "none"})).parse_tools
    # count_tokens bodies have no max_tokens.
    assert messages.parse_messages_request(
        {k: v for k, v in body.items() if k != "max_tokens"}, count_only=True
    )


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tool type 'web_search_20250305' is not supported",
        ),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, 'declare it as a custom tool {"name"'),
        ({"tools": [CHAT_TOOL]}, "in OpenAI's shape"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema: Field required"),
        ({"max_tokens": None}, "max_tokens: Field required"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "content block type 'image' is not supported",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "The answer is"},
                ]
            },
            "prefill",
        ),
        ({"messages": [{"role": "system", "content": "x"}]}, "role must be 'user' or 'assistant'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking is not supported"),
        ({"tool_choice": {"type": "tool", "name": "f"}}, "cannot force a particular tool"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {}}}}, "output_config"),
    ],
)
def test_messages_requests_it_cannot_honour_are_refused(body, words):
    full = {"max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}], **body}
    assert words in refused(messages.parse_messages_request, full)


def test_messages_sampling_and_the_anthropic_error_format():
    cfg = RolloutConfig(temperature=0.7, max_tokens_per_turn=32, max_total_tokens=256)
    params = messages.sampling({"max_tokens": 8, "stop_sequences": ["\n\n"]}, cfg, 10)
    assert params.max_tokens == 8 and params.stop == ["\n\n"] and params.temperature == 0.7
    # top_p / top_k are accepted (the sampling mask is recorded); another temperature is refused.
    assert messages.sampling({"max_tokens": 8, "top_p": 0.5, "top_k": 5}, cfg, 10).truncates
    for body, key in (({"temperature": 0.3}, "temperature"),):
        with pytest.raises(RequestError) as info:
            messages.sampling({"max_tokens": 8, **body}, cfg, 10)
        error = messages.error_body(info.value)
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        assert error["error"]["message"].startswith(key)
    # stop_reason "stop_sequence" names the stop string the reply was cut at: the first one in the text.
    assert protocol.stop_match("4 + 1 ### 5 !!", ["!!", "###"]) == "###"
    assert protocol.stop_match("no stop here", ["!!"]) is None
    bad_system = {"max_tokens": 4, "system": 3, "messages": [{"role": "user", "content": "x"}]}
    assert "system must be a string" in refused(messages.parse_messages_request, bad_system)
    assert messages.error_body(RequestError("gone", status=404))["error"]["type"] == "not_found_error"
    assert messages.error_body(RequestError("boom", status=500))["error"]["type"] == "api_error"


def test_messages_object_and_events_parse_as_the_anthropic_client_types():
    calls = [("calculator", {"expression": "2+3"})]
    obj = messages.message_object(
        model="m", content="Let me.", calls=calls, finish_reason="stop", stop_sequence=None,
        prompt_tokens=10, completion_tokens=4, cached_tokens=6,
    )  # fmt: skip
    parsed = Message.model_validate(obj)
    text, use = parsed.content
    assert text.text == "Let me." and use.name == "calculator" and use.input == {"expression": "2+3"}
    assert use.id.startswith("toolu_") and parsed.stop_reason == "tool_use"
    assert (parsed.usage.input_tokens, parsed.usage.cache_read_input_tokens, parsed.usage.output_tokens) == (
        4,
        6,
        4,
    )
    assert messages.stop_reason("stop", False, None) == "end_turn"
    assert messages.stop_reason("length", True, None) == "max_tokens"
    assert messages.stop_reason("stop", False, "###") == "stop_sequence"
    cut = messages.message_object(
        model="m", content="Done", calls=[], finish_reason="stop", stop_sequence="###",
        prompt_tokens=1, completion_tokens=3, cached_tokens=0,
    )  # fmt: skip
    assert (cut["stop_reason"], cut["stop_sequence"]) == ("stop_sequence", "###")

    events = messages.stream_events(obj)
    adapter = TypeAdapter(RawMessageStreamEvent)
    for e in events:
        adapter.validate_python(e)
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2]["delta"] == {"type": "text_delta", "text": "Let me."}
    assert json.loads(events[5]["delta"]["partial_json"]) == {"expression": "2+3"}
    assert events[7]["delta"]["stop_reason"] == "tool_use" and events[7]["usage"]["output_tokens"] == 4


def test_the_client_libraries_are_project_dependencies():
    """`make setup` (pip install -e ".[cpu,dev]") installs both clients agents are written with."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip() for d in deps}
    assert {"openai", "anthropic"} <= names


# ------------------------------------------------------------------------------ the endpoint, real clients


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
async def openai_client(session):
    async with AsyncOpenAI(base_url=session.base_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="session")
async def anthropic_client(session):
    # As an agent writes it: the episode's base URL as given (the client appends /v1/messages).
    async with AsyncAnthropic(base_url=session.base_url, api_key="unused", max_retries=0) as c:
        yield c


async def test_responses_openai_client_token_exact(engine, server, session, chat, openai_client):
    r = await openai_client.responses.create(
        model=server.model_name,
        instructions="Be brief.",
        input="What is 2 + 3?",
        max_output_tokens=8,
        include=["message.output_text.logprobs"],
    )
    (rec,) = session.calls
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert rec.prompt_ids == chat.initial_prompt_ids(conversation)
    assert 1 <= len(rec.completion_ids) <= 8 and rec.versions == [engine.version] * len(rec.completion_ids)
    assert r.output_text == chat.decode(rec.completion_ids)
    assert [x.logprob for x in r.output[0].content[0].logprobs] == rec.logprobs
    assert r.usage.input_tokens == len(rec.prompt_ids) and r.usage.output_tokens == len(rec.completion_ids)
    assert r.status == ("completed" if rec.finish_reason == "stop" else "incomplete")
    assert rec.sampling["max_tokens"] == 8 and rec.sampling["temperature"] == CFG.temperature
    # previous_response_id: the stored conversation continues on the generated ids, token-exactly.
    r2 = await openai_client.responses.create(
        model=server.model_name, instructions="Be brief.", previous_response_id=r.id, input="Are you sure?"
    )
    rec2 = session.calls[1]
    closing = [] if rec.completion_ids[-1] in chat.stop_ids else [chat.turn_end_id]
    delta = chat.delta_ids([{"role": "user", "content": "Are you sure?"}])
    assert rec2.prompt_ids == rec.prompt_ids + rec.completion_ids + closing + delta
    assert rec2.reused_prefix == len(rec.prompt_ids) + len(rec.completion_ids)
    assert r2.usage.input_tokens_details.cached_tokens == rec2.reused_prefix
    # The same conversation sent back as items (the output as received) continues the same way.
    items = [
        {"role": "user", "content": "What is 2 + 3?"},
        *r.output,
        {"role": "user", "content": "Are you sure?"},
    ]
    await openai_client.responses.create(model=server.model_name, instructions="Be brief.", input=items)
    assert session.calls[2].prompt_ids == rec2.prompt_ids


async def test_responses_streaming_openai_client(server, session, chat, openai_client):
    stream = await openai_client.responses.create(
        model=server.model_name, input="Hi", max_output_tokens=5, stream=True
    )
    kinds, text, final = [], "", None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    rec = session.calls[0]
    assert kinds[:2] == ["response.created", "response.in_progress"] and final is not None
    assert text == chat.decode(rec.completion_ids) == final.output_text
    # The SDK's stream helper accumulates the same events (completed or incomplete: the token limit).
    async with openai_client.responses.stream(
        model=server.model_name, input="Hi", max_output_tokens=5, previous_response_id=final.id
    ) as helper:
        last = [e async for e in helper][-1]
    assert last.type in ("response.completed", "response.incomplete")
    assert last.response.output_text == chat.decode(session.calls[1].completion_ids)
    assert session.calls[1].reused_prefix == len(rec.prompt_ids) + len(rec.completion_ids)


async def test_messages_anthropic_client_token_exact(engine, server, session, chat, anthropic_client):
    m = await anthropic_client.messages.create(
        model=server.model_name,
        max_tokens=8,
        system="Be brief.",
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
    )
    (rec,) = session.calls
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert rec.prompt_ids == chat.initial_prompt_ids(conversation)
    assert rec.versions == [engine.version] * len(rec.completion_ids) and rec.sampling["max_tokens"] == 8
    text = "".join(b.text for b in m.content if b.type == "text")
    assert text == chat.decode(rec.completion_ids)
    assert m.stop_reason == ("end_turn" if rec.finish_reason == "stop" else "max_tokens")
    assert m.usage.input_tokens == len(rec.prompt_ids) and m.usage.output_tokens == len(rec.completion_ids)
    # The reply's blocks sent back as received, then a user turn: continued on the generated ids.
    follow = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": m.content},
        {"role": "user", "content": "Are you sure?"},
    ]
    m2 = await anthropic_client.messages.create(
        model=server.model_name, max_tokens=4, system="Be brief.", messages=follow
    )
    rec2 = session.calls[1]
    closing = [] if rec.completion_ids[-1] in chat.stop_ids else [chat.turn_end_id]
    delta = chat.delta_ids([{"role": "user", "content": "Are you sure?"}])
    assert rec2.prompt_ids == rec.prompt_ids + rec.completion_ids + closing + delta
    assert (
        m2.usage.cache_read_input_tokens
        == rec2.reused_prefix
        == len(rec.prompt_ids) + len(rec.completion_ids)
    )
    # count_tokens renders the same prompt without generating.
    counted = await anthropic_client.messages.count_tokens(
        model=server.model_name, system="Be brief.", messages=follow
    )
    assert counted.input_tokens == len(rec2.prompt_ids) and len(session.calls) == 2
    # The base URL without /v1 reaches the same route.
    async with AsyncAnthropic(base_url=session.base_url.removesuffix("/v1"), api_key="u", max_retries=0) as c:
        await c.messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert len(session.calls) == 3


async def test_messages_streaming_anthropic_client(server, session, chat, anthropic_client):
    stream = await anthropic_client.messages.create(
        model=server.model_name, max_tokens=5, messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    kinds, text = [], ""
    async for event in stream:
        kinds.append(event.type)
        if event.type == "content_block_delta":
            text += event.delta.text
    rec = session.calls[0]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert text == chat.decode(rec.completion_ids)
    async with anthropic_client.messages.stream(
        model=server.model_name, max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
    ) as helper:
        final = await helper.get_final_message()
    assert "".join(b.text for b in final.content) == chat.decode(session.calls[1].completion_ids)
    assert final.usage.output_tokens == len(session.calls[1].completion_ids)


async def test_refusals_name_the_key_in_each_apis_format(server, session, openai_client, anthropic_client):
    ask = {"model": "m", "input": "Hi"}
    with pytest.raises(BadRequestError) as e:
        await openai_client.responses.create(**ask, temperature=0.3)
    assert e.value.param == "temperature" and "rollout.temperature=0.3" in e.value.message
    with pytest.raises(BadRequestError, match="top_k must be"):
        await openai_client.responses.create(**ask, extra_body={"top_k": -5})
    with pytest.raises(BadRequestError) as e:
        await openai_client.responses.create(
            **ask, tools=[{"type": "file_search", "vector_store_ids": ["v"]}]
        )
    # The error body's message, not str(e): openai 2.x (which verifiers 0.4.0 pins) puts the body's repr
    # there, quotes escaped.
    assert "tool type 'file_search' is not supported" in e.value.body["message"]
    msgs = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
    for extra, key in (({"temperature": 0.3}, "temperature"), ({"top_k": -5}, "top_k")):
        with pytest.raises(AnthropicBadRequest) as e:
            await anthropic_client.messages.create(**msgs, extra_body=extra)
        assert e.value.body["error"]["type"] == "invalid_request_error"
        assert e.value.body["error"]["message"].startswith(key)
    with pytest.raises(AnthropicBadRequest, match="tool type 'web_search_20250305' is not supported"):
        await anthropic_client.messages.create(
            **msgs, tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]
        )
    async with httpx.AsyncClient(timeout=30) as http:
        gone = await http.post(f"{server.url}/episodes/nope/v1/messages", json=msgs)
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert session.calls == []  # refused requests are not recorded
    assert session.refused.startswith("/v1/messages refused: tools[0]: tool type 'web_search_20250305'")
    # An agent that gets past a refusal is not blamed for it later.
    await anthropic_client.messages.create(**msgs)
    assert len(session.calls) == 1 and session.refused is None


# ------------------------------------------------------------------------------ agents -> trajectories

CALL = 'I will use the calculator.\n<tool_call>[{"name":"calculator","arguments":{"expression":"2+3"}}]</tool_call>'
EXAMPLES = ["calculator_agent", "calculator_responses_agent", "calculator_anthropic_agent"]


async def streaming_responses_agent(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """The Responses example's loop with the SDK's stream helper and previous_response_id."""
    from examples.agents.calculator_agent import SYSTEM, calculator
    from examples.agents.calculator_responses_agent import CALCULATOR

    tool_calls, previous, items = 0, None, list(task["messages"])
    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        for _ in range(2):
            async with client.responses.stream(
                model=model,
                instructions=SYSTEM,
                input=items,
                tools=[CALCULATOR],
                previous_response_id=previous,
            ) as stream:
                response = await stream.get_final_response()
            calls = [item for item in response.output if item.type == "function_call"]
            if not calls:
                break
            previous = response.id
            items = [
                {"type": "function_call_output", "call_id": c.call_id, "output": calculator(c.arguments)}
                for c in calls
            ]
            tool_calls += len(calls)
    return {"reward": float(response.output_text == "Answer: 5"), "info": {"tool_calls": tool_calls}}


async def streaming_anthropic_agent(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """The Anthropic example's loop with the SDK's stream helper (input_json_delta for the call)."""
    from examples.agents.calculator_agent import SYSTEM, calculator
    from examples.agents.calculator_anthropic_agent import CALCULATOR

    tool_calls, messages_ = 0, list(task["messages"])
    async with AsyncAnthropic(base_url=base_url, api_key="unused", max_retries=0) as client:
        for _ in range(2):
            async with client.messages.stream(
                model=model, max_tokens=64, system=SYSTEM, messages=messages_, tools=[CALCULATOR]
            ) as stream:
                message = await stream.get_final_message()
            messages_.append({"role": "assistant", "content": message.content})
            uses = [b for b in message.content if b.type == "tool_use"]
            if not uses:
                break
            assert message.stop_reason == "tool_use"
            results = [
                {"type": "tool_result", "tool_use_id": u.id, "content": calculator(json.dumps(u.input))}
                for u in uses
            ]
            messages_.append({"role": "user", "content": results})
            tool_calls += len(uses)
    text = "".join(b.text for b in message.content if b.type == "text")
    return {"reward": float(text == "Answer: 5"), "info": {"tool_calls": tool_calls}}


async def test_example_agents_give_the_same_trajectory_through_a_tool_call(chat, monkeypatch):
    """The calculator agent written for each API (and streaming variants), on a policy that calls the
    tool then answers: the tool call round-trips in each API's format, and all record the same tokens:
    the chat template's rendering of the conversation, loss mask 1 exactly on the model's two turns."""
    monkeypatch.syspath_prepend(str(REPO))
    trajectories = {}
    agents = {name: load_agent(f"examples.agents.{name}:run") for name in EXAMPLES}
    agents |= {
        "streaming responses": streaming_responses_agent,
        "streaming messages": streaming_anthropic_agent,
    }
    for name, agent in agents.items():
        eng = ToolCallingEngine(chat, [CALL, "Answer: 5"])
        srv = await AgentServer.start(eng, chat, CFG)
        try:
            (traj,) = await run_agent_group(eng, srv, chat, TASK, 1, agent, CFG)
        finally:
            await srv.stop()
        assert traj.status == Status.COMPLETED and traj.reward == 1.0, (name, traj.info)
        assert traj.info["env"]["tool_calls"] == 1 and traj.info["tool_calls"] == 1
        assert traj.info["calls"] == 2 and traj.info["num_segments"] == 1
        g1 = chat.tokenizer.encode(CALL, add_special_tokens=False) + [chat.turn_end_id]
        g2 = chat.tokenizer.encode("Answer: 5", add_special_tokens=False) + [chat.turn_end_id]
        n = len(traj.token_ids)
        assert [traj.token_ids[a:b] for a, b in mask_runs(traj.loss_mask)] == [g1, g2]
        assert eng.prompts[1] == traj.token_ids[: n - len(g2)]  # the second prompt continued the first
        check_alignment(traj, eng.version)
        trajectories[name] = traj
    chat_traj = trajectories["calculator_agent"]
    for name in list(agents)[1:]:
        t = trajectories[name]
        assert (t.token_ids, t.loss_mask, t.prompt_len) == (
            chat_traj.token_ids,
            chat_traj.loss_mask,
            chat_traj.prompt_len,
        )


async def unknown_tool_agent(base_url: str, model: str, task: dict[str, Any]) -> float:
    """An Anthropic agent declaring a server tool the endpoint cannot run; it gives up on the error."""
    async with AsyncAnthropic(base_url=base_url, api_key="unused", max_retries=0) as client:
        await client.messages.create(
            model=model,
            max_tokens=16,
            messages=[{"role": "user", "content": task["prompt"]}],
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )
    return 1.0


async def hello_agent(base_url: str, model: str, task: dict[str, Any]) -> float:
    async with AsyncAnthropic(base_url=base_url, api_key="unused", max_retries=0) as client:
        await client.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    return 0.5


async def test_an_unknown_tool_format_fails_only_its_episode_naming_the_fix(chat):
    eng = ToolCallingEngine(chat, [])
    srv = await AgentServer.start(eng, chat, CFG)
    try:
        (failed,) = await run_agent_group(eng, srv, chat, TASK, 1, unknown_tool_agent, CFG)
        other = Task(id="ok", prompt="Hi")
        eng.replies.append("Hello.")
        (ok,) = await run_agent_group(eng, srv, chat, other, 1, hello_agent, CFG)
    finally:
        await srv.stop()
    assert failed.status == Status.FAILED and failed.reward == 0.0
    reason = failed.info["error"]
    assert reason.startswith(
        "/v1/messages refused: tools[0]: tool type 'web_search_20250305' is not supported"
    )
    assert "declare it as a custom tool" in reason and "agent raised BadRequestError" in reason
    assert ok.status == Status.COMPLETED  # the endpoint and the other episodes carry on


def test_an_agent_whose_client_library_is_missing_names_the_install(tmp_path, monkeypatch):
    (tmp_path / "needs_anthropic.py").write_text(
        "import anthropic\nasync def run(b, m, t):\n    return 0.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "anthropic", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"pip install anthropic"):
        load_agent("needs_anthropic:run")
