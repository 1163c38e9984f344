"""The OpenAI Chat Completions / Completions wire format of the agent endpoint, and what every API's
wire format shares (rollout/agent/responses.py, messages.py), as pure functions (no server, no engine).

Shared: `normal_message` / `parse_messages` (the normal form every API's messages become), `canon`,
`chat_request` (normal-form messages + chat tools -> the `ChatRequest` the prompt is built from),
`sampling_params` (under each API's key names), `parse_reply` (a reply's content and tool calls),
`stop_match` / `cut_at_stop`, `RequestError`, `new_id`.

Requests: `parse_chat_request` / `parse_completion_request` validate a JSON body and return what the
server needs; anything the endpoint cannot honour raises `RequestError` naming the option (it becomes
an OpenAI-style error response). Sampling (`sampling_params`): temperature, top_p, top_k, seed, stop
and max_tokens / max_completion_tokens come from the request (temperature, top_p and top_k default to
the rollout config's; a request that sets another temperature is refused: the trainer scores every
token at the rollout's temperature, so other tokens would train a policy that never produced them;
top_p and top_k are free: the engine records each token's sampling mask and the trainer scores it under
the same truncation); max_tokens is capped by `rollout.max_tokens_per_turn` and by what is left of
`rollout.max_total_tokens` after the prompt; a prompt that leaves no room is rejected (400, code
`context_length_exceeded`). Only n=1. Options that would change the output and that the endpoint
cannot honour (penalties, logit_bias, n>1, echo, best_of, structured output, forcing a named tool)
get a 400 naming the option.

Responses: `response_envelope` is the one envelope of both routes (id, object, created, model,
choices, usage, and with `return_token_ids=true` the vLLM extension `prompt_token_ids` plus each
choice's `token_ids`). `stream_chunks` turns an envelope into the chunks of `stream=true`: the
finished reply as one chunk, then the finish chunk, then (with `stream_options.include_usage`) the
usage chunk. Logprobs are the engine's; with `top_logprobs` / `logprobs=k` only the sampled token is
listed.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from envs.base import check_tools
from envs.tool_syntax import parse_tool_calls, strip_tool_calls
from rollout.agent.session import CanonMessage
from slime.core.config import RolloutConfig
from slime.core.types import SamplingParams

_ROLES = {"system", "developer", "user", "assistant", "tool"}
# Request options that change what is generated and that this server cannot honour: rejected, not ignored.
_UNSUPPORTED_IF_SET = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "functions": None,
    "function_call": None,
    "audio": None,
    "prediction": None,
    "suffix": None,
}
# kind -> (id prefix, object, streamed chunk object)
_OBJECTS = {
    "chat": ("chatcmpl", "chat.completion", "chat.completion.chunk"),
    "completion": ("cmpl", "text_completion", "text_completion"),
}


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------ requests


@dataclass
class ChatRequest:
    """A validated chat request: messages in normal form (see `parse_messages`) and their canonical
    form, the tools (None when absent) and their matching key, and whether replies are parsed for calls."""

    messages: list[dict[str, Any]]
    canon: tuple[CanonMessage, ...]
    tools: list[dict[str, Any]] | None
    tools_key: str
    parse_tools: bool


def _text_content(content: Any, where: str) -> str:
    """OpenAI message content (None, a string, or text parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"{where}.content[{j}]: only text parts are supported", param=f"{where}.content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(
        f"{where}.content must be a string, a list of text parts or null", param=f"{where}.content"
    )


def _tool_call_arguments(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RequestError(f"{where}.function.arguments is not JSON ({e.msg})", param=where) from None
    if not isinstance(raw, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object", param=where)
    return raw


def parse_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate request messages into a normal form: role, content (str), tool_calls as
    [(name, arguments dict)], tool_call_id, name. Raises RequestError naming the message."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role"
            )
        calls: list[tuple[str, dict[str, Any]]] = []
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise RequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            for j, tc in enumerate(m["tool_calls"]):
                cw = f"{where}.tool_calls[{j}]"
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise RequestError(f"{cw} needs function.name", param=cw)
                calls.append((fn["name"], _tool_call_arguments(fn.get("arguments"), cw)))
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _text_content(m.get("content"), where),
                "tool_calls": calls,
                "tool_call_id": str(m.get("tool_call_id") or ""),
                "name": str(m.get("name") or ""),
            }
        )
    return out


def canon(m: dict[str, Any]) -> CanonMessage:
    """A normal-form message as a comparable tuple (what "the same message" means for prefix reuse)."""
    # Whitespace around content and tool-call ids are not significant for "is this the same message".
    calls = tuple((name, json.dumps(args, sort_keys=True)) for name, args in m["tool_calls"])
    return (m["role"], m["content"].strip(), calls, m["tool_call_id"], m["name"])


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, neutral in _UNSUPPORTED_IF_SET.items():
        value = body.get(key)
        if value is not None and value != neutral and value != {}:
            raise RequestError(f"{key} is not supported by the slime rollout endpoint", param=key)
    if int(body.get("n") or 1) != 1:
        raise RequestError("only n=1 is supported (run the agent several times for a group)", param="n")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format other than text is not supported", param="response_format")


