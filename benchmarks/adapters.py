"""What the adapters of other ecosystems cost: episodes per second against a native slime environment
on the same task, on one engine, in one run.

    python -m benchmarks.adapters                     # tiny_dense, float32, 6 groups of 4 per mode
    python -m benchmarks.adapters --groups 10 --group-size 8

One float32 `VLLMEngine` (one thread, eager) serves every mode; each mode runs a warm-up group, then
`--groups` groups one after another (a group's episodes concurrently, as a rollout worker runs them):

- guess-the-number, multi-turn (`--max-turns` turns): slime's `guess_number` env; the same game as an
  OpenEnv environment (examples/openenv_guess) through env=openenv in process, and over OpenEnv's
  server (a real uvicorn process, a WebSocket session per episode).
- arithmetic, single-turn: the tasks of the verifiers example (examples/verifiers-env-example, no tool)
  as a native slime env with the same prompt and reward; as a black-box agent on the endpoint (one
  OpenAI chat call, the same reward: the endpoint's own share); and through env=verifiers (verifiers'
  interception server, chat program and rubric on top of the endpoint).

In the game the random model's replies stop at `--stop` (a space by default): short replies that end
with finish "stop", so episodes play all their turns and generation is cheap, which makes the adapters'
share of the time as large as it gets. The single-turn task generates `--max-tokens` tokens per episode
in every mode. Printed: episodes/s, generated tokens per episode, turns per episode and the ratio to the native mode
of the same task. The tiny random model never solves either game, so every episode of one task plays
the same number of turns whatever the mode.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.common import config_model_dir


class ArithEnv:
    """The verifiers example's task as a native slime env: its prompt, its `correct` reward."""

    tools: list = []

    async def reset(self, task):
        self.answer = task.env_args["verifiers_task"]["answer"]
        return task.messages()

    async def step(self, action):
        from envs.base import StepResult

        numbers = re.findall(r"-?\d+", action.content)
        return StepResult([], float(bool(numbers) and int(numbers[-1]) == self.answer), True, {})


