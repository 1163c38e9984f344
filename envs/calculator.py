"""`calculator`: multi-turn arithmetic word problems solved with a calculator tool.

Tasks are generated from a seed: a running quantity changed by `num_ops` operations (+, -, * and,
when `allow_division`, exact /) on numbers with up to `digits` digits, phrased as a short story
("A library has 37 books. Then it receives 12 more books. ...") or, with `word_problems=False`, as an
expression to compute. The `calculator` tool evaluates + - * / and parentheses exactly (rational
arithmetic on an `ast` parse; nothing else is accepted, nothing is `eval`-ed). With
`tools=["calculator", "python"]` the env also offers a `python` tool that runs code in the sandbox.

Each step: tool calls get one "tool" message each; a reply without tool calls is the final answer
(`extract_answer`: \\boxed{}, "Answer:", else the last number) and ends the episode. Reward:
`correct * (1 - tool_bonus - format_bonus) + tool_bonus * used_tool + format_bonus * formatted`, where
used_tool means at least one tool call succeeded before the final answer and formatted means the reply
states its result as "Answer: <number>" (with the default bonuses of 0 the reward is plain correctness;
it stays in [0, 1]). `max_turns` assistant turns without a final answer end the episode with 0. With
`require_tool_call`, a final answer given before any successful tool call is not accepted: the env
reminds the model to use the tool (a user message) and the episode goes on.

`demonstrations=N` shows N worked examples before the task, as earlier turns of the conversation (a
question, the assistant's calculator call as OpenAI-style `tool_calls`, the tool's result, the reply
"Answer: N"): small models follow a shown exchange far more readily than a described format
(SmolLM2-135M: tool calls in 54 of 64 episodes with one example against 0 of 64 without, the
"Answer:" form in 25 against 0). The chat format renders the calls in the model's own syntax.
"""

from __future__ import annotations

import ast
import random
import re
from fractions import Fraction
from typing import Any

from envs.base import Action, Environment, StepResult, ToolCall, function_tool, tool_message
from envs.math_env import answer_task_messages, answers_match, extract_answer
from envs.sandbox import PYTHON_TOOL, python_tool
from slime.core.types import Message, Task

CALCULATOR_TOOL = function_tool(
    "calculator",
    "Evaluate an arithmetic expression with numbers, + - * / and parentheses. Returns the exact result.",
    {"expression": {"type": "string", "description": "the expression, e.g. (12 + 7) * 3"}},
    ["expression"],
)

MAX_EXPRESSION_CHARS = 200
# The answer format SYSTEM_PROMPT asks for: "Answer: <number>" (format_bonus).
_ANSWER_LINE = re.compile(r"Answer:\s*-?\d[\d,]*(?:\.\d+)?(?:/\d+)?\b")
MAX_ABS_VALUE = Fraction(10) ** 40

_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic, or cannot be evaluated (division by zero, too big)."""


def _eval_node(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # Fraction(str(...)) keeps decimal literals exact: 0.1 + 0.2 == 0.3.
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        value = _eval_node(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Add):
            value = left + right
        elif isinstance(node.op, ast.Sub):
            value = left - right
        elif isinstance(node.op, ast.Mult):
            value = left * right
        else:
            if right == 0:
                raise CalculatorError("division by zero")
            value = left / right
        if abs(value) > MAX_ABS_VALUE:
            raise CalculatorError("result too large")
        return value
    what = type(node.op).__name__ if isinstance(node, ast.BinOp | ast.UnaryOp) else type(node).__name__
    raise CalculatorError(f"unsupported element {what}: only numbers, + - * / and parentheses are allowed")


def safe_eval(expression: str) -> Fraction:
    """Evaluate plain arithmetic exactly. Raises CalculatorError for anything else.

    Accepts ints, decimals, + - * /, unary minus and parentheses; also the symbols x, ×, ÷ and a
    trailing "=" as models write them.
    """
    if not isinstance(expression, str):
        raise CalculatorError("expression must be a string")
    expr = expression.strip().rstrip("=").strip().replace("×", "*").replace("÷", "/").replace("−", "-")
    if not expr:
        raise CalculatorError("empty expression")
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    if "**" in expr:
        raise CalculatorError("unsupported element Pow: only numbers, + - * / and parentheses are allowed")
    try:
        tree = ast.parse(expr.replace("x", "*").replace("X", "*"), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot parse {expression!r} as arithmetic") from None
    return _eval_node(tree.body)


def format_number(value: Fraction) -> str:
    """Exact integers as integers, otherwise a decimal with up to 10 significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.10g}"


