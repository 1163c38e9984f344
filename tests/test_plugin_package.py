"""The example environment plugin (examples/slime-env-example) installs and is found by entry point.

The package is pip-installed into a temporary target directory (no network: --no-deps and
--no-build-isolation build it with this environment's setuptools); fresh Python processes with that
directory on PYTHONPATH must then list `reverse` and resolve it by its entry-point name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "examples" / "slime-env-example"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    target = tmp_path_factory.mktemp("plugin-site")
    build = tmp_path_factory.mktemp("plugin-build")
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = build / "slime-env-example"
    subprocess.run(["cp", "-r", str(PLUGIN), str(src)], check=True)
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    cmd += ["--quiet", "--disable-pip-version-check", "--target", str(target), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(target.glob("slime_env_example-*.dist-info")), sorted(p.name for p in target.iterdir())
    return str(target)


def _run(code_or_args: list[str], plugin_path: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (plugin_path, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, *code_or_args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def test_registry_resolves_the_entry_point(plugin_path: str):
    code = textwrap.dedent(
        """
        import asyncio
        from envs.registry import list_envs, load_env_class
        from envs.base import Action

        assert list_envs()["reverse"] == "slime_env_example:ReverseEnv", list_envs()
        cls = load_env_class("reverse")
        assert cls.__module__ == "slime_env_example" and cls.__name__ == "ReverseEnv"
        tasks = cls.make_tasks(3, seed=0)
        assert len(tasks) == 3 and tasks == cls.make_tasks(3, seed=0)

        async def episode(reply):
            env = cls()
            messages = await env.reset(tasks[0])
            assert messages[0]["role"] == "user"
            return await env.step(Action(content=reply))

        answer = tasks[0].env_args["answer"]
        right = asyncio.run(episode(answer))
        wrong = asyncio.run(episode("z" + answer))
        assert right.done and right.reward == 1.0 and right.info == {"exact": True}
        assert wrong.done and wrong.reward == 0.0
        print("OK", cls.__module__)
        """
    )
    done = _run(["-c", code], plugin_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK slime_env_example" in done.stdout


def test_cli_lists_the_plugin(plugin_path: str):
    done = _run(["-m", "envs", "list"], plugin_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next((ln for ln in done.stdout.splitlines() if "reverse" in ln), "")
    assert "slime_env_example:ReverseEnv" in line, done.stdout


async def test_plugin_env_runs_in_the_episode_loop(plugin_path: str, monkeypatch, engine, tokenizer):
    """In-process, through the registry and the real episode loop on the session engine."""
    from envs.registry import load_env_class
    from rollout.chat import ChatFormat
    from rollout.episode import run_env_group
    from slime.core.config import RolloutConfig
    from slime.core.types import SamplingParams, Status

    monkeypatch.syspath_prepend(plugin_path)
    cls = load_env_class("reverse")
    task = cls.make_tasks(1, seed=0)[0]
    cfg = RolloutConfig(max_turns=1, max_tokens_per_turn=16, max_total_tokens=256)
    # The random model never writes <|im_end|>; a space ends its turn instead, so step() runs.
    sampling = SamplingParams(max_tokens=16, stop=[" "], seed=0)
    trajs = await run_env_group(engine, cls, task, 3, ChatFormat(tokenizer), cfg, sampling)
    assert all(t.status in (Status.COMPLETED, Status.TRUNCATED) for t in trajs), [t.info for t in trajs]
    completed = [t for t in trajs if t.status == Status.COMPLETED]
    assert completed, [t.info for t in trajs]
    for t in completed:
        assert 0.0 <= t.reward <= 1.0 and "exact" in t.info["env"] and t.num_generated >= 1


def test_not_found_without_the_plugin():
    """Without the install directory on the path the name is unknown (the test above is not vacuous)."""
    code = (
        "from envs.registry import EnvNotFoundError, load_env_class\n"
        "try:\n    load_env_class('reverse')\nexcept EnvNotFoundError as e:\n    print('NOT FOUND', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOT FOUND unknown environment 'reverse'" in done.stdout
