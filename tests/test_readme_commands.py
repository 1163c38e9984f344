"""Every `python -m slime.train` command in the README's and docs' shell blocks composes, validates
and passes the driver's environment checks as written; the black-box agent commands (one per API:
Chat Completions, Responses, Anthropic Messages) each run two steps.

Running each command to the end is what the README's "Measured" table reports; here each one is
checked up to the point where Ray would start, which is where a wrong key, value or plugin fails.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slime import api
from slime.train import check_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PREFIX = "python -m slime.train"


def shell_commands(path: Path) -> list[str]:
    """The `python -m slime.train ...` commands of a Markdown file's fenced shell blocks."""
    commands, block, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            block = not block and line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not block:
            continue
        line = pending + line.split(" #", 1)[0].rstrip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.lstrip().startswith(PREFIX):
            commands.append(line.strip())
    return commands


COMMANDS = [(p.name, c) for p in DOCS for c in shell_commands(p)]


def overrides_of(command: str) -> list[str]:
    """The Hydra overrides of a command; `hydra.*` keys (the run dir) are the CLI's, not the config's."""
    words = shlex.split(command)[len(PREFIX.split()) :]
    return [w for w in words if not w.startswith(("hydra.", "-"))]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 6 and any("+experiment=agentic" in c for _, c in COMMANDS)


# An OpenEnv command over a server (docs/environments.md) follows the line that starts the example server.
OPENENV_SERVER = re.compile(r"env\.kwargs\.base_url=http://127\.0\.0\.1:(\d+)")


@contextlib.contextmanager
def documented_server(command: str) -> Iterator[None]:
    """The example OpenEnv server on the port `command` names, as the docs start it (nothing otherwise)."""
    found = OPENENV_SERVER.search(command)
    if found is None:
        yield
        return
    import httpx

    port = found.group(1)
    server = [sys.executable, "-m", "examples.openenv_guess.server", "--port", port]
    proc = subprocess.Popen(server, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                    break
            time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_documented_command_validates(doc, command, tmp_path):
    cfg = api.compose_config(overrides_of(command), str(tmp_path))
    from slime.core.validation import validate

    validate(cfg)
    with documented_server(command):
        assert check_env(cfg) > 0, (doc, command)


# The documented black-box agent commands, one per API the endpoint serves (README and
# docs/environments.md), by agent: each trains two steps with the real client library the agent uses.
AGENT_COMMANDS = {
    re.search(r"env\.agent=examples\.agents\.(\w+):run", c).group(1): c
    for _, c in COMMANDS
    if "env=openai_agent" in c and "env.agent=examples.agents." in c
}


def test_every_agent_api_has_a_documented_command():
    assert set(AGENT_COMMANDS) >= {
        "calculator_agent",
        "calculator_responses_agent",
        "calculator_anthropic_agent",
    }


@pytest.mark.slow
@pytest.mark.parametrize("agent", sorted(AGENT_COMMANDS))
def test_the_agent_command_runs_two_steps(agent, tmp_path, ray_cluster):
    rows = api.run(
        [
            *overrides_of(AGENT_COMMANDS[agent]),
            "trainer.steps=2",
            "trainer.save_final=false",
            "logger.mode=disabled",
        ],
        run_dir=str(tmp_path),
    )
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["batch/trajectories"] > 0 and r["episode/failed"] == 0 for r in rows), [
        r.get("episode/failure_reasons") for r in rows
    ]
    assert not (tmp_path / "checkpoints").exists()  # trainer.save_final=false: 2 GB not written