# ------------------------------------------------------------------------------------ problems
_SUBJECTS = [
    ("A library", "books"),
    ("A farmer", "apples"),
    ("A warehouse", "crates"),
    ("A school", "pencils"),
    ("A bakery", "cookies"),
    ("A zoo", "tickets"),
    ("A factory", "bolts"),
    ("A club", "stickers"),
]


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(2, 10**digits - 1)


def make_problem(
    rng: random.Random, digits: int, num_ops: int, allow_division: bool, words: bool
) -> tuple[str, int]:
    """(question, integer answer): a start value changed by num_ops operations, left to right."""
    value = _operand(rng, digits)
    subject, unit = rng.choice(_SUBJECTS)
    sentences = [f"{subject} has {value} {unit}."]
    expr = str(value)
    for _ in range(num_ops):
        ops = ["+", "-", "*"] + (["/"] if allow_division else [])
        op = rng.choice(ops)
        if op == "-" and value < 3:
            op = "+"
        if op == "/":
            divisors = [d for d in range(2, min(value, 10**digits)) if value % d == 0]
            if not divisors:
                op = "+"
        if op == "+":
            b = _operand(rng, digits)
            value += b
            sentences.append(f"Then it gets {b} more {unit}.")
        elif op == "-":
            b = rng.randint(1, value - 1)
            value -= b
            sentences.append(f"Then {b} {unit} are taken away.")
        elif op == "*":
            b = rng.randint(2, max(2, min(9, 10**digits - 1)))
            value *= b
            sentences.append(f"Then the number of {unit} is multiplied by {b}.")
        else:
            b = rng.choice(divisors)
            value //= b
            sentences.append(f"Then the {unit} are shared equally among {b} groups and one group is kept.")
        # Left to right, as the story applies the operations: parenthesise what came before.
        expr = f"({expr}) {op} {b}" if len(sentences) > 2 else f"{expr} {op} {b}"
    if words:
        question = " ".join(sentences) + f" How many {unit} are there now?"
    else:
        question = f"Compute {expr}."
    return question, value


# Worked examples for `demonstrations` (question, expression, answer), in the stories' phrasing but with
# subjects the generated tasks never use. test_envs checks that each expression evaluates to its answer.
DEMONSTRATIONS = [
    ("A garden has 6 roses. Then it gets 3 more roses. How many roses are there now?", "6 + 3", "9"),
    (
        "A shop has 4 boxes. Then the number of boxes is multiplied by 7. How many boxes are there now?",
        "4 * 7",
        "28",
    ),
    ("A port has 9 boats. Then 5 boats are taken away. How many boats are there now?", "9 - 5", "4"),
]


def demonstration_messages(count: int) -> list[Message]:
    """The first `count` worked examples as conversation turns (see the module docstring)."""
    messages: list[Message] = []
    for i, (question, expression, answer) in enumerate(DEMONSTRATIONS[:count]):
        call_id = f"example_{i}"
        call = {"name": "calculator", "arguments": {"expression": expression}}
        messages += [
            {"role": "user", "content": question},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": call_id, "type": "function", "function": call}],
            },
            {"role": "tool", "content": answer, "tool_call_id": call_id, "name": "calculator"},
            {"role": "assistant", "content": f"Answer: {answer}"},
        ]
    return messages


SYSTEM_PROMPT = (
    "Solve the problem. Use the calculator tool for arithmetic. When you know the result, reply with "
    "'Answer: <number>' and no tool call."
)


