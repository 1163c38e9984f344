"""rollout/chat.py against the real SmolLM2 tokenizer: prompts, token-exact deltas, tool-call parsing."""

from __future__ import annotations

import copy
import json
import re

import pytest

from envs.calculator import CALCULATOR_TOOL
from rollout.chat import ChatFormat, parse_tool_calls, strip_tool_calls

# A Qwen2.5-style template: renders `tools` itself and groups consecutive tool results into one user
# turn, so a tool message renders differently depending on its neighbours (a hard case for deltas).
QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "\n\n{% endif %}# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "\n<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture(scope="module")
def qwen_chat(tokenizer) -> ChatFormat:
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN_LIKE_TEMPLATE
    return ChatFormat(tok)


def _assistant_ids(chat: ChatFormat, text: str) -> list[int]:
    """What an engine would return for a reply: its tokens plus the turn-end token."""
    return chat.tokenizer.encode(text, add_special_tokens=False) + [chat.turn_end_id]


def _rebuild(chat: ChatFormat, conversation: list[dict], tools=None) -> list[int]:
    """Build a conversation the episode-loop way: first prompt, then (assistant ids, delta) pairs."""
    first_assistant = next(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    ids = chat.initial_prompt_ids(conversation[:first_assistant], tools)
    i = first_assistant
    while i < len(conversation):
        assert conversation[i]["role"] == "assistant"
        ids += _assistant_ids(chat, conversation[i]["content"])
        j = i + 1
        while j < len(conversation) and conversation[j]["role"] != "assistant":
            j += 1
        ids += chat.delta_ids(conversation[i + 1 : j])
        i = j
    return ids


CONVERSATIONS = [
    [  # tool results, then a user follow-up
        {"role": "user", "content": "What is 12 * 7 + 5?"},
        {
            "role": "assistant",
            "content": '<tool_call>[{"name": "calculator", "arguments": {"expression": "12*7+5"}}]</tool_call>',
        },
        {"role": "tool", "content": "89"},
        {"role": "assistant", "content": "Answer: 89"},
        {"role": "user", "content": "Are you sure?\nCheck again."},
    ],
    [  # system prompt, two tool results in a row, unicode
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Compute two things: 2+2 and 3×3 — please."},
        {
            "role": "assistant",
            "content": 'Calling tools.\n<tool_call>[{"name": "calculator", "arguments": {"expression": "2+2"}}]</tool_call>',
        },
        {"role": "tool", "content": "4"},
        {"role": "tool", "content": "9"},
        {"role": "assistant", "content": "  4 and 9 ünïcode  "},
        {"role": "user", "content": "  leading and trailing spaces  "},
    ],
    [  # an empty observation: only the next generation prompt is appended
        {"role": "user", "content": "Guess a number."},
        {"role": "assistant", "content": "50"},
        {"role": "assistant", "content": "51"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("fmt", ["smollm2", "qwen_like"])
def test_deltas_reproduce_full_rendering(chat, qwen_chat, conversation, fmt):
    cf = chat if fmt == "smollm2" else qwen_chat
    tools = [CALCULATOR_TOOL]
    rebuilt = _rebuild(cf, conversation, tools)
    if cf.tools_in_template:
        full_text = cf.tokenizer.apply_chat_template(
            conversation, tools=tools, tokenize=False, add_generation_prompt=True
        )
    else:
        full_text = cf.tokenizer.apply_chat_template(
            cf.with_tools(conversation, tools), tokenize=False, add_generation_prompt=True
        )
    full = cf.tokenizer.encode(full_text, add_special_tokens=False)
    # Text always matches. Tokens match too unless an assistant reply starts with whitespace: then the
    # template's "\n" merges with it when re-tokenised ("\n  " is one token), which is exactly why the
    # loop never re-tokenises generated text.
    assert cf.tokenizer.decode(rebuilt) == full_text
    if not any(m["role"] == "assistant" and m["content"][:1].isspace() for m in conversation):
        assert rebuilt == full
    else:
        assert rebuilt != full


def test_env_tokens_never_merge_with_generated_ones(chat):
    """The delta begins at the turn-end token boundary, so its tokens do not depend on the reply."""
    tool = [{"role": "tool", "content": "  spaced result  "}]
    delta = chat.delta_ids(tool)
    for reply in ["x", "  leading", "trailing  ", "\n\n", "ünïcode"]:
        conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}] + tool
        full = chat.tokenizer.encode(
            chat.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )
        assert full[-len(delta) :] == delta


def test_delta_shape_smollm2(chat):
    assert chat.turn_end_id == chat.tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert (
        chat.delta_text([{"role": "tool", "content": "42"}])
        == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.delta_text([]) == "\n<|im_start|>assistant\n"
    assert chat.delta_ids([])[-1] == chat.tokenizer.encode("\n", add_special_tokens=False)[-1]


def test_tools_rendered_into_system_message_for_smollm2(chat):
    assert chat.tools_in_template is False
    text = chat.prompt_text([{"role": "user", "content": "hi"}], [CALCULATOR_TOOL])
    assert text.startswith("<|im_start|>system\n")
    assert (
        "You are a helpful AI assistant named SmolLM" not in text
    )  # our system message replaces the default
    tools_json = re.search(r"<tools>(\[.*?\])</tools>", text, re.DOTALL).group(1)
    assert json.loads(tools_json) == [CALCULATOR_TOOL["function"]]
    assert "<tool_call>[" in text and text.endswith("<|im_start|>assistant\n")
    # An existing system message keeps its text and gets the tool block appended.
    text = chat.prompt_text(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], [CALCULATOR_TOOL]
    )
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call functions")
    assert text.count("<|im_start|>system") == 1
    # Without tools the template's own default system prompt is used.
    assert "named SmolLM" in chat.prompt_text([{"role": "user", "content": "hi"}], [])


def test_assistant_tool_calls_become_call_text_for_smollm2(chat):
    """OpenAI-style `tool_calls` on an assistant message (arguments as an object or a JSON string) are
    written as the `<tool_call>` text the parser reads back; the caller's messages stay untouched."""
    messages = [
        {"role": "user", "content": "What is 6 + 3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c0",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": "6 + 3"}},
                }
            ],
        },
        {"role": "tool", "content": "9", "tool_call_id": "c0", "name": "calculator"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "9"}'}}
            ],
        },
        {"role": "user", "content": "And 2 + 2?"},
    ]
    rendered = chat.with_tools(messages, [CALCULATOR_TOOL])
    assert "tool_calls" in messages[1] and messages[1]["content"] == ""
    first, second = rendered[2], rendered[4]
    assert "tool_calls" not in first and "tool_calls" not in second
    assert (
        first["content"]
        == '<tool_call>[{"name": "calculator", "arguments": {"expression": "6 + 3"}}]</tool_call>'
    )
    assert chat.parse_action(first["content"]).tool_calls[0].arguments == {"expression": "6 + 3"}
    assert second["content"].startswith("Checking.\n<tool_call>")
    assert chat.parse_action(second["content"]).tool_calls[0].arguments == {"expression": "9"}
    assert first["content"] in chat.prompt_text(messages, [CALCULATOR_TOOL])


