"""rollout/chat.py against the real SmolLM2 tokenizer: prompts, token-exact deltas, tool-call parsing."""

from __future__ import annotations

import copy
import functools
import json
import re

import pytest

from envs.calculator import CALCULATOR_TOOL
from envs.tool_syntax import TOOLS_SYSTEM_PROMPT, format_tool_calls, parse_tool_calls, strip_tool_calls
from rollout.chat import ChatFormat

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


@functools.cache
def _smollm2_tokenizer(cache_dir: str):
    from slime.core.model import load_tokenizer, smollm2_tokenizer_dir

    return load_tokenizer(str(smollm2_tokenizer_dir(cache_dir)))


@pytest.fixture(scope="module")
def tokenizer(cache_dir: str):
    """conftest's SmolLM2 tokenizer, loaded once per process (not once per session): `make mutants`
    forks a fresh pytest session per mutant from a process that already loaded it. Tests that change
    the tokenizer work on a deep copy."""
    return _smollm2_tokenizer(cache_dir)


# Function-scoped (construction is cheap): every test that uses a ChatFormat then runs its
# constructor, so mutation testing counts every such test as covering it (docs/testing.md).
@pytest.fixture
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture
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


# ---------------------------------------------------------------------------------- tool-call syntax
# envs/tool_syntax.py needs no tokenizer: these tests pin its exact texts and messages.


def test_format_tool_calls_exact_text_and_round_trip():
    calls = [("calculator", {"expression": "2 × 3"}), ("noop", {})]
    text = format_tool_calls("Let me compute.", calls)
    assert text == (
        'Let me compute.\n<tool_call>[{"name": "calculator", "arguments": {"expression": "2 × 3"}}, '
        '{"name": "noop", "arguments": {}}]</tool_call>'
    )
    # No content: no leading newline.
    assert format_tool_calls("", calls[1:]) == '<tool_call>[{"name": "noop", "arguments": {}}]</tool_call>'
    parsed, problem = parse_tool_calls(text)
    assert problem is None
    assert [(c.name, c.arguments, c.id) for c in parsed] == [
        ("calculator", {"expression": "2 × 3"}, "call_0"),
        ("noop", {}, "call_1"),
    ]
    assert strip_tool_calls(text) == "Let me compute."


@pytest.mark.parametrize(
    "text, expected",
    [
        ('<tool_call>{"name": "  f  ", "parameters": {"x": 1}}</tool_call>', [("f", {"x": 1})]),
        ('<tool_call>{"name": "f", "arguments": null}</tool_call>', [("f", {})]),
        ('<tool_call>{"name": "f", "arguments": "  "}</tool_call>', [("f", {})]),
        (
            '<tool_call>{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}</tool_call>',
            [("f", {"a": 1})],
        ),
        ("<tool_call>```\n[]\n```</tool_call>", []),
        # ids count calls across blocks, not blocks
        (
            '<tool_call>[{"name": "a"}, {"name": "b"}]</tool_call>x<tool_call>{"name": "c"}</tool_call>',
            [("a", {}), ("b", {}), ("c", {})],
        ),
        # "function" only unwraps an object
        ('<tool_call>{"name": "f", "function": "g"}</tool_call>', [("f", {})]),
    ],
)
def test_parse_tool_calls_variants(text, expected):
    calls, problem = parse_tool_calls(text)
    assert problem is None
    assert [(c.name, c.arguments) for c in calls] == expected
    assert [c.id for c in calls] == [f"call_{i}" for i in range(len(expected))]


@pytest.mark.parametrize(
    "text, reason",
    [
        ('<tool_call>{"name": "f"}', "unclosed <tool_call> (expected <tool_call>[...]</tool_call>)"),
        (
            '<tool_call>{"name": "f"}</tool_call> and <tool_call>{"name": "g"}',
            "unclosed <tool_call> (expected <tool_call>[...]</tool_call>)",
        ),
        ("no call</tool_call>", "</tool_call> without <tool_call>"),
        (
            '<tool_call>{"name": "f", "arguments": {"x": 1}</tool_call>',
            "invalid JSON in <tool_call>: Expecting ',' delimiter at char 35",
        ),
        (
            '<tool_call>[{"name": "f"}, 3]</tool_call>',
            "tool call #1 must be a JSON object with 'name' and 'arguments'",
        ),
        (
            '<tool_call>[{"name": "f"}]</tool_call><tool_call>{"name": " "}</tool_call>',
            "tool call #1 has no 'name' string",
        ),
        ('<tool_call>{"name": 7}</tool_call>', "tool call #0 has no 'name' string"),
        (
            '<tool_call>{"name": "f", "arguments": "{bad"}</tool_call>',
            "tool call #0 (f): arguments string is not JSON (Expecting property name enclosed in double quotes)",
        ),
        (
            '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
            "tool call #0 (f): 'arguments' must be a JSON object",
        ),
    ],
)
def test_parse_tool_calls_exact_reasons(text, reason):
    assert parse_tool_calls(text) == ([], reason)


