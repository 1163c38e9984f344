"""env=verifiers: verifiers 0.4.0 environments trained through the per-episode endpoint.

The real library and the worked example (examples/verifiers-env-example, installed as a package by
`make setup`) on the real `AgentServer`; the policy is the scripted engine of test_openai_agent.py (the
random tiny model never writes a tool call), so the episodes are deterministic: verifiers' own chat
program calls the endpoint through verifiers' interception server, runs the calculator tool over MCP,
and its rubric scores the result. Failures use tests/vf_faulty.py. The two-step training run is the
command docs/environments.md gives.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from conftest import assert_start_up_fails
from test_openai_agent import ToolCallingEngine, check_alignment, mask_runs

from envs.verifiers_env import TASK_KEY, VerifiersEnv
from rollout.agent.runner import run_agent_group
from rollout.agent.server import AgentServer
from rollout.chat import ChatFormat
from slime import api
from slime.core.config import RolloutConfig
from slime.core.types import Status

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = "slime-vf-example"
CFG = RolloutConfig(max_tokens_per_turn=64, max_total_tokens=2048, max_turns=4, agent_timeout_s=120.0)


@pytest.fixture(scope="module")
def chat(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tool_env():
    """The example with its calculator tool; its serving resources (the MCP server) live for the module."""
    env = VerifiersEnv(id=EXAMPLE, taskset={"num_tasks": 4})
    try:
        yield env
    finally:
        await env.close()


async def run_one(env: VerifiersEnv, chat: ChatFormat, replies: list[str], task_index: int = 0):
    eng = ToolCallingEngine(chat, replies)
    srv = await AgentServer.start(eng, chat, CFG)
    try:
        task = env.tasks(0)[task_index]
        trajs = await run_agent_group(eng, srv, chat, task, 1, env.run_agent, CFG)
    finally:
        await srv.stop()
    return eng, task, trajs


def test_tasks_are_the_tasksets_tasks(tool_env):
    tasks = tool_env.tasks(0)
    assert [t.id for t in tasks] == [f"arith-0-{i}" for i in range(4)]
    assert len(tool_env.tasks(2)) == 2
    first = tasks[0]
    assert first.env == "verifiers" and first.prompt[-1] == {"role": "user", "content": "What is 50 - 98?"}
    assert first.env_args[TASK_KEY]["answer"] == -48
    rebuilt = tool_env.verifiers_task({"id": first.id, "env_args": first.env_args})
    assert rebuilt.data.answer == -48 and rebuilt.data.id == first.id


async def test_a_tool_episode_is_recorded_token_exact(tool_env, chat):
    """verifiers' chat program sends the MCP tool's schema, the scripted policy calls it, verifiers runs
    it and sends the result back, the rubric scores the answer: one trajectory whose generated tokens
    are exactly the engine's, whose second prompt continues the first token for token."""
    call = '<tool_call>[{"name":"calc_calculator","arguments":{"expression":"50-98"}}]</tool_call>'
    eng, task, (traj,) = await run_one(tool_env, chat, [call, "Answer: -48"])
    assert traj.status == Status.COMPLETED and traj.reward == 1.0, traj.info
    assert traj.info["calls"] == 2 and traj.info["tool_calls"] == 1 and traj.info["num_segments"] == 1
    (trace,) = traj.info["env"]["verifiers"]["traces"]
    assert trace["rewards"] == {"correct": 1.0} and trace["metrics"]["replies"] == 2.0
    g1 = chat.tokenizer.encode(call, add_special_tokens=False) + [chat.turn_end_id]
    g2 = chat.tokenizer.encode("Answer: -48", add_special_tokens=False) + [chat.turn_end_id]
    assert [traj.token_ids[a:b] for a, b in mask_runs(traj.loss_mask)] == [g1, g2]
    n = len(traj.token_ids)
    assert eng.prompts[1] == traj.token_ids[: n - len(g2)]
    assert eng.prompts[0] == traj.token_ids[: traj.prompt_len]
    check_alignment(traj, eng.version)
    prompt = chat.tokenizer.decode(eng.prompts[0])
    assert '"name": "calc_calculator"' in prompt and "What is 50 - 98?" in prompt
    # The tool's result (computed by the MCP server) is the env message between the two turns.
    between = chat.tokenizer.decode(traj.token_ids[mask_runs(traj.loss_mask)[0][1] : n - len(g2)])
    assert "-48" in between and "tool" in between