class CalculatorEnv(Environment):
    """Multi-turn tool use (see the module docstring).

    kwargs: max_turns (assistant turns before the episode ends unanswered, default 4), tool_bonus
    (bonus in [0, 1) for a successful tool call before the final answer, default 0), format_bonus
    (bonus in [0, 1) for a final reply that states its result as "Answer: <number>", the format the
    system prompt asks for; default 0; tool_bonus + format_bonus < 1),
    require_tool_call (a final answer before any successful tool call gets a reminder instead of
    ending the episode; default False), tools (which tools to offer: "calculator", "python"),
    system_prompt, python_timeout_s, demonstrations (worked examples shown before the task, 0 to
    len(DEMONSTRATIONS); default 0).
    """

    def __init__(
        self,
        max_turns: int = 4,
        tool_bonus: float = 0.0,
        format_bonus: float = 0.0,
        require_tool_call: bool = False,
        tools: list[str] | tuple[str, ...] = ("calculator",),
        system_prompt: str = SYSTEM_PROMPT,
        python_timeout_s: float = 5.0,
        demonstrations: int = 0,
    ):
        if max_turns < 1:
            raise ValueError(f"env.kwargs.max_turns must be >= 1, got {max_turns}")
        if not 0.0 <= tool_bonus < 1.0:
            raise ValueError(f"env.kwargs.tool_bonus must be in [0, 1), got {tool_bonus}")
        if not 0.0 <= format_bonus < 1.0 or tool_bonus + format_bonus >= 1.0:
            raise ValueError(
                f"env.kwargs.format_bonus must be in [0, 1) with tool_bonus + format_bonus < 1, "
                f"got format_bonus={format_bonus}, tool_bonus={tool_bonus}"
            )
        if not 0 <= demonstrations <= len(DEMONSTRATIONS):
            raise ValueError(
                f"env.kwargs.demonstrations must be in [0, {len(DEMONSTRATIONS)}], got {demonstrations}"
            )
        available = {"calculator": CALCULATOR_TOOL, "python": PYTHON_TOOL}
        unknown = [t for t in tools if t not in available]
        if unknown:
            raise ValueError(f"env.kwargs.tools: unknown {unknown}; choose from {sorted(available)}")
        self.tools = [available[t] for t in tools]
        self.max_turns = max_turns
        self.tool_bonus = tool_bonus
        self.format_bonus = format_bonus
        self.require_tool_call = require_tool_call
        self.system_prompt = system_prompt
        self.python_timeout_s = python_timeout_s
        self.demonstrations = demonstrations
        self.answer = ""
        self.turns = 0
        self.tool_ok = 0
        self.tool_errors = 0

    @classmethod
    def make_tasks(
        cls,
        num: int,
        seed: int,
        digits: int = 2,
        num_ops: int = 2,
        allow_division: bool = False,
        word_problems: bool = True,
    ) -> list[Task]:
        """`num` problems; deterministic in (seed, digits, num_ops, allow_division, word_problems)."""
        if digits < 1 or num_ops < 1:
            raise ValueError(f"env.dataset.kwargs: digits and num_ops must be >= 1, got {digits}, {num_ops}")
        rng = random.Random(f"calculator-{seed}")
        tasks = []
        for i in range(num):
            question, answer = make_problem(rng, digits, num_ops, allow_division, word_problems)
            tasks.append(
                Task(
                    id=f"calculator-{seed}-{i}",
                    prompt=question,
                    env="calculator",
                    env_args={"answer": str(answer)},
                )
            )
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        self.answer, messages = answer_task_messages(task, self.system_prompt)
        if self.demonstrations:
            at = 1 if messages[0]["role"] == "system" else 0
            messages[at:at] = demonstration_messages(self.demonstrations)
        return messages

    async def _call(self, call: ToolCall) -> tuple[str, bool]:
        """(tool output, success)."""
        offered = {t["function"]["name"] for t in self.tools}
        if call.name not in offered:
            return f"Error: unknown tool {call.name!r}; available: {', '.join(sorted(offered))}", False
        if call.name == "python":
            out = await python_tool(call, timeout_s=self.python_timeout_s)
            return out, not out.startswith("Error")
        expression = call.arguments.get("expression")
        if not isinstance(expression, str):
            if isinstance(expression, int | float) and not isinstance(expression, bool):
                expression = str(expression)
            else:
                return "Error: the calculator needs a string argument 'expression'", False
        try:
            return format_number(safe_eval(expression)), True
        except CalculatorError as e:
            return f"Error: {e}", False

    def _reward(self, correct: bool, formatted: bool) -> float:
        return (
            float(correct) * (1.0 - self.tool_bonus - self.format_bonus)
            + self.tool_bonus * float(self.tool_ok > 0)
            + self.format_bonus * float(formatted)
        )

    async def step(self, action: Action) -> StepResult:
        self.turns += 1
        if action.tool_calls:
            observation = []
            for call in action.tool_calls:
                output, ok = await self._call(call)
                self.tool_ok += ok
                self.tool_errors += not ok
                observation.append(tool_message(output, call))
            info = {"tool_ok": self.tool_ok, "tool_errors": self.tool_errors}
            if self.turns >= self.max_turns:
                return StepResult(observation, 0.0, True, {**info, "correct": False, "answered": False})
            return StepResult(observation, 0.0, False, info)
        if self.require_tool_call and self.tool_ok == 0:
            pending = {"tool_ok": 0, "tool_errors": self.tool_errors, "correct": False, "answered": False}
            if self.turns >= self.max_turns:
                return StepResult([], 0.0, True, pending)
            names = " or ".join(t["function"]["name"] for t in self.tools)
            reminder = f"Use the {names} tool before giving the final answer."
            return StepResult([{"role": "user", "content": reminder}], 0.0, False, pending)
        predicted = extract_answer(action.content)
        correct = answers_match(predicted, self.answer)
        formatted = _ANSWER_LINE.search(action.content) is not None
        info: dict[str, Any] = {
            "correct": correct,
            "answered": predicted is not None,
            "formatted": formatted,
            "extracted": predicted,
            "tool_ok": self.tool_ok,
            "tool_errors": self.tool_errors,
        }
        return StepResult([], self._reward(correct, formatted), True, info)