def test_strip_tool_calls_exact():
    assert strip_tool_calls("  a <tool_call>[]</tool_call>b<tool_call>x</tool_call> c  ") == "a b c"
    assert strip_tool_calls("keep <tool_call>[]</tool_call> this <tool_call>cut") == "keep  this"
    assert strip_tool_calls("<tool_call>only</tool_call>") == ""


# ---------------------------------------------------------------------------------- ChatFormat setup


def _with_template(tokenizer, template: str | None):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def test_turn_end_and_stop_ids(tokenizer):
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    cf = ChatFormat(tokenizer, turn_end_token="<|im_start|>")
    assert (cf.turn_end_token, cf.turn_end_id) == ("<|im_start|>", im_start)
    # The EOS token ends a turn too, whatever the turn-end token is.
    assert cf.stop_ids == {im_start, tokenizer.eos_token_id}
    default = ChatFormat(tokenizer)
    assert (default.turn_end_token, default.stop_ids) == ("<|im_end|>", {2})


def test_chat_format_rejects_unusable_tokenizers(tokenizer):
    with pytest.raises(ValueError, match="has no chat template"):
        ChatFormat(_with_template(tokenizer, None))
    with pytest.raises(ValueError, match=r"turn-end token 'two words' is not a single token: \[\d+, \d+"):
        ChatFormat(tokenizer, turn_end_token="two words")
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(
        ValueError, match="does not end assistant turns with '<|im_end|>'; pass turn_end_token="
    ):
        ChatFormat(_with_template(tokenizer, plain))


