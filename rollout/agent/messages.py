"""Anthropic's Messages API wire format (`POST /v1/messages`) as pure functions (no server, no engine).

Requests (`parse_messages_request`): `system` (a string or text blocks) becomes the first message;
`messages` alternate user / assistant, content a string or blocks: `text`, `tool_use` (id, name,
input) in assistant turns, `tool_result` (tool_use_id, content a string or text blocks) in user
turns. A user turn's blocks become tool messages and user messages in their order; an assistant turn's
text blocks and tool_use blocks become one assistant message with its calls. `tools` are custom tools,
`{"name", "description", "input_schema"}`; Anthropic's server and client tools (web_search_*, bash_*,
text_editor_*, computer_*, ...) and tools in OpenAI's shape are refused naming the form to use.
`max_tokens` is required, as Anthropic requires it. Everything is converted to the normal-form
messages and chat tools of rollout/agent/protocol.py: the same prompt ids as Chat Completions, with
the same token-exact continuation of earlier calls.

Sampling: `max_tokens`, `stop_sequences`, `temperature`, `top_p`, `top_k` as in
protocol.sampling_params (a temperature other than the rollout's refused naming the key; top_p / top_k
accepted, their sampling mask recorded; Anthropic's current clients take them through `extra_body`). Refused with a 400 naming them:
extended `thinking`, `output_config` (structured output, effort), forcing a named tool (`tool_choice`
`{"type": "tool"}`), a final assistant message (prefill), image / document / thinking blocks,
`mcp_servers`, `container`.

Responses (`message_object`): content blocks `text` and `tool_use` (toolu_... id, name, input);
`stop_reason` end_turn, tool_use (the reply called tools), max_tokens (the token limit), stop_sequence
(with `stop_sequence` the string that matched); usage with `cache_read_input_tokens` = prompt tokens
reused from earlier calls (`input_tokens` the others, as Anthropic counts). `stream_events` gives the
server-sent events of `stream=true`: message_start, per block content_block_start /
content_block_delta (text_delta or input_json_delta) / content_block_stop, message_delta,
message_stop. Errors are Anthropic's error objects (`error_body`).
"""

from __future__ import annotations

import json
from typing import Any

from rollout.agent.protocol import (
    ChatRequest,
    RequestError,
    chat_request,
    new_id,
    normal_message,
    sampling_params,
)
from slime.core.config import RolloutConfig
from slime.core.types import SamplingParams

_UNSUPPORTED_IF_SET = ("mcp_servers", "container")
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large"}


def error_body(e: RequestError) -> dict[str, Any]:
    """Anthropic's error object for a refused request."""
    kind = _ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """Content as a list of blocks (a string is one text block)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content blocks")
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise RequestError(f"{where}.content[{j}] must be an object")
    return content


def _unsupported_block(kind: Any, where: str, allowed: str) -> RequestError:
    return RequestError(
        f"{where}: content block type {kind!r} is not supported by the slime rollout endpoint; {allowed}"
    )


def _block_text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{where}.text must be a string")
    return text


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of text blocks")
    texts = []
    for k, inner in enumerate(content):
        kind = inner.get("type") if isinstance(inner, dict) else None
        if kind != "text":
            raise _unsupported_block(kind, f"{where}.content[{k}]", "tool results hold text blocks")
        texts.append(_block_text(inner, f"{where}.content[{k}]"))
    return "\n".join(texts)


def _user_turn(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """A user turn as tool messages (tool_result blocks) and user messages (runs of text blocks)."""
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        bw = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_block_text(block, bw))
        elif kind == "tool_result":
            if texts:
                out.append(normal_message("user", "\n".join(texts)))
                texts = []
            tool_use_id = block.get("tool_use_id")
            if not isinstance(tool_use_id, str) or not tool_use_id:
                raise RequestError(f"{bw}.tool_use_id must be a non-empty string")
            out.append(normal_message("tool", _tool_result_text(block, bw), tool_call_id=tool_use_id))
        else:
            raise _unsupported_block(kind, bw, "user turns take text and tool_result blocks")
    if texts or not out:
        out.append(normal_message("user", "\n".join(texts)))
    return out


def _assistant_turn(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """An assistant turn (text and tool_use blocks) as one assistant message with its calls."""
    texts: list[str] = []
    calls: list[tuple[str, dict[str, Any]]] = []
    for j, block in enumerate(blocks):
        bw = f"{where}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_block_text(block, bw))
        elif kind == "tool_use":
            name, args = block.get("name"), block.get("input", {})
            if not isinstance(name, str) or not name:
                raise RequestError(f"{bw}.name must be a non-empty string")
            if not isinstance(args, dict):
                raise RequestError(f"{bw}.input must be an object")
            calls.append((name, args))
        else:
            raise _unsupported_block(kind, bw, "assistant turns take text and tool_use blocks")
    return normal_message("assistant", "\n".join(texts), calls)


def parse_conversation(system: Any, raw: Any) -> list[dict[str, Any]]:
    """`system` and `messages` as normal-form messages (see the module docstring)."""
    out: list[dict[str, Any]] = []
    if system is not None and system != "" and system != []:
        if not isinstance(system, str | list):
            raise RequestError("system must be a string or a list of text blocks")
        texts = []
        for j, block in enumerate(_blocks(system, "system")):
            if block.get("type") != "text":
                raise _unsupported_block(block.get("type"), f"system[{j}]", "system takes text blocks")
            texts.append(_block_text(block, f"system[{j}]"))
        out.append(normal_message("system", "\n".join(texts)))
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list")
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object")
        role = m.get("role")
        if role not in ("user", "assistant"):
            raise RequestError(f"{where}.role must be 'user' or 'assistant', got {role!r}")
        blocks = _blocks(m.get("content"), where)
        if role == "user":
            out.extend(_user_turn(blocks, where))
        else:
            out.append(_assistant_turn(blocks, where))
    if raw[-1].get("role") == "assistant":
        raise RequestError(
            f"messages[{len(raw) - 1}]: a final assistant message (prefill) is not supported by the slime "
            "rollout endpoint; end the conversation with a user message"
        )
    return out


def convert_tools(raw: Any) -> list[dict[str, Any]] | None:
    """Anthropic custom tools as OpenAI chat tools (None when there are none); server or client tools,
    and tools in OpenAI's shape, are refused naming the form to use."""
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list):
        raise RequestError("tools must be a list of tools")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where} must be an object")
        kind = tool.get("type")
        if kind == "function" or isinstance(tool.get("function"), dict):
            raise RequestError(
                f"{where} is in OpenAI's shape; Anthropic tools are "
                '{"name": ..., "description": ..., "input_schema": {...}}'
            )
        if kind not in (None, "custom"):
            raise RequestError(
                f"{where}: tool type {kind!r} is not supported by the slime rollout endpoint (it runs no "
                'server or built-in tools): declare it as a custom tool {"name": ..., "description": ..., '
                '"input_schema": {...}} and run it in the agent'
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}.name must be a non-empty string")
        schema = tool.get("input_schema")
        if schema is None:
            raise RequestError(f"{where}.input_schema: Field required")
        if not isinstance(schema, dict):
            raise RequestError(f"{where}.input_schema must be a JSON-schema object")
        fn: dict[str, Any] = {"name": name}
        if tool.get("description"):
            fn["description"] = tool["description"]
        fn["parameters"] = schema
        out.append({"type": "function", "function": fn})
    return out


