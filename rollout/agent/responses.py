"""The OpenAI Responses API wire format (`POST /responses`) as pure functions (no server, no engine).

Requests (`parse_responses_request`): `input` is a string (one user message) or a list of items:
messages (role user / assistant / system / developer, content a string or `input_text` /
`output_text` parts), `function_call` items (name, arguments as a JSON string, call_id) and
`function_call_output` items (call_id, output). `instructions` becomes the first (system) message.
`previous_response_id` continues a response of the same episode: its conversation (input and reply;
not its instructions, as OpenAI does) comes before this request's input. `tools` are function tools,
`{"type": "function", "name", "description", "parameters"}`; any other tool type (web_search,
file_search, computer_use, mcp, custom, ...) is refused naming the form to use. Everything is
converted to the normal-form messages and chat tools of rollout/agent/protocol.py, so a Responses
conversation gets exactly the prompt ids a Chat Completions one would, with the same token-exact
continuation of earlier calls.

Sampling: `max_output_tokens`, `temperature`, `top_p` as in protocol.sampling_params (capped by the
rollout config; a temperature other than the rollout's refused naming the key; top_p / top_k
accepted, their sampling mask recorded).
Options the endpoint cannot honour get a 400 naming them: structured output (`text.format`),
`reasoning`, `background`, `conversation`, stored `prompt`s, `max_tool_calls`, forcing a named tool.

Responses (`response_object`): output items `message` (one `output_text` part; its `logprobs` with
`include=["message.output_text.logprobs"]`, one entry per generated token) and `function_call`
(`call_id`, `name`, `arguments` as a JSON string); status `completed`, or `incomplete` with
`incomplete_details.reason = "max_output_tokens"` at the token limit. `stream_events` gives the event
stream of `stream=true`: response.created, response.in_progress, per output item
output_item.added / content_part.added / output_text.delta / output_text.done / content_part.done /
output_item.done (function calls: function_call_arguments.delta / .done), then response.completed
(response.incomplete when incomplete). Errors are OpenAI's error objects (`RequestError.body`).
"""

from __future__ import annotations

import json
import time
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

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = {"input_text", "output_text", "text"}
# Options that change what is generated and that the endpoint cannot honour: (neutral values).
_UNSUPPORTED_IF_SET: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "conversation": (None,),
    "prompt": (None,),
    "max_tool_calls": (None,),
}


