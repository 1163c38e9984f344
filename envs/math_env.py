"""`math`: single-turn problems with verifiable answers, generated locally from a seed.

Also home of the answer extraction and checking shared by the other built-ins:

- `extract_answer(text)`: the last `\\boxed{...}`, else the last `<answer>...</answer>`, else what follows
  the last "Answer:" / "answer is", else the last number in the text.
- `parse_number(s)`: a string -> exact Fraction (ints, decimals, `1,000`, `a/b`, `\\frac{a}{b}`,
  `\\dfrac`, `-\\frac`, `$...$`, `x = ...`, `50%`).
- `answers_match(predicted, reference)`: equal as numbers (0.5 == 1/2 == \\frac{1}{2} == 50%), or a
  decimal with at least 3 decimals that is the reference correctly rounded (0.333 for 1/3); otherwise
  equal after light string normalisation.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Any

from envs.base import Action, Environment, StepResult
from slime.core.types import Message, Task

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_PHRASE = re.compile(r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(
    r"-?\\[dt]?frac\{\s*-?\d+(?:\.\d+)?\s*\}\{\s*-?\d+(?:\.\d+)?\s*\}"  # \frac{a}{b}
    r"|-?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?"  # 1,000 or 1,000.5
    r"|-?\d+(?:\.\d+)?\s*/\s*\d+(?:\.\d+)?"  # a/b
    r"|-?\d*\.?\d+%?"  # 12, 0.5, .5, 50%
)
_FRAC = re.compile(r"^(-?)\\[dt]?frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}$")
_SLASH = re.compile(r"^(-?[\d.]+)\s*/\s*(-?[\d.]+)$")
_PLAIN = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...} (balanced braces), in order."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def extract_answer(text: str) -> str | None:
    """The final answer in a model reply (see the module docstring for the order), or None."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        lines = phrases[-1].group(1).strip().splitlines()
        if not lines:  # "Answer:" and nothing after it (a reply cut off there raised IndexError)
            return None
        line = lines[0].strip()
        # "Answer: 12 apples." -> the number in the line when there is one.
        nums = _NUMBER.findall(line)
        return nums[0].strip() if nums else line.rstrip(".").strip()
    nums = _NUMBER.findall(text)
    return nums[-1].strip() if nums else None


def _clean(s: str) -> str:
    s = s.strip().strip("$").strip()
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "\\displaystyle"):
        s = s.replace(junk, "")
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    boxed = _boxed_contents(s)
    if boxed:
        s = boxed[-1]
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = s.strip().rstrip(".").strip()
    if s.startswith("(") and s.endswith(")") and s.count("(") == 1:
        s = s[1:-1].strip()
    return s


def _to_fraction(s: str) -> Fraction | None:
    s = s.strip()
    if _PLAIN.match(s):
        return Fraction(s)
    m = _FRAC.match(s) or None
    if m:
        sign, num, den = m.groups()
        value = _to_fraction(num), _to_fraction(den)
    else:
        m = _SLASH.match(s)
        if not m:
            return None
        sign, value = "", (_to_fraction(m.group(1)), _to_fraction(m.group(2)))
    num_f, den_f = value
    if num_f is None or den_f is None or den_f == 0:
        return None
    result = num_f / den_f
    return -result if sign == "-" else result


def parse_number(s: str) -> list[Fraction]:
    """The numeric values `s` may denote: [] when not a number, one value usually, two for a
    percentage ("50%" -> 1/2 and 50, since "what percent" answers are often given either way)."""
    s = _clean(s)
    if not s:
        return []
    percent = s.endswith("%")
    s = s.rstrip("%").replace("\\", "").rstrip() if percent else s
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    value = _to_fraction(s)
    if value is None:
        return []
    return [value / 100, value] if percent else [value]


def _normalise_text(s: str) -> str:
    return re.sub(r"\s+", "", _clean(s)).lower()


def _rounds_to(pred: str, ref: Fraction) -> bool:
    """True when `pred` is a decimal with >= 3 decimals equal to `ref` correctly rounded."""
    m = re.fullmatch(r"-?\d*\.(\d{3,})", _clean(pred))
    if not m:
        return False
    half_ulp = Fraction(1, 2 * 10 ** len(m.group(1)))
    return abs(Fraction(_clean(pred)) - ref) <= half_ulp


def answers_match(predicted: str | None, reference: str | int | float) -> bool:
    """Whether a predicted answer string equals the reference (see the module docstring)."""
    if predicted is None:
        return False
    reference = str(reference)
    refs = parse_number(reference)
    preds = parse_number(predicted)
    if refs and preds:
        if any(p == r for p in preds for r in refs):
            return True
        return any(_rounds_to(predicted, r) for r in refs)
    if refs:
        return False
    return _normalise_text(predicted) == _normalise_text(reference) and bool(_normalise_text(reference))


