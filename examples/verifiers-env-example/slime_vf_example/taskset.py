"""Tasks, rewards and tools of slime-vf-example."""

import random
import re

import verifiers.v1 as vf
from verifiers.v1.types import content_text

from slime_vf_example.servers.calculator import CalculatorToolset

SYSTEM_PROMPT = (
    "Solve the arithmetic problem. You may use the calculator tool. End your reply with 'Answer: <number>'."
)


class ArithData(vf.TaskData):
    answer: int
    """The reference result."""


class ArithTask(vf.Task[ArithData]):
    @vf.reward(weight=1.0)
    async def correct(self, trace: vf.Trace) -> float:
        """1 when the last number of the final reply is the answer."""
        numbers = re.findall(r"-?\d+", final_reply(trace))
        return float(bool(numbers) and int(numbers[-1]) == self.data.answer)

    @vf.metric
    async def replies(self, trace: vf.Trace) -> float:
        return float(sum(1 for m in trace_messages(trace) if m.role == "assistant"))


def trace_messages(trace: vf.Trace) -> list:
    return list(trace.branches[-1].messages) if trace.branches else []


def final_reply(trace: vf.Trace) -> str:
    replies = [m for m in trace_messages(trace) if m.role == "assistant"]
    return (content_text(replies[-1].content) or "") if replies else ""


class ArithConfig(vf.TasksetConfig):
    num_tasks: int = 64
    """How many problems to build."""
    digits: int = 2
    """Operands have up to this many digits."""
    seed: int = 0
    """Seed of the problems."""
    tools: bool = True
    """Serve the calculator tool (over MCP) to every episode."""
    calculator: vf.SharedToolsetConfig = vf.SharedToolsetConfig()


class ArithTaskset(vf.Taskset[ArithTask, ArithConfig]):
    @classmethod
    def toolsets(cls, config: ArithConfig) -> list[vf.Toolset]:
        return [CalculatorToolset(config.calculator)] if config.tools else []

    def load(self) -> list[ArithTask]:
        rng = random.Random(self.config.seed)
        tasks = []
        for i in range(self.config.num_tasks):
            a, b = (rng.randint(1, 10**self.config.digits - 1) for _ in range(2))
            op = rng.choice("+-*")
            answer = a + b if op == "+" else a - b if op == "-" else a * b
            data = ArithData(
                id=f"arith-{self.config.seed}-{i}",
                prompt=f"What is {a} {op} {b}?",
                system_prompt=SYSTEM_PROMPT,
                answer=answer,
            )
            tasks.append(ArithTask(data, self.config.task))
        return tasks
