"""An example black-box agent: solves calculator word problems with a tool, through the OpenAI client.

Train it with:

    python -m slime.train +experiment=calculator env=openai_agent \
        env.agent=examples.agents.calculator_agent:run

(run from the repository root so `examples` is importable). The agent knows nothing about slime: it
gets an OpenAI-compatible base URL, a model name and a task row, runs its own tool loop, and returns
its reward. Every model call it makes is recorded by the rollout worker and trained on.

The task row is a calculator problem (`env.dataset.kwargs.source: calculator`): `messages` holds the
question and `env_args["answer"]` the reference answer.
"""

from __future__ import annotations

import ast
import json
import operator
import re
from typing import Any

from openai import AsyncOpenAI

MAX_TURNS = 3
SYSTEM = (
    "Solve the problem. Use the calculator tool for arithmetic. When you know the result, reply with "
    "'Answer: <number>' and no tool call."
)
CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression with numbers, + - * / and parentheses.",
        "parameters": {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3"}},
            "required": ["expression"],
        },
    },
}
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expression: str) -> float:
    """Plain arithmetic only (numbers, + - * /, parentheses); raises ValueError for anything else."""

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("only numbers, + - * / and parentheses are allowed")

    try:
        return ev(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ZeroDivisionError) as e:
        raise ValueError(str(e)) from None


def calculator(arguments: str) -> str:
    """The tool: JSON arguments in, result (or an error the model can read) out."""
    try:
        value = evaluate(str(json.loads(arguments)["expression"]))
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        return f"Error: {e}"
    return str(int(value)) if float(value).is_integer() else f"{value:.10g}"


def final_answer(text: str) -> str | None:
    """The number after 'Answer:', else the last number in the text."""
    found = re.search(r"Answer:\s*(-?[\d,]*\.?\d+)", text)
    numbers = [found.group(1)] if found else re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


async def run(base_url: str, model: str, task: dict[str, Any]) -> dict[str, Any]:
    """Tool loop of up to MAX_TURNS model calls; reward 1 for the right final answer, else 0."""
    client = AsyncOpenAI(base_url=base_url, api_key="not-needed")
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}, *task["messages"]]
    tool_calls = 0
    reply = ""
    try:
        for _ in range(MAX_TURNS):
            response = await client.chat.completions.create(
                model=model, messages=messages, tools=[CALCULATOR]
            )
            message = response.choices[0].message
            # Send the assistant message back as received: the endpoint recognises it and continues
            # the conversation on the exact tokens it generated.
            messages.append(message.model_dump(exclude_none=True))
            reply = message.content or ""
            if not message.tool_calls:
                break
            for call in message.tool_calls:
                tool_calls += 1
                result = calculator(call.function.arguments)
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    finally:
        await client.close()
    predicted = final_answer(reply)
    expected = str(task["env_args"]["answer"])
    correct = predicted is not None and float(predicted) == float(expected)
    return {"reward": float(correct), "info": {"tool_calls": tool_calls, "answered": predicted is not None}}