def _parse_tools_enabled(tool_choice: Any) -> bool:
    """Whether replies are parsed for calls under `tool_choice`; forcing one tool is refused."""
    if tool_choice is None:
        return True
    kind = tool_choice.get("type") if isinstance(tool_choice, dict) else None
    if kind in ("auto", "any"):
        return True
    if kind == "none":
        return False
    raise RequestError(
        "tool_choice must be {'type': 'auto'}, {'type': 'any'} or {'type': 'none'} (the slime rollout "
        "endpoint cannot force a particular tool)"
    )


def parse_messages_request(body: dict[str, Any], count_only: bool = False) -> ChatRequest:
    """Validate a `/v1/messages` body (`count_only`: a `/v1/messages/count_tokens` body, without
    max_tokens). Sampling is checked separately, once the prompt is known."""
    for key in _UNSUPPORTED_IF_SET:
        if body.get(key):
            raise RequestError(f"{key} is not supported by the slime rollout endpoint")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        raise RequestError(
            "thinking is not supported by the slime rollout endpoint (the policy has no thinking mode to "
            "switch on): omit it"
        )
    output_config = body.get("output_config")
    if output_config is not None and not (
        isinstance(output_config, dict) and all(v is None for v in output_config.values())
    ):
        raise RequestError(
            "output_config (structured output, effort) is not supported by the slime rollout endpoint: omit it"
        )
    if not count_only and body.get("max_tokens") is None:
        raise RequestError("max_tokens: Field required")
    messages = parse_conversation(body.get("system"), body.get("messages"))
    enabled = _parse_tools_enabled(body.get("tool_choice"))
    return chat_request(messages, convert_tools(body.get("tools")), parse_tools=enabled)


def sampling(body: dict[str, Any], cfg: RolloutConfig, prompt_len: int) -> SamplingParams:
    """The request's sampling (protocol.sampling_params under the Messages API's key names)."""
    return sampling_params(
        body, cfg, prompt_len, max_keys=("max_tokens",), stop_key="stop_sequences", prompt_param="messages"
    )


def stop_reason(finish_reason: str, has_calls: bool, stop_sequence: str | None) -> str:
    """Anthropic's stop_reason for the engine's finish_reason (see the module docstring)."""
    if finish_reason == "length":
        return "max_tokens"
    if stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if has_calls else "end_turn"


def message_object(
    *,
    model: str,
    content: str,
    calls: list[tuple[str, dict[str, Any]]],
    finish_reason: str,
    stop_sequence: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
) -> dict[str, Any]:
    """The Message of one reply (`content` and `calls` as protocol.parse_reply gives them; the engine's
    `finish_reason`; `stop_sequence` the stop string the reply was cut at, if any)."""
    blocks: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
    blocks += [{"type": "tool_use", "id": new_id("toolu_"), "name": n, "input": a} for n, a in calls]
    reason = stop_reason(finish_reason, bool(calls), stop_sequence)
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": reason,
        "stop_sequence": stop_sequence if reason == "stop_sequence" else None,
        "usage": {
            "input_tokens": prompt_tokens - cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens,
            "output_tokens": completion_tokens,
        },
    }


def stream_events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed message (see the module docstring): each block's text or input as one
    delta. Each event's `type` is also its SSE event name."""
    start = dict(message, content=[], stop_reason=None, stop_sequence=None)
    start["usage"] = dict(message["usage"], output_tokens=0)
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            events.append(
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
            )
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            empty = dict(block, input={})
            events.append({"type": "content_block_start", "index": index, "content_block": empty})
            delta = {
                "type": "input_json_delta",
                "partial_json": json.dumps(block["input"], ensure_ascii=False),
            }
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    events.append(
        {
            "type": "message_delta",
            "delta": stop,
            "usage": {"output_tokens": message["usage"]["output_tokens"]},
        }
    )
    events.append({"type": "message_stop"})
    return events