def normal_message(
    role: str,
    content: str,
    tool_calls: list[tuple[str, dict[str, Any]]] | None = None,
    tool_call_id: str = "",
    name: str = "",
) -> dict[str, Any]:
    """A message in the normal form of `parse_messages` (what every API's messages are converted to)."""
    return {
        "role": role,
        "content": content,
        "tool_calls": list(tool_calls or []),
        "tool_call_id": tool_call_id,
        "name": name,
    }


def chat_request(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, parse_tools: bool
) -> ChatRequest:
    """The ChatRequest of normal-form `messages` and OpenAI chat `tools` (checked here; None when
    absent). Every API's requests meet here: the same messages and tools give the same prompt ids."""
    if tools is not None:
        try:
            check_tools(tools, owner="tools")
        except (TypeError, ValueError) as e:
            raise RequestError(str(e), param="tools") from None
    return ChatRequest(
        messages=messages,
        canon=tuple(canon(m) for m in messages),
        tools=tools,
        tools_key=json.dumps(tools, sort_keys=True) if tools else "",
        parse_tools=tools is not None and parse_tools,
    )


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a `/chat/completions` body (sampling is checked separately, once the prompt is known)."""
    _check_unsupported(body)
    messages = parse_messages(body.get("messages"))
    tool_choice = body.get("tool_choice")
    if isinstance(tool_choice, dict) or tool_choice not in (None, "auto", "none", "required"):
        # The model cannot be forced to call one particular tool here.
        raise RequestError("tool_choice must be 'auto', 'none' or 'required'", param="tool_choice")
    return chat_request(messages, body.get("tools") or None, parse_tools=tool_choice != "none")


def parse_completion_request(body: dict[str, Any]) -> Any:
    """Validate a `/completions` body; returns its `prompt` (checked further by the prompt builder)."""
    _check_unsupported(body)
    if body.get("echo"):
        raise RequestError("echo is not supported", param="echo")
    if int(body.get("best_of") or 1) != 1:
        raise RequestError("best_of is not supported", param="best_of")
    return body.get("prompt")


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{key} must be a number", param=key)
    if not lo <= value <= hi:
        raise RequestError(f"{key} must be in [{lo}, {hi}], got {value}", param=key)
    return float(value)


def _stop_list(body: dict[str, Any], key: str = "stop") -> list[str]:
    stop = body.get(key)
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise RequestError(f"{key} must be a string or a list of strings", param=key)


def sampling_params(
    body: dict[str, Any],
    cfg: RolloutConfig,
    prompt_len: int,
    *,
    max_keys: tuple[str, ...] = ("max_completion_tokens", "max_tokens"),
    stop_key: str = "stop",
    prompt_param: str = "messages",
) -> SamplingParams:
    """Request sampling options, max_tokens capped by the rollout config (see the module docstring).

    The keys are Chat Completions' by default; the other APIs name theirs: `max_keys` (the first one
    set wins), `stop_key`, and `prompt_param` (what a prompt that leaves no room is reported against)."""
    limit = min(cfg.max_tokens_per_turn, cfg.max_total_tokens - prompt_len)
    if limit <= 0:
        raise RequestError(
            f"the prompt has {prompt_len} tokens; rollout.max_total_tokens={cfg.max_total_tokens} leaves no "
            "room to generate",
            param=prompt_param,
            code="context_length_exceeded",
        )
    key = next((k for k in max_keys if body.get(k) is not None), max_keys[-1])
    requested = body.get(key)
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise RequestError(f"{key} must be a positive integer", param=key)
        limit = min(limit, requested)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("seed must be an integer", param="seed")
    top_k = body.get("top_k", -1)
    if top_k is None:
        top_k = -1
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise RequestError("top_k must be an integer", param="top_k")
    temperature = _number(body, "temperature", cfg.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", cfg.top_p, 1e-6, 1.0)
    if "top_k" not in body or body.get("top_k") is None:
        top_k = cfg.top_k or -1
    _require_trainable(temperature, top_p, top_k, cfg)
    return SamplingParams(
        max_tokens=limit,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=_stop_list(body, stop_key),
        seed=seed,
    )


def _require_trainable(temperature: float, top_p: float, top_k: int, cfg: RolloutConfig) -> None:
    """The trainer scores every generated token under softmax(logits / rollout.temperature): tokens an
    agent sampled at another temperature would get importance weights and a mismatch metric for a
    policy that never produced them, so such requests are refused, naming the fix. top_p and top_k are
    the agent's to choose: the engine records each token's sampling mask and the trainer scores the
    token under the same truncation (docs/algorithms.md, "Keep the sampling mask")."""
    if not math.isclose(temperature, cfg.temperature, rel_tol=0.0, abs_tol=1e-9):
        raise RequestError(
            f"temperature={temperature} differs from rollout.temperature={cfg.temperature}, the sampling the "
            f"trainer scores tokens under: omit temperature in the agent's requests, or set "
            f"rollout.temperature={temperature}",
            param="temperature",
        )
    if top_k < -1:
        raise RequestError(f"top_k must be -1, 0 (off) or positive, got {top_k}", param="top_k")


# ------------------------------------------------------------------------------ responses


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether it was cut."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_match(text: str, stop: list[str]) -> str | None:
    """The stop string that occurs first in `text` (what `cut_at_stop` cuts at), or None."""
    found = [(i, s) for s in stop if (i := text.find(s)) >= 0]
    return min(found)[1] if found else None


def parse_reply(text: str, parse_tools: bool) -> tuple[str, list[tuple[str, dict[str, Any]]], bool]:
    """A reply `text` as (content, calls, malformed), the same for every API.

    With `parse_tools`, `<tool_call>` blocks become calls ((name, arguments) pairs) and are removed from
    the content. A reply whose tool call cannot be parsed stays plain text with malformed=True, as vLLM
    does. Without calls the content is the text unchanged.
    """
    if not parse_tools:
        return text, [], False
    calls, problem = parse_tool_calls(text)
    if problem is not None:
        return text, [], True
    if not calls:
        return text, [], False
    return strip_tool_calls(text), [(c.name, c.arguments) for c in calls], False


def assistant_message(
    text: str, parse_tools: bool
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], bool]:
    """The OpenAI assistant message for a reply `text`: (message, parsed calls, malformed).

    Calls (see `parse_reply`) become `tool_calls` (fresh ids, arguments as JSON strings) and the
    content is None when nothing else is left.
    """
    content, parsed, malformed = parse_reply(text, parse_tools)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if not parsed:
        return message, [], malformed
    message["content"] = content or None
    message["tool_calls"] = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for name, args in parsed
    ]
    return message, parsed, False


def new_id(prefix: str) -> str:
    """A fresh object id, `prefix` + 24 hex digits (call_..., resp_..., msg_..., toolu_...)."""
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def chat_logprobs(token_texts: list[str], logprobs: list[float], top: int) -> list[dict[str, Any]]:
    """`choices[0].logprobs.content` of a chat response (token_texts: each generated token's text)."""
    entries = []
    for text, lp in zip(token_texts, logprobs, strict=True):
        entry: dict[str, Any] = {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        # Only the sampled token's logprob is known: it stands in for the top list.
        entry["top_logprobs"] = [dict(entry)] if top > 0 else []
        entries.append(entry)
    return entries


def completion_logprobs(token_texts: list[str], logprobs: list[float], top: int) -> dict[str, Any]:
    """`choices[0].logprobs` of a completion response (token_texts: each generated token's text)."""
    offsets, pos = [], 0
    for t in token_texts:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": list(token_texts),
        "token_logprobs": list(logprobs),
        "top_logprobs": [{t: lp} for t, lp in zip(token_texts, logprobs, strict=True)] if top > 0 else None,
        "text_offset": offsets,
    }


def response_envelope(
    kind: str,
    model: str,
    choice: dict[str, Any],
    prompt_ids: list[int],
    completion_ids: list[int],
    body: dict[str, Any],
) -> dict[str, Any]:
    """The response object of either route (`kind` "chat" | "completion") around its one `choice`."""
    id_prefix, obj, _ = _OBJECTS[kind]
    p, c = len(prompt_ids), len(completion_ids)
    response: dict[str, Any] = {
        "id": f"{id_prefix}-{uuid.uuid4().hex}",
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    }
    if body.get("return_token_ids"):
        response["prompt_token_ids"] = list(prompt_ids)
        choice["token_ids"] = list(completion_ids)
    return response


def stream_chunks(kind: str, response: dict[str, Any], body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed response: the whole reply, the finish reason, and (when asked) usage."""
    choice = response["choices"][0]
    head = {k: response[k] for k in ("id", "created", "model")} | {"object": _OBJECTS[kind][2]}
    if kind == "chat":
        delta = dict(choice["message"])
        if "tool_calls" in delta:
            delta["tool_calls"] = [dict(tc, index=i) for i, tc in enumerate(delta["tool_calls"])]
        first = {"index": 0, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None}
        last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
    else:
        first = dict(choice, finish_reason=None)
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]}
    chunks = [head | {"choices": [first]}, head | {"choices": [last]}]
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(head | {"choices": [], "usage": response["usage"]})
    return chunks


def models_list(model: str, max_model_len: int) -> dict[str, Any]:
    """The `/models` response: the one served model."""
    return {
        "object": "list",
        "data": [
            {
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": "slime",
                "max_model_len": max_model_len,
            }
        ],
    }