def format_fraction(value: Fraction) -> str:
    """Canonical answer string: "12", "-3", "5/6"."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def format_decimal(value: Fraction) -> str:
    """A terminating fraction as an exact decimal ("81.43"); others as "a/b"."""
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return format_fraction(value)
    places = max(twos, fives)
    scaled = value * 10**places
    sign = "-" if scaled < 0 else ""
    digits = str(abs(scaled.numerator)).rjust(places + 1, "0")
    return f"{sign}{digits[:-places]}.{digits[-places:]}" if places else f"{sign}{digits}"


# ------------------------------------------------------------------------------------- problems
KINDS = ("arithmetic", "fraction", "linear", "percent", "decimal")


def _problem(rng: random.Random, kind: str, difficulty: int) -> tuple[str, str]:
    """(question, answer) for one problem; bigger difficulty means bigger numbers."""
    hi = 10 ** (difficulty + 1)
    if kind == "arithmetic":
        a, b, c = rng.randint(2, hi), rng.randint(2, hi), rng.randint(2, 12)
        op = rng.choice(["+", "-"])
        value = (a + b if op == "+" else a - b) * c
        return f"What is ({a} {op} {b}) * {c}?", str(value)
    if kind == "fraction":
        den_hi = 4 + 4 * difficulty
        a, b = rng.randint(1, den_hi), rng.randint(2, den_hi)
        c, d = rng.randint(1, den_hi), rng.randint(2, den_hi)
        op = rng.choice(["+", "-"])
        value = Fraction(a, b) + Fraction(c, d) if op == "+" else Fraction(a, b) - Fraction(c, d)
        return f"What is {a}/{b} {op} {c}/{d}? Give the answer as a reduced fraction.", format_fraction(value)
    if kind == "linear":
        x = rng.randint(-hi // 2, hi // 2)
        a = rng.choice([n for n in range(-9, 10) if n not in (0, 1)])
        b = rng.randint(-hi, hi)
        sign = "+" if b >= 0 else "-"
        return f"Solve for x: {a}x {sign} {abs(b)} = {a * x + b}.", str(x)
    if kind == "percent":
        p = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 90, 120, 150])
        n = rng.randint(1, hi) * 4
        return f"What is {p}% of {n}?", format_decimal(Fraction(p * n, 100))
    if kind == "decimal":
        a = Fraction(rng.randint(1, hi * 10), 10)
        b = Fraction(rng.randint(1, hi * 100), 100)
        op = rng.choice(["+", "-"])
        value = a + b if op == "+" else a - b
        return f"What is {format_decimal(a)} {op} {format_decimal(b)}?", format_decimal(value)
    raise ValueError(f"unknown math problem kind {kind!r}; choose from {', '.join(KINDS)}")


INSTRUCTION = "Put your final answer in \\boxed{}."


def answer_task_messages(task: Task, system_prompt: str) -> tuple[str, list[Message]]:
    """The reference answer of a verifiable task and its first messages (system prompt prepended)."""
    if "answer" not in task.env_args:
        raise ValueError(f"task {task.id!r} has no env_args['answer']")
    messages = task.messages()
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return str(task.env_args["answer"]), messages


class MathEnv(Environment):
    """Single turn: the model answers once; reward 1.0 when the answer matches `env_args["answer"]`.

    kwargs: system_prompt (prepended as a system message when set), require_boxed (only accept an
    answer inside \\boxed{}; default False).
    """

    tools: list[dict[str, Any]] = []

    def __init__(self, system_prompt: str = "", require_boxed: bool = False):
        self.system_prompt = system_prompt
        self.require_boxed = require_boxed
        self.answer: str = ""

    @classmethod
    def make_tasks(
        cls, num: int, seed: int, kinds: list[str] | tuple[str, ...] = KINDS, difficulty: int = 1
    ) -> list[Task]:
        """`num` problems drawn from `kinds`; deterministic in (seed, kinds, difficulty)."""
        if difficulty < 1:
            raise ValueError(f"env.dataset.kwargs.difficulty must be >= 1, got {difficulty}")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(
                f"env.dataset.kwargs.kinds: unknown {unknown or 'empty list'}; choose from {', '.join(KINDS)}"
            )
        rng = random.Random(f"math-{seed}")
        tasks = []
        for i in range(num):
            kind = kinds[i % len(kinds)]  # round-robin keeps the kinds balanced
            question, answer = _problem(rng, kind, difficulty)
            tasks.append(
                Task(
                    id=f"math-{seed}-{i}",
                    prompt=f"{question} {INSTRUCTION}",
                    env="math",
                    env_args={"answer": answer, "kind": kind},
                )
            )
        return tasks

    async def reset(self, task: Task) -> list[Message]:
        self.answer, messages = answer_task_messages(task, self.system_prompt)
        return messages

    async def step(self, action: Action) -> StepResult:
        text = action.content
        predicted = (_boxed_contents(text) or [None])[-1] if self.require_boxed else extract_answer(text)
        correct = answers_match(predicted, self.answer)
        return StepResult(
            observation=[],
            reward=1.0 if correct else 0.0,
            done=True,
            info={"correct": correct, "extracted": predicted},
        )
