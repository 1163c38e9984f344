"""The calculator agent of `calculator_agent.py`, written with Anthropic's SDK (the Messages API).

Train it with:

    python -m slime.train +experiment=calculator env=openai_agent \
        env.agent=examples.agents.calculator_anthropic_agent:run

The agent uses `client.messages.create` as it would against Anthropic: `system`, the conversation as
user / assistant turns (the reply's content blocks sent back as received, then a user turn of
`tool_result` blocks), a custom tool with an `input_schema`, the required `max_tokens` (the endpoint
caps it at `rollout.max_tokens_per_turn`). Anthropic's clients append `/v1/messages` to their base URL;
the endpoint answers there, so the base URL goes in as given.
"""

from __future__ import annotations

import json
from typing import Any

from anthropic import AsyncAnthropic

from examples.agents.calculator_agent import MAX_TURNS, SYSTEM, calculator, final_answer

CALCULATOR = {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression with numbers, + - * / and parentheses.",
    "input_schema": {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3"}},
        "required": ["expression"],
    },
}


async def run(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """Tool loop of up to MAX_TURNS messages; reward 1 for the right final answer, else 0."""
    client = AsyncAnthropic(base_url=base_url, api_key="not-needed")
    # Anthropic takes the system prompt apart from the user / assistant turns.
    system = "\n\n".join([SYSTEM, *(m["content"] for m in task["messages"] if m["role"] == "system")])
    messages: list[dict[str, Any]] = [m for m in task["messages"] if m["role"] != "system"]
    tool_calls = 0
    reply = ""
    try:
        for _ in range(MAX_TURNS):
            message = await client.messages.create(
                model=model, max_tokens=1024, system=system, messages=messages, tools=[CALCULATOR]
            )
            # The content blocks go back as received: the endpoint recognises its reply.
            messages.append({"role": "assistant", "content": message.content})
            reply = "".join(block.text for block in message.content if block.type == "text")
            uses = [block for block in message.content if block.type == "tool_use"]
            if not uses:
                break
            results = []
            for use in uses:
                tool_calls += 1
                result = calculator(json.dumps(use.input))
                results.append({"type": "tool_result", "tool_use_id": use.id, "content": result})
            messages.append({"role": "user", "content": results})
    finally:
        await client.close()
    predicted = final_answer(reply)
    expected = str(task["env_args"]["answer"])
    correct = predicted is not None and float(predicted) == float(expected)
    return {"reward": float(correct), "info": {"tool_calls": tool_calls, "answered": predicted is not None}}
