"""The tool-call syntax: how a model writes tool calls in its reply text, and how they are read back.

One module for every place that writes or reads calls: the environment contract (`envs.base.Action`),
the chat format (rollout/chat.py, which writes earlier calls into prompts for templates without tool
support) and the OpenAI-compatible endpoint (which turns replies into `tool_calls`).

The format is SmolLM2-Instruct's: a JSON list of calls inside `<tool_call>...</tool_call>`,

    <tool_call>[{"name": "calculator", "arguments": {"expression": "2 + 3"}}]</tool_call>

The parser also reads the Qwen form (one JSON object per block), OpenAI-style call objects
(`{"type": "function", "function": {...}}`), arguments given as a JSON string, and a block wrapped in
a Markdown code fence, so both template families share it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
_CODE_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)

# The system-message block that teaches the syntax to templates that do not render tools themselves.
TOOLS_SYSTEM_PROMPT = """You can call functions (tools) to help you. The available tools are listed as JSON inside <tools></tools>:
<tools>{tools}</tools>

To call tools, reply with a JSON list of calls inside <tool_call></tool_call>, in exactly this format:
<tool_call>[{{"name": "func_name", "arguments": {{"argument1": "value1"}}}}]</tool_call>
Each result comes back to you in a message with role "tool". When you no longer need a tool, answer in plain text without <tool_call>."""

# What the episode loop shows a model whose call could not be parsed.
CALL_FORMAT_HINT = f'{TOOL_CALL_OPEN}[{{"name": "tool_name", "arguments": {{...}}}}]{TOOL_CALL_CLOSE}'


@dataclass
class ToolCall:
    """One tool call parsed from the assistant's text."""

    name: str
    arguments: dict[str, Any]
    id: str = ""


def format_tool_calls(content: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """A reply holding `calls` ((name, arguments) pairs) as text `parse_tool_calls` reads back: the
    content, a newline when there is content, then one `<tool_call>[...]</tool_call>` block."""
    block = json.dumps([{"name": n, "arguments": a} for n, a in calls], ensure_ascii=False)
    sep = "\n" if content else ""
    return f"{content}{sep}{TOOL_CALL_OPEN}{block}{TOOL_CALL_CLOSE}"


def strip_tool_calls(text: str) -> str:
    """The text with `<tool_call>...</tool_call>` blocks (and an unclosed trailing one) removed."""
    text = _TOOL_CALL_BLOCK.sub("", text)
    cut = text.find(TOOL_CALL_OPEN)
    if cut >= 0:
        text = text[:cut]
    return text.strip()


def _parse_call(obj: Any, index: int) -> ToolCall:
    """One call object -> ToolCall; raises ValueError with a short reason."""
    if not isinstance(obj, dict):
        raise ValueError(f"tool call #{index} must be a JSON object with 'name' and 'arguments'")
    if "function" in obj and isinstance(obj["function"], dict):
        # OpenAI style {"type": "function", "function": {"name": ..., "arguments": ...}}.
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"tool call #{index} has no 'name' string")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        # Some models emit arguments as a JSON-encoded string (OpenAI's wire format does).
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call #{index} ({name}): arguments string is not JSON ({e.msg})") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"tool call #{index} ({name}): 'arguments' must be a JSON object")
    return ToolCall(name=name.strip(), arguments=args, id=f"call_{index}")


def parse_tool_calls(text: str) -> tuple[list[ToolCall], str | None]:
    """Parse every `<tool_call>` block in `text`.

    Returns (calls, None) on success, ([], reason) when any block is malformed: unclosed tag, invalid
    JSON, a call without a name, non-object arguments. A block holding `[]` means "no call". Calls get
    ids call_0, call_1, ... in order.
    """
    calls: list[ToolCall] = []
    blocks = _TOOL_CALL_BLOCK.findall(text)
    if text.count(TOOL_CALL_OPEN) > len(blocks):
        return [], f"unclosed {TOOL_CALL_OPEN} (expected {TOOL_CALL_OPEN}[...]{TOOL_CALL_CLOSE})"
    if not blocks and TOOL_CALL_CLOSE in text:
        return [], f"{TOOL_CALL_CLOSE} without {TOOL_CALL_OPEN}"
    for body in blocks:
        body = body.strip()
        fence = _CODE_FENCE.match(body)
        if fence:
            body = fence.group(1)
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            return [], f"invalid JSON in {TOOL_CALL_OPEN}: {e.msg} at char {e.pos}"
        items = obj if isinstance(obj, list) else [obj]
        for item in items:
            try:
                calls.append(_parse_call(item, len(calls)))
            except ValueError as e:
                return [], str(e)
    return calls, None