def test_delta_needs_a_template_that_keeps_earlier_turns(tokenizer):
    # This template writes the message count first, so a longer conversation changes earlier text.
    counting = (
        "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cf = ChatFormat(_with_template(tokenizer, counting))
    with pytest.raises(ValueError, match="renders earlier turns differently"):
        cf.delta_text([{"role": "user", "content": "again"}])


def test_template_that_fails_on_tools_does_not_render_them(tokenizer):
    refusing = (
        "{% if tools %}{{ raise_exception('no tools here') }}{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cf = ChatFormat(_with_template(tokenizer, refusing))
    assert cf.tools_in_template is False
    assert "<tools>[" in cf.prompt_text([{"role": "user", "content": "hi"}], [CALCULATOR_TOOL])


def test_tools_in_template_override_leaves_messages_alone(tokenizer):
    cf = ChatFormat(tokenizer, tools_in_template=True)
    assert cf.tools_in_template is True
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
    ]
    out = cf.with_tools(messages, [CALCULATOR_TOOL])
    assert out == messages and out is not messages and out[1] is not messages[1]
    assert ChatFormat(tokenizer, tools_in_template=False).tools_in_template is False


def test_with_tools_exact_messages(chat):
    messages = [
        {"role": "system", "content": "Be brief.  \n"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": '{"x": 1}'}]},
    ]
    out = chat.with_tools(messages, [CALCULATOR_TOOL, {"name": "bare", "parameters": {}}])
    block = TOOLS_SYSTEM_PROMPT.format(
        tools=json.dumps([CALCULATOR_TOOL["function"], {"name": "bare", "parameters": {}}])
    )
    assert out == [
        {"role": "system", "content": "Be brief.\n\n" + block},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": '<tool_call>[{"name": "f", "arguments": {"x": 1}}]</tool_call>'},
    ]
    assert messages[2]["tool_calls"] and messages[0]["content"] == "Be brief.  \n"
    # Without tools: calls still become text, no system message is added.
    assert chat.with_tools(messages[1:], None) == out[1:]
    assert chat.with_tools([], [CALCULATOR_TOOL]) == [
        {
            "role": "system",
            "content": TOOLS_SYSTEM_PROMPT.format(tools=json.dumps([CALCULATOR_TOOL["function"]])),
        }
    ]


def test_prompt_ids_and_delta_ids_are_the_encoded_texts(chat, qwen_chat):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    for cf in (chat, qwen_chat):
        text = cf.prompt_text(msgs, [CALCULATOR_TOOL])
        assert cf.initial_prompt_ids(msgs, [CALCULATOR_TOOL]) == cf.tokenizer.encode(
            text, add_special_tokens=False
        )
        delta = [{"role": "tool", "content": "4"}]
        assert cf.delta_ids(delta) == cf.tokenizer.encode(cf.delta_text(delta), add_special_tokens=False)
    # The Qwen-like template renders the tools itself (no copy in a system message) and merges
    # consecutive tool results into one user turn.
    text = qwen_chat.prompt_text(msgs, [CALCULATOR_TOOL])
    assert text.startswith('<|im_start|>system\n# Tools\n<tools>{"type": "function"')
    assert "You can call functions" not in text
    assert qwen_chat.delta_text([{"role": "tool", "content": "4"}, {"role": "tool", "content": "5"}]) == (
        "<|im_start|>user<tool_response>\n4\n</tool_response><tool_response>\n5\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_parse_action_reports_the_reason(chat):
    action = chat.parse_action('ok <tool_call>{"name": "f"}')
    assert (action.content, action.tool_calls) == ('ok <tool_call>{"name": "f"}', [])
    assert action.malformed == "unclosed <tool_call> (expected <tool_call>[...]</tool_call>)"
    assert chat.decode([chat.turn_end_id]) == ""


def test_strip_tool_calls_cuts_at_the_first_unclosed_tag():
    assert strip_tool_calls("a <tool_call>x <tool_call>y") == "a"
    assert strip_tool_calls('<tool_call>{"name": "f"') == ""


class _CharTokenizer:
    """A stand-in tokenizer that, like Llama's, prepends BOS (id 1) when asked for special tokens:
    one id per character, and `<e>` is the single turn-end token (id 2). Its template ignores tools."""

    chat_template = "role:content<e> per message"
    eos_token, eos_token_id, name_or_path = "<e>", 2, "char-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            if text.startswith("<e>", i):
                ids.append(2)
                i += 3
            else:
                ids.append(1000 + ord(text[i]))
                i += 1
        return [1, *ids] if add_special_tokens else ids

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, tools=None):
        text = "".join(f"{m['role']}:{m['content']}<e>" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


def test_rendered_text_is_encoded_without_extra_special_tokens():
    tok = _CharTokenizer()
    cf = ChatFormat(tok)
    assert (cf.turn_end_id, cf.stop_ids, cf.tools_in_template) == (2, {2}, False)
    # No BOS in front of the prompt or of a delta: the rendered text holds every special token.
    ids = cf.initial_prompt_ids([{"role": "user", "content": "hi"}])
    assert ids == tok.encode("user:hi<e>assistant:", add_special_tokens=False)
    assert cf.delta_text([{"role": "tool", "content": "4"}]) == "tool:4<e>assistant:"
    assert cf.delta_ids([{"role": "tool", "content": "4"}]) == tok.encode("tool:4<e>assistant:", False)


def test_exact_error_messages():
    class NoTemplate:
        name_or_path = "org/tok"

    with pytest.raises(ValueError) as e:
        ChatFormat(NoTemplate())  # no chat_template attribute at all
    assert str(e.value) == "tokenizer 'org/tok' has no chat template"
    # Without a name the tokenizer's repr is shown.
    anonymous = type("Anon", (), {"chat_template": None, "__repr__": lambda self: "<anon>"})()
    with pytest.raises(ValueError) as e:
        ChatFormat(anonymous)
    assert str(e.value) == "tokenizer <anon> has no chat template"
    with pytest.raises(ValueError) as e:
        ChatFormat(_CharTokenizer(), turn_end_token="<|im_end|>")  # 10 characters, 10 ids
    assert str(e.value).startswith("turn-end token '<|im_end|>' is not a single token: [1060, 1124")
    cf = ChatFormat(_CharTokenizer())
    with pytest.raises(ValueError) as e:
        cf.initial_prompt_ids([])
    assert str(e.value) == "initial_prompt_ids needs at least one message"


def test_exact_template_error_messages(tokenizer):
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ValueError) as e:
        ChatFormat(_with_template(tokenizer, plain))
    assert str(e.value) == (
        "the chat template does not end assistant turns with '<|im_end|>'; pass turn_end_token= to ChatFormat"
    )
    counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(ValueError) as e:
        ChatFormat(_with_template(tokenizer, counting)).delta_text([{"role": "user", "content": "x"}])
    assert str(e.value) == (
        "the chat template renders earlier turns differently once new messages follow; "
        "token-exact deltas are not possible with it"
    )


def test_with_tools_defaults_and_unicode(chat):
    messages = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}]
    tool = {"type": "function", "function": {"name": "mul", "description": "a × b", "parameters": {}}}
    out = chat.with_tools(messages, [tool])
    # A call without arguments is written with {}; the tool list keeps its unicode as is.
    assert out[1]["content"] == '<tool_call>[{"name": "f", "arguments": {}}]</tool_call>'
    assert '"description": "a × b"' in out[0]["content"]
