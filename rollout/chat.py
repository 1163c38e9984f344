"""Chat formatting for token-in/token-out episodes: prompts, per-turn deltas, tool-call parsing.

Token-exact multi-turn rollouts never re-tokenise what the model generated. The first prompt is the
chat template rendered once; after that, each assistant turn is kept exactly as the engine produced it
(ending with the turn-end token, `<|im_end|>` for SmolLM2) and only the *new* messages (tool results,
user feedback) are tokenised, as the template's suffix for them plus the next generation prompt.

Tools: when the tokenizer's chat template renders `tools` itself, it is used as is. Templates that
ignore tools (SmolLM2's) get them in the system message in the format SmolLM2-Instruct was trained
with: a JSON list of function schemas inside `<tools>...</tools>`, and calls written in the syntax of
envs/tool_syntax.py (which also parses replies, for both template families).
"""

from __future__ import annotations

import json
from typing import Any

from envs.base import Action
from envs.tool_syntax import TOOLS_SYSTEM_PROMPT, format_tool_calls, parse_tool_calls
from slime.core.types import Message

# Base conversation for delta rendering: the assistant turn the delta is appended after.
_BASE_CONVERSATION: list[Message] = [
    {"role": "user", "content": "Hi."},
    {"role": "assistant", "content": "Hello."},
]


class ChatFormat:
    """Token-level chat formatting for one tokenizer (see the module docstring).

    Contracts:
    - `initial_prompt_ids(messages, tools)`: the chat template's tokens for `messages` plus the
      generation prompt, tools rendered by the template or into the system message.
    - `delta_ids(messages)`: tokens to append after an assistant turn that ended with the turn-end
      token (`turn_end_id`), so that prompt + turns + deltas equals the template's rendering of the
      whole conversation, up to the generation prompt for the next assistant turn.
    - `parse_action(text)`: the assistant reply as an Action (tool calls parsed; `malformed` set with
      a reason when a call cannot be parsed).
    """

    def __init__(
        self, tokenizer: Any, turn_end_token: str | None = None, tools_in_template: bool | None = None
    ):
        self.tokenizer = tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template"
            )
        self.turn_end_token: str = turn_end_token or tokenizer.eos_token
        ids = tokenizer.encode(self.turn_end_token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"turn-end token {self.turn_end_token!r} is not a single token: {ids}")
        self.turn_end_id: int = ids[0]
        # Any of these ends an assistant turn cleanly (the engine stops on EOS).
        self.stop_ids: set[int] = {self.turn_end_id}
        if tokenizer.eos_token_id is not None:
            self.stop_ids.add(int(tokenizer.eos_token_id))
        self.tools_in_template = (
            self._template_renders_tools() if tools_in_template is None else tools_in_template
        )
        self._delta_prefix = self._base_prefix()

    # ----------------------------------------------------------------------------------- rendering
    def _render(
        self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None = None
    ) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def _encode(self, text: str) -> list[int]:
        # The rendered text already holds every special token the template wants (BOS included).
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _template_renders_tools(self) -> bool:
        probe = [{"role": "user", "content": "Hi."}]
        tool = {"type": "function", "function": {"name": "probe_tool_x", "description": "", "parameters": {}}}
        try:
            with_tools = self._render(probe, False, [tool])
        except Exception:
            return False
        return with_tools != self._render(probe, False)

    def _base_prefix(self) -> str:
        base = self._render(_BASE_CONVERSATION, add_generation_prompt=False)
        cut = base.rfind(self.turn_end_token)
        if cut < 0:
            raise ValueError(
                f"the chat template does not end assistant turns with {self.turn_end_token!r}; "
                "pass turn_end_token= to ChatFormat"
            )
        return base[: cut + len(self.turn_end_token)]

    def with_tools(self, messages: list[Message], tools: list[dict] | None) -> list[Message]:
        """Messages ready for a template that does not render tools: the tool block merged into the
        system message, and assistant messages' OpenAI-style `tool_calls` written into their content
        as `<tool_call>` text (environments may show worked examples that way). Templates that render
        tools get the messages unchanged. Returns a copy; the input is not modified."""
        messages = [dict(m) for m in messages]
        if self.tools_in_template:
            return messages
        for m in messages:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = []
                for tc in m.pop("tool_calls"):
                    fn = tc.get("function", tc)
                    args = fn.get("arguments", {})
                    calls.append((fn["name"], json.loads(args) if isinstance(args, str) else args))
                m["content"] = format_tool_calls(m.get("content") or "", calls)
        if not tools:
            return messages
        specs = [t.get("function", t) for t in tools]
        block = TOOLS_SYSTEM_PROMPT.format(tools=json.dumps(specs, ensure_ascii=False))
        if messages and messages[0].get("role") == "system":
            messages[0]["content"] = f"{messages[0]['content'].rstrip()}\n\n{block}"
        else:
            messages.insert(0, {"role": "system", "content": block})
        return messages

    def prompt_text(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        """The rendered first prompt (with the generation prompt)."""
        native = tools if self.tools_in_template else None
        return self._render(self.with_tools(messages, tools), add_generation_prompt=True, tools=native)

    def initial_prompt_ids(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the first prompt: `messages` (+ tools) and the assistant generation prompt."""
        if not messages:
            raise ValueError("initial_prompt_ids needs at least one message")
        return self._encode(self.prompt_text(messages, tools))

    def delta_text(self, messages: list[Message]) -> str:
        """Text appended after an assistant turn's turn-end token: `messages` as the template renders
        them after an assistant turn, then the next generation prompt. Computed as the suffix of the
        base conversation rendered with the new messages, past the base's final turn-end token."""
        full = self._render(_BASE_CONVERSATION + [dict(m) for m in messages], add_generation_prompt=True)
        if not full.startswith(self._delta_prefix):
            raise ValueError(
                "the chat template renders earlier turns differently once new messages follow; "
                "token-exact deltas are not possible with it"
            )
        return full[len(self._delta_prefix) :]

    def delta_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of `delta_text(messages)` (see the class docstring)."""
        return self._encode(self.delta_text(messages))

    # ------------------------------------------------------------------------------------- parsing
    def decode(self, token_ids: list[int]) -> str:
        """Generated ids -> reply text, special tokens (the turn-end token) removed."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def parse_action(self, text: str) -> Action:
        """Parse one assistant reply. Tool calls get ids call_0, call_1, ... in order."""
        calls, error = parse_tool_calls(text)
        return Action(content=text, tool_calls=calls, malformed=error)