def _text(content: Any, where: str) -> str:
    """Message content (a string or text parts) as one string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"{where}.content[{j}]: content part type {kind!r} is not supported by the slime rollout "
                    "endpoint; only text parts (input_text, output_text) are",
                    param=f"{where}.content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _arguments(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RequestError(
                f"{where}.arguments is not JSON ({e.msg})", param=f"{where}.arguments"
            ) from None
    if not isinstance(raw, dict):
        raise RequestError(f"{where}.arguments must be a JSON object", param=f"{where}.arguments")
    return raw


def parse_input(raw: Any) -> list[dict[str, Any]]:
    """`input` (a string or a list of items) as normal-form messages. A `function_call` item joins the
    assistant message right before it (a reply's text and calls are one assistant turn), or starts one;
    a `function_call_output` item is a tool message answering `call_id`."""
    if isinstance(raw, str):
        if not raw:
            raise RequestError("input must not be empty", param="input")
        return [normal_message("user", raw)]
    if not isinstance(raw, list) or not raw:
        raise RequestError("input must be a string or a non-empty list of items", param="input")
    out: list[dict[str, Any]] = []
    calls_may_join = False  # the last message is an assistant turn that function calls may extend
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise RequestError(f"{where} must be an object", param=where)
        kind = item.get("type")
        if kind in (None, "message"):
            role = item.get("role")
            if role not in _ROLES:
                raise RequestError(
                    f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role"
                )
            out.append(normal_message(_ROLES[role], _text(item.get("content"), where)))
            calls_may_join = role == "assistant"
        elif kind == "function_call":
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise RequestError(f"{where}.name must be a non-empty string", param=f"{where}.name")
            call = (name, _arguments(item.get("arguments"), where))
            if calls_may_join:
                out[-1]["tool_calls"].append(call)
            else:
                out.append(normal_message("assistant", "", [call]))
                calls_may_join = True
        elif kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else _text(output, where)
            out.append(normal_message("tool", text, tool_call_id=str(item.get("call_id") or "")))
            calls_may_join = False
        else:
            raise RequestError(
                f"{where}: input item type {kind!r} is not supported by the slime rollout endpoint; it takes "
                "messages, function_call and function_call_output items",
                param=where,
            )
    return out


def convert_tools(raw: Any) -> list[dict[str, Any]] | None:
    """Responses function tools as OpenAI chat tools (None when there are none); any other tool type,
    or a tool in the Chat Completions shape, is refused naming the form to use."""
    if raw is None or raw == []:
        return None
    if not isinstance(raw, list):
        raise RequestError("tools must be a list of function tools", param="tools")
    out = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise RequestError(f"{where} must be an object", param=where)
        kind = tool.get("type")
        if kind != "function":
            raise RequestError(
                f"{where}: tool type {kind!r} is not supported by the slime rollout endpoint: declare the tool "
                'as a function tool {"type": "function", "name": ..., "parameters": {...}} and run it in '
                "the agent",
                param=where,
            )
        if "name" not in tool and isinstance(tool.get("function"), dict):
            raise RequestError(
                f"{where} is in the Chat Completions shape; the Responses API takes the name, description "
                'and parameters at the top level: {"type": "function", "name": ..., "parameters": {...}}',
                param=where,
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}.name must be a non-empty string", param=f"{where}.name")
        params = tool.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise RequestError(
                f"{where}.parameters must be a JSON-schema object", param=f"{where}.parameters"
            )
        fn: dict[str, Any] = {"name": name}
        if tool.get("description"):
            fn["description"] = tool["description"]
        fn["parameters"] = params if params is not None else {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, neutral in _UNSUPPORTED_IF_SET.items():
        if body.get(key) not in neutral:
            raise RequestError(f"{key} is not supported by the slime rollout endpoint", param=key)
    reasoning = body.get("reasoning")
    if reasoning is not None and not (
        isinstance(reasoning, dict) and all(v is None for v in reasoning.values())
    ):
        raise RequestError(
            "reasoning is not supported by the slime rollout endpoint (the policy has no reasoning "
            "settings to choose): omit it",
            param="reasoning",
        )
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError(
            "text.format other than {'type': 'text'} (structured output) is not supported by the slime "
            "rollout endpoint",
            param="text.format",
        )
    if isinstance(text, dict) and text.get("verbosity") is not None:
        raise RequestError("text.verbosity is not supported by the slime rollout endpoint", param="text")


def parse_responses_request(
    body: dict[str, Any], conversations: dict[str, list[dict[str, Any]]]
) -> tuple[ChatRequest, list[dict[str, Any]]]:
    """Validate a `/responses` body; returns (the chat request to generate for, the conversation to
    keep for a later `previous_response_id`: the earlier one, then this input, without instructions).
    `conversations` are the episode's earlier responses' (see the module docstring)."""
    _check_unsupported(body)
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if previous not in conversations:
            raise RequestError(
                f"previous_response_id {previous!r} is not a response of this episode",
                param="previous_response_id",
            )
        history = [dict(m, tool_calls=list(m["tool_calls"])) for m in conversations[previous]]
    conversation = history + parse_input(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("instructions must be a string", param="instructions")
    messages = ([normal_message("system", instructions)] if instructions else []) + conversation
    tool_choice = body.get("tool_choice")
    if isinstance(tool_choice, dict) or tool_choice not in (None, "auto", "none", "required"):
        raise RequestError(
            "tool_choice must be 'auto', 'none' or 'required' (the slime rollout endpoint cannot force a "
            "particular tool)",
            param="tool_choice",
        )
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise RequestError("top_logprobs must be an integer in [0, 20]", param="top_logprobs")
    req = chat_request(messages, convert_tools(body.get("tools")), parse_tools=tool_choice != "none")
    return req, conversation


def sampling(body: dict[str, Any], cfg: RolloutConfig, prompt_len: int) -> SamplingParams:
    """The request's sampling (protocol.sampling_params under the Responses API's key names)."""
    return sampling_params(body, cfg, prompt_len, max_keys=("max_output_tokens",), prompt_param="input")


def wants_logprobs(body: dict[str, Any]) -> bool:
    include = body.get("include") or []
    return isinstance(include, list) and LOGPROBS_INCLUDE in include


def response_object(
    *,
    model: str,
    body: dict[str, Any],
    content: str,
    calls: list[tuple[str, dict[str, Any]]],
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The Response object of one reply (`content` and `calls` as protocol.parse_reply gives them, the
    engine's `finish_reason`, token counts; `cached_tokens`: the prompt ids reused from earlier calls).
    Fresh ids: resp_..., msg_..., fc_... items with call_... call ids."""
    status = "completed" if finish_reason == "stop" else "incomplete"
    incomplete = {"reason": "max_output_tokens" if finish_reason == "length" else None}
    return {
        "id": new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": incomplete if status == "incomplete" else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output_items(content, calls, status, logprobs),
        "parallel_tool_calls": body.get("parallel_tool_calls", True) is not False,
        "previous_response_id": body.get("previous_response_id"),
        "temperature": body.get("temperature"),
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": list(body.get("tools") or []),
        "top_p": body.get("top_p"),
        "truncation": body.get("truncation") or "disabled",
        "metadata": body.get("metadata") or {},
        "usage": {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def output_items(
    content: str, calls: list[tuple[str, dict[str, Any]]], status: str, logprobs: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The reply as output items: a `message` with one output_text part (unless the reply is only
    calls), then one `function_call` per call."""
    items: list[dict[str, Any]] = []
    if content or not calls:
        part: dict[str, Any] = {"type": "output_text", "text": content, "annotations": []}
        if logprobs is not None:
            part["logprobs"] = logprobs
        message = {"id": new_id("msg_"), "type": "message", "role": "assistant", "status": status}
        items.append(message | {"content": [part]})
    for name, args in calls:
        items.append(
            {
                "id": new_id("fc_"),
                "type": "function_call",
                "call_id": new_id("call_"),
                "name": name,
                "arguments": json.dumps(args, ensure_ascii=False),
                "status": "completed",
            }
        )
    return items


def stream_events(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The events of a streamed response, numbered by `sequence_number` (see the module docstring): the
    finished reply, each item's text or arguments as one delta."""
    events: list[dict[str, Any]] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append({"type": kind, "sequence_number": len(events), **fields})

    start = dict(response, status="in_progress", output=[], usage=None, incomplete_details=None)
    emit("response.created", response=start)
    emit("response.in_progress", response=start)
    for index, item in enumerate(response["output"]):
        head = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            emit(
                "response.output_item.added",
                output_index=index,
                item=dict(item, status="in_progress", content=[]),
            )
            part = item["content"][0]
            lp = part.get("logprobs") or []
            empty = {"type": "output_text", "text": "", "annotations": []}
            emit("response.content_part.added", **head, content_index=0, part=empty)
            if part["text"]:
                emit("response.output_text.delta", **head, content_index=0, delta=part["text"], logprobs=lp)
            emit("response.output_text.done", **head, content_index=0, text=part["text"], logprobs=lp)
            emit("response.content_part.done", **head, content_index=0, part=part)
        else:
            emit(
                "response.output_item.added",
                output_index=index,
                item=dict(item, status="in_progress", arguments=""),
            )
            emit("response.function_call_arguments.delta", **head, delta=item["arguments"])
            emit(
                "response.function_call_arguments.done",
                **head,
                name=item["name"],
                arguments=item["arguments"],
            )
        emit("response.output_item.done", output_index=index, item=item)
    final = "response.completed" if response["status"] == "completed" else "response.incomplete"
    emit(final, response=response)
    return events