async def chat_agent(base_url: str, model: str, task: dict[str, Any]) -> float:
    """The same episode as a plain OpenAI-client agent: one call, the example's reward."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as client:
        reply = await client.chat.completions.create(model=model, messages=task["messages"])
    numbers = re.findall(r"-?\d+", reply.choices[0].message.content or "")
    return float(bool(numbers) and int(numbers[-1]) == task["env_args"]["verifiers_task"]["answer"])


async def measure(name: str, groups: int, run_group: Callable[[int], Awaitable[list]]) -> dict[str, Any]:
    await run_group(0)  # warm-up: imports, connections, tool servers
    t0 = time.perf_counter()
    trajs = []
    for g in range(1, groups + 1):
        trajs += await run_group(g)
    wall = time.perf_counter() - t0
    failed = [t.info.get("error") for t in trajs if t.status.value == "failed"]
    return {
        "mode": name,
        "episodes": len(trajs),
        "episodes_per_s": len(trajs) / wall,
        "tokens_per_episode": sum(t.num_generated for t in trajs) / len(trajs),
        "turns_per_episode": sum(t.turns for t in trajs) / len(trajs),
        "failed": len(failed),
        "first_failure": failed[0] if failed else None,
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    from envs.guess_number import GuessNumberEnv
    from envs.openenv_env import OpenEnvEnv
    from envs.verifiers_env import VerifiersEnv
    from rollout.agent.runner import run_agent_group
    from rollout.agent.server import AgentServer
    from rollout.chat import ChatFormat
    from rollout.engines.vllm import VLLMEngine
    from rollout.episode import run_env_group
    from slime.core.config import RolloutConfig
    from slime.core.model import load_tokenizer
    from slime.core.types import SamplingParams

    model_dir = config_model_dir("tiny_dense", args.cache_dir)
    os.makedirs(args.work_dir, exist_ok=True)
    engine = VLLMEngine(
        model_dir, dtype="float32", max_model_len=2048, kv_cache_gib=1, enforce_eager=True, seed=0,
        work_dir=args.work_dir, num_threads=1,
    )  # fmt: skip
    await engine.start()
    chat = ChatFormat(load_tokenizer(model_dir))
    # A stop string ends the random model's replies early with finish "stop" (a reply cut at the token
    # limit ends the episode), so the game really runs --max-turns turns.
    stop = [args.stop] if args.stop else []
    cfg = RolloutConfig(
        max_turns=args.max_turns,
        max_tokens_per_turn=args.max_tokens,
        max_total_tokens=1536,
        agent_timeout_s=300,
        stop=stop,
    )
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, stop=stop)
    # The single-turn task without it: the endpoint samples under its own config (agents' requests name
    # no stop), so every mode generates --max-tokens tokens there.
    arith_cfg = dataclasses.replace(cfg, stop=[])
    arith_sampling = dataclasses.replace(sampling, stop=[])
    n = args.group_size
    results = []

    port = args.port
    server = subprocess.Popen(
        [sys.executable, "-m", "examples.openenv_guess.server", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                OpenEnvEnv.make_tasks(1, 0, base_url=url, connect_timeout_s=1.0)
                break
            except ValueError:
                await asyncio.sleep(0.2)
        game = {"max_guesses": args.max_turns + 1}  # never solved, never out of guesses: max_turns turns
        guess_tasks = GuessNumberEnv.make_tasks(args.groups + 1, 0)
        results.append(
            await measure(
                "guess_number (native)",
                args.groups,
                lambda g: run_env_group(
                    engine, lambda: GuessNumberEnv(**game), guess_tasks[g], n, chat, cfg, sampling
                ),
            )
        )
        ip = {"id": "examples.openenv_guess.env:GuessEnvironment", "env_kwargs": game}
        ip_tasks = OpenEnvEnv.make_tasks(args.groups + 1, 0, **ip)
        results.append(
            await measure(
                "env=openenv, in process",
                args.groups,
                lambda g: run_env_group(
                    engine, lambda: OpenEnvEnv(**ip), ip_tasks[g], n, chat, cfg, sampling
                ),
            )
        )
        srv_tasks = OpenEnvEnv.make_tasks(args.groups + 1, 0, base_url=url)
        results.append(
            await measure(
                "env=openenv, over its server",
                args.groups,
                lambda g: run_env_group(
                    engine, lambda: OpenEnvEnv(base_url=url), srv_tasks[g], n, chat, cfg, sampling
                ),
            )
        )
    finally:
        server.terminate()
        server.wait()

    vf_env = VerifiersEnv(id="slime-vf-example", taskset={"num_tasks": args.groups + 1, "tools": False})
    arith_tasks = vf_env.tasks(0)
    agent_server = await AgentServer.start(engine, chat, arith_cfg)
    try:
        results.append(
            await measure(
                "arithmetic (native)",
                args.groups,
                lambda g: run_env_group(engine, ArithEnv, arith_tasks[g], n, chat, arith_cfg, arith_sampling),
            )
        )
        results.append(
            await measure(
                "env=openai_agent (one chat call)",
                args.groups,
                lambda g: run_agent_group(
                    engine, agent_server, chat, arith_tasks[g], n, chat_agent, arith_cfg
                ),
            )
        )
        results.append(
            await measure(
                "env=verifiers",
                args.groups,
                lambda g: run_agent_group(
                    engine, agent_server, chat, arith_tasks[g], n, vf_env.run_agent, arith_cfg
                ),
            )
        )
    finally:
        await agent_server.stop()
        await vf_env.close()
        await engine.shutdown()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stop", default=" ", help="stop string of every reply ('' for none)")
    ap.add_argument("--port", type=int, default=8779)
    ap.add_argument(
        "--cache-dir", default=os.environ.get("SLIME_CACHE_DIR", os.path.expanduser("~/.cache/slime"))
    )
    ap.add_argument("--work-dir", default="runs/bench-adapters")
    ap.add_argument("--json", default="", help="also write the rows here")
    args = ap.parse_args()
    rows = asyncio.run(main_async(args))
    native = {"guess": rows[0]["episodes_per_s"], "arith": rows[3]["episodes_per_s"]}
    print(f"{'mode':<36} {'episodes/s':>10} {'vs native':>9} {'tokens/ep':>9} {'turns/ep':>8} {'failed':>6}")
    for i, r in enumerate(rows):
        r["vs_native"] = r["episodes_per_s"] / native["guess" if i < 3 else "arith"]
        print(
            f"{r['mode']:<36} {r['episodes_per_s']:>10.2f} {r['vs_native']:>9.2f} "
            f"{r['tokens_per_episode']:>9.1f} {r['turns_per_episode']:>8.1f} {r['failed']:>6}"
        )
        if r["first_failure"]:
            print(f"  first failure: {r['first_failure']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
