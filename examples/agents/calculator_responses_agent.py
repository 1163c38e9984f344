"""The calculator agent of `calculator_agent.py`, written with the OpenAI Responses API.

Train it with:

    python -m slime.train +experiment=calculator env=openai_agent \
        env.agent=examples.agents.calculator_responses_agent:run

The agent uses `client.responses.create` as it would against OpenAI: the instructions, the
conversation as input items (the response's output items sent back as received, then a
`function_call_output` per call), function tools in the Responses shape. The endpoint renders the same
prompt a Chat Completions agent gets and continues the conversation on the exact tokens it generated.
"""

from __future__ import annotations

from typing import Any

from openai import AsyncOpenAI

from examples.agents.calculator_agent import MAX_TURNS, SYSTEM, calculator, final_answer

# The Responses API takes a function tool's name, description and parameters at the top level.
CALCULATOR = {
    "type": "function",
    "name": "calculator",
    "description": "Evaluate an arithmetic expression with numbers, + - * / and parentheses.",
    "parameters": {
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3"}},
        "required": ["expression"],
    },
}


async def run(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """Tool loop of up to MAX_TURNS responses; reward 1 for the right final answer, else 0."""
    client = AsyncOpenAI(base_url=base_url, api_key="not-needed")
    items: list[Any] = list(task["messages"])  # {"role", "content"} messages are input items as they are
    tool_calls = 0
    reply = ""
    try:
        for _ in range(MAX_TURNS):
            response = await client.responses.create(
                model=model, instructions=SYSTEM, input=items, tools=[CALCULATOR]
            )
            # The output items go back as received: the endpoint recognises its reply.
            items += response.output
            reply = response.output_text
            calls = [item for item in response.output if item.type == "function_call"]
            if not calls:
                break
            for call in calls:
                tool_calls += 1
                output = calculator(call.arguments)
                items.append({"type": "function_call_output", "call_id": call.call_id, "output": output})
    finally:
        await client.close()
    predicted = final_answer(reply)
    expected = str(task["env_args"]["answer"])
    correct = predicted is not None and float(predicted) == float(expected)
    return {"reward": float(correct), "info": {"tool_calls": tool_calls, "answered": predicted is not None}}
