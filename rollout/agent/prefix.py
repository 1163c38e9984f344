"""Prompt ids for an agent's request, continuing earlier calls token-exactly where it can.

Agents resend the whole conversation on every call, as text. Re-rendering it would re-tokenise the
model's earlier replies, which can give different ids than the ones generated. So when a chat
request's messages start with an earlier call's messages followed by that call's reply (same content
and tool calls, same tools), the prompt is built the way the env episode loop builds it: the earlier
call's prompt ids + its generated ids (+ the turn-end token if the reply did not end with one) +
`ChatFormat.delta_ids` of the new messages. Completions do the same when the prompt string starts
with an earlier prompt + the text returned for it (recorded only when that text decodes the
generated ids completely: no special token skipped, no stop string cut). Anything else is rendered
from scratch. When several earlier calls match, the longest wins.
"""

from __future__ import annotations

import logging
from typing import Any

from envs.tool_syntax import format_tool_calls
from rollout.agent.protocol import ChatRequest, RequestError
from rollout.agent.session import CallRecord
from rollout.chat import ChatFormat

logger = logging.getLogger(__name__)


def ended_cleanly(chat: ChatFormat, ids: list[int]) -> bool:
    """Whether generated `ids` end the assistant turn with a stop token (not a stop string or a limit)."""
    return bool(ids) and ids[-1] in chat.stop_ids


def template_messages(chat: ChatFormat, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normal-form messages as the chat template wants them. Templates that render tools natively get
    `tool_calls`; the others get the calls as `<tool_call>` text, the format the parser reads back."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if m["tool_calls"]:
            if chat.tools_in_template:
                msg["tool_calls"] = [
                    {"type": "function", "function": {"name": n, "arguments": a}} for n, a in m["tool_calls"]
                ]
            else:
                msg["content"] = format_tool_calls(m["content"], list(m["tool_calls"]))
        if m["role"] == "tool":
            if m["tool_call_id"]:
                msg["tool_call_id"] = m["tool_call_id"]
            if m["name"]:
                msg["name"] = m["name"]
        out.append(msg)
    return out


def _continued_chat_call(calls: list[CallRecord], req: ChatRequest) -> CallRecord | None:
    """The earlier chat call with the most messages whose messages + reply start `req`'s messages."""
    best: CallRecord | None = None
    for rec in calls:
        k = len(rec.messages)
        if (
            rec.kind == "chat"
            and rec.tools_key == req.tools_key
            and rec.reply is not None
            and len(req.canon) > k
            and req.canon[:k] == rec.messages
            and req.canon[k] == rec.reply
            and (best is None or k > len(best.messages))
        ):
            best = rec
    return best


def chat_prompt(chat: ChatFormat, calls: list[CallRecord], req: ChatRequest) -> tuple[list[int], int]:
    """(prompt ids, reused prefix length) for a chat request: continue the longest matching earlier
    call, else render from scratch. RequestError when the template cannot render the messages."""
    best = _continued_chat_call(calls, req)
    if best is not None:
        prefix = best.prompt_ids + best.completion_ids
        if not ended_cleanly(chat, best.completion_ids):
            # The reply stopped on a stop string or length: close the turn as the template does.
            prefix = prefix + [chat.turn_end_id]
        new = req.messages[len(best.messages) + 1 :]
        try:
            delta = chat.delta_ids(template_messages(chat, new))
        except ValueError:
            logger.debug("delta rendering failed; rendering the conversation from scratch", exc_info=True)
        else:
            return prefix + delta, len(best.prompt_ids) + len(best.completion_ids)
    try:
        return chat.initial_prompt_ids(template_messages(chat, req.messages), req.tools), 0
    except Exception as e:
        raise RequestError(f"cannot render the messages with the chat template: {e}", param="messages") from e


def completion_prompt(
    chat: ChatFormat, calls: list[CallRecord], prompt: Any
) -> tuple[list[int], int, str | None]:
    """(prompt ids, reused prefix length, prompt text or None for token-id prompts) for a completion
    request's `prompt`: a string (continuing an earlier completion where it can) or a list of token ids
    (used exactly). RequestError for anything else or ids outside the vocabulary."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise RequestError(
                "prompt must be a string or a non-empty list of token ids (one prompt)", param="prompt"
            )
        vocab = len(chat.tokenizer)
        if max(prompt) >= vocab:
            raise RequestError(
                f"prompt token id {max(prompt)} is outside the vocabulary ({vocab})", param="prompt"
            )
        return list(prompt), 0, None
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt must be a non-empty string or a list of token ids", param="prompt")
    best: CallRecord | None = None
    for rec in calls:
        cont = rec.continuation_text
        if (
            rec.kind == "completion"
            and cont is not None
            and prompt.startswith(cont)
            and (best is None or len(cont) > len(best.continuation_text or ""))
        ):
            best = rec
    if best is not None and best.continuation_text is not None:
        rest = prompt[len(best.continuation_text) :]
        prefix = best.prompt_ids + best.completion_ids
        suffix = chat.tokenizer.encode(rest, add_special_tokens=False) if rest else []
        return prefix + list(suffix), len(prefix), prompt
    return list(chat.tokenizer.encode(prompt)), 0, prompt