def test_native_tool_template_is_detected(qwen_chat):
    assert qwen_chat.tools_in_template is True
    text = qwen_chat.prompt_text([{"role": "user", "content": "hi"}], [CALCULATOR_TOOL])
    assert '"name": "calculator"' in text and "# Tools" in text
    assert "You can call functions" not in text  # no second copy in the system message


def test_initial_prompt_ids_match_template(chat):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    ids = chat.initial_prompt_ids(msgs)
    text = chat.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ids == chat.tokenizer.encode(text, add_special_tokens=False)
    with pytest.raises(ValueError):
        chat.initial_prompt_ids([])


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '<tool_call>[{"name": "calculator", "arguments": {"expression": "1+2"}}]</tool_call>',
            [("calculator", {"expression": "1+2"})],
        ),
        (
            '<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>',
            [("calculator", {"expression": "1+2"})],
        ),
        (
            'a <tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call> b <tool_call>[{"name": "g"}]</tool_call>',
            [("f", {"x": 1}), ("g", {})],
        ),
        ('<tool_call>\n```json\n[{"name": "f", "arguments": {}}]\n```\n</tool_call>', [("f", {})]),
        (
            '<tool_call>{"type": "function", "function": {"name": "f", "arguments": {"a": [1]}}}</tool_call>',
            [("f", {"a": [1]})],
        ),
        ("<tool_call>[]</tool_call>", []),
        ("The answer is 42.", []),
    ],
)
def test_parse_tool_calls(chat, text, expected):
    action = chat.parse_action(text)
    assert action.malformed is None
    assert [(c.name, c.arguments) for c in action.tool_calls] == expected
    assert [c.id for c in action.tool_calls] == [f"call_{i}" for i in range(len(expected))]
    assert action.content == text


@pytest.mark.parametrize(
    "text, reason",
    [
        ('<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>', "invalid JSON"),
        ('<tool_call>{"name": "f"}', "unclosed"),
        ('{"name": "f"}</tool_call>', "without"),
        ('<tool_call>{"arguments": {}}</tool_call>', "no 'name'"),
        ('<tool_call>{"name": "f", "arguments": [1, 2]}</tool_call>', "must be a JSON object"),
        ('<tool_call>{"name": "f", "arguments": "not json"}</tool_call>', "not JSON"),
        ("<tool_call>[1, 2]</tool_call>", "JSON object"),
    ],
)
def test_malformed_tool_calls(chat, text, reason):
    action = chat.parse_action(text)
    assert action.tool_calls == []
    assert action.malformed is not None and reason in action.malformed
    calls, problem = parse_tool_calls(text)
    assert calls == [] and problem == action.malformed


def test_strip_tool_calls():
    assert strip_tool_calls('Sure. <tool_call>[{"name": "f"}]</tool_call> Done.') == "Sure.  Done."
    assert strip_tool_calls("Text <tool_call>{unclosed") == "Text"
    assert strip_tool_calls("plain") == "plain"


def test_decode_drops_turn_end(chat):
    ids = _assistant_ids(chat, "Answer: 7")
    assert chat.decode(ids) == "Answer: 7"
    assert chat.turn_end_id in chat.stop_ids