async def test_a_single_turn_episode_without_tools(chat):
    env = VerifiersEnv(id=EXAMPLE, taskset={"num_tasks": 2, "tools": False})
    try:
        eng, task, (right,) = await run_one(env, chat, ["Answer: -48"])
        _, _, (wrong,) = await run_one(env, chat, ["Answer: 7"])
    finally:
        await env.close()
    assert right.status == Status.COMPLETED and right.reward == 1.0 and right.info["calls"] == 1
    assert wrong.status == Status.COMPLETED and wrong.reward == 0.0
    assert "<tools>" not in chat.tokenizer.decode(eng.prompts[0])


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("reward_raises", "the reward function broke"),
        ("reward_text", "could not convert string to float: 'high'"),
        ("reward_nan", "reward is not a finite number: nan"),
    ],
)
async def test_a_failing_reward_fails_only_its_episode(chat, fault, words):
    env = VerifiersEnv(id="vf-faulty", taskset={"fault": fault})
    try:
        _, task, (failed,) = await run_one(env, chat, ["hi"], task_index=0)
        _, ok_task, (ok,) = await run_one(env, chat, ["hi"], task_index=1)
    finally:
        await env.close()
    assert task.id == "faulty" and ok_task.id == "ok"
    assert failed.status == Status.FAILED and failed.reward == 0.0
    assert failed.info["error"].startswith("agent raised VerifiersEpisodeError: verifiers episode")
    assert words in failed.info["error"], failed.info["error"]
    assert len(failed.token_ids) > 0  # the tokens the model generated are kept on the failed episode
    assert ok.status == Status.COMPLETED and ok.reward == 0.5


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["env.id=no-such-env"], ["env.id='no-such-env'", "not found", "python -m envs list"]),
        ([], ["env=verifiers needs env.id=NAME"]),
        (["env.id=vf-faulty", "+env.kwargs.taskset.fault=load"], ["loading its tasks raised OSError"]),
        (
            ["env.id=vf-faulty", "+env.kwargs.taskset.nonsense=1"],
            ["verifiers refused the config", "nonsense"],
        ),
        (["env.id=vf-faulty", "env.agent=examples.agents.calculator_agent:run"], ["remove env.agent"]),
        (["env.id=vf-faulty", "+env.kwargs.agent.runtime.type=docker"], ["runtime.type=subprocess"]),
    ],
)
def test_bad_configurations_fail_at_start_up_naming_the_fix(overrides, words, tmp_path):
    assert_start_up_fails(["env=verifiers", *overrides], words, tmp_path)


def test_env_id_is_refused_for_an_env_that_takes_none(tmp_path):
    assert_start_up_fails(["env.id=slime-vf-example"], ["takes no id"], tmp_path)


def test_envs_list_shows_installed_verifiers_environments():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "envs", "list"], capture_output=True, text=True, cwd=REPO, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith(EXAMPLE))
    assert "slime_vf_example.taskset:ArithTaskset" in line and "env=verifiers env.id=slime-vf-example" in line


def test_episodes_need_no_network():
    """The tool episode again, in a network namespace with only loopback: verifiers' harness, its MCP
    tool server and its rubric all run offline (the stock harnesses would fetch from PyPI)."""
    if (
        not (shutil.which("unshare") and shutil.which("ip"))
        or subprocess.run(["unshare", "-rn", "true"]).returncode
    ):
        pytest.skip("no network namespaces on this machine (unshare -rn, ip)")
    test = f"{Path(__file__).name}::test_a_tool_episode_is_recorded_token_exact"
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    offline = (
        "ip link set lo up && ! python3 -c 'import socket; socket.create_connection((\"pypi.org\", 443), 3)' "
    )
    offline += f"2>/dev/null && exec {shlex.join(pytest_cmd)}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        ["unshare", "-rn", "sh", "-c", offline],
        capture_output=True,
        text=True,
        cwd=REPO / "tests",
        env=env,
        timeout=600,
    )
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]


def documented_command() -> list[str]:
    """The overrides of docs/environments.md's verifiers training command on the tiny model."""
    from test_readme_commands import COMMANDS, overrides_of

    (command,) = [
        c
        for doc, c in COMMANDS
        if doc == "environments.md" and f"env.id={EXAMPLE}" in c and "+experiment=tiny" in c
    ]
    return overrides_of(command)


@pytest.mark.slow
def test_the_documented_command_trains_two_steps(tmp_path, ray_cluster):
    rows = api.run([*documented_command(), "trainer.steps=2", "logger.mode=disabled"], run_dir=str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["batch/trajectories"] > 0 and r["episode/failed"] == 0 for r in rows), [
        r.get("episode/failure_reasons") for r in rows
    ]
