"""The console of a run (slime/console.py) and where the actors' output goes (slime/core/logs.py).

The summary's figures are computed by hand from a few metric rows. An actor's redirection is checked
in a plain subprocess (no Ray). Two runs through the real loop: the CLI, in its own process with its
own Ray cluster that forwards actor output to the console (what a user sees: no vLLM line, the
progress lines and the summary; vLLM's output in the engine's log file), and `slime.api.run` inside
pytest on the session's cluster, which Ray started before the run did (the actors' logs still land
in the run dir; the driver's Ray messages stay where the caller sent them, so there is no ray.log).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slime import api
from slime.console import ConsoleFilter, ConsoleFormatter, summary, train_rows

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes
# vLLM's log lines carry their process and source line: "(EngineCore pid=9) INFO 12-06 ... [core.py:133] ..."
VLLM_LINE = re.compile(r"\((EngineCore|MainProcess|VllmWorker)[^)]*pid=\d+\)|\[[\w/]+\.py:\d+\]")


def _row(step: int, reward: float, lost: int = 0, **lost_by: int) -> dict:
    return {
        "step": step,
        "reward/mean": reward,
        "rollout/tokens_lost": lost,
        **{f"rollout/tokens_lost/{k}": v for k, v in lost_by.items()},
        "perf/rollout_tokens_per_s": 100.0,
        "time/step_s": 2.0,
    }


def test_summary_figures_by_hand() -> None:
    # 6 steps: the first and last 20% are ceil(6 / 5) = 2 steps each (round or floor would give 1).
    rows = [
        _row(0, 0.1),
        _row(1, 0.3, 10, stale=10, failed=0),
        _row(2, 0.5),
        _row(3, 0.5),
        _row(4, 0.7, 30, failed=30),
        _row(5, 0.9),
    ]
    text = summary(rows, "finished", 116.4, "/runs/a", 8)
    assert text.splitlines() == [
        "run finished:",
        "  steps        6 of 8",
        "  wall time    1m56s",
        # (0.1 + 0.3) / 2 = 0.200 and (0.7 + 0.9) / 2 = 0.800
        "  reward       0.200 over the first 20% (2 steps), 0.800 over the last 20%",
        # 10 + 30 lost of 6 steps x 100 tok/s x 2 s = 1,200 generated: 40 / 1200 = 3.3%
        "  tokens lost  40 of 1,200 generated (3.3%): failed 30, stale 10",
        "  run dir      /runs/a",
        "  logs         /runs/a/logs/ (engines, trainer ranks, Ray)",
        "  driver log   /runs/a/train.log (this console and more)",
        "  plot         python -m slime.plot /runs/a",
    ]


def test_summary_of_a_run_that_failed_before_its_first_step() -> None:
    lines = summary([], "failed", 3725, "/runs/b", 2).splitlines()
    assert lines[:3] == ["run failed:", "  steps        0 of 2", "  wall time    1h02m"]
    assert not any("reward" in line or "tokens lost" in line for line in lines)
    assert lines[-3] == "  logs         /runs/b/logs/ (engines, trainer ranks, Ray)"


def test_summary_reads_the_training_rows_of_the_run_dir(tmp_path: Path) -> None:
    # An evaluation row and the cut-short last line of a killed run are not steps.
    lines = [json.dumps(_row(0, 0.25)), json.dumps({"step": 1, "eval": True, "reward/mean": 9.0})]
    lines += [json.dumps(_row(1, 0.75)), '{"step": 2, "rew']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    rows = train_rows(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1]
    assert "  reward       0.250 over the first 20% (1 step), 0.750 over the last 20%" in summary(
        rows, "finished", 1, str(tmp_path), 2
    )
    assert train_rows(str(tmp_path / "none")) == []


def test_the_console_shows_slimes_lines_and_every_warning_only() -> None:
    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, "x.py", 1, msg, None, None)

    keep = ConsoleFilter().filter
    assert keep(record("slime", logging.INFO, "env target: 1000 tasks"))
    assert not keep(record("trainer.actors", logging.INFO, "trainer ready: {...}"))
    assert keep(record("trainer.actors", logging.WARNING, "cut"))
    fmt = ConsoleFormatter()
    line = fmt.format(record("slime", logging.INFO, "weights: shm transport"))
    assert re.fullmatch(r"\d\d:\d\d:\d\d weights: shm transport", line), line
    line = fmt.format(record("slime", logging.WARNING, "rollout worker 0 failed"))
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING rollout worker 0 failed", line), line
    line = fmt.format(record("ray", logging.ERROR, "boom"))
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR ray: boom", line), line


ACTOR = """
import logging, os, subprocess, sys
from slime.core.logs import send_output_to
send_output_to(sys.argv[1])
print("python print", flush=True)
os.write(2, b"C-level write\\n")
subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
logging.getLogger("vllm").warning("a library warning")
logging.getLogger("rollout.engines.vllm").info("slime info")
logging.getLogger("rollout.engines.vllm").warning("slime warning")
"""


def test_an_actor_process_sends_everything_to_its_file_but_slimes_warnings(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "rollout-worker0.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", ACTOR, str(path)], capture_output=True, text=True, env=env, check=True
    )
    # What Ray would forward to the driver: slime's warning alone.
    assert out.stdout == ""
    assert out.stderr == "WARNING rollout.engines.vllm: slime warning\n"
    text = path.read_text()
    assert text.startswith("==== rollout-worker0.log: pid ")
    for line in ("python print", "C-level write", "a child process", "a library warning"):
        assert line in text.splitlines(), text
    assert re.search(r"INFO rollout\.engines\.vllm: slime info\n", text), text
    assert re.search(r"WARNING rollout\.engines\.vllm: slime warning\n", text), text


def _check_engine_log(run_dir: Path) -> None:
    engine = (run_dir / "logs" / "rollout-worker0.log").read_text()
    assert "Initializing a V1 LLM engine" in engine  # vLLM's engine-core process, a child of the actor
    assert "Reloading weights inplace" in engine  # the weight pushes were loaded through vLLM's reload
    # ... without the per-push warnings about rotary caches and the tied head (rollout/engines/vllm_reload.py)
    assert "Failed to load weights" not in engine
    assert (run_dir / "logs" / "trainer-rank0.log").read_text().startswith("==== trainer-rank0.log: pid ")


@pytest.mark.slow
def test_the_cli_console_shows_progress_and_summary_and_no_vllm_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "slime.train",
        "+experiment=tiny",
        "trainer.steps=2",
        f"hydra.run.dir={run_dir}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert not [line for line in console.splitlines() if VLLM_LINE.search(line)], console
    # Every line is slime's: a log line, a progress line, the summary (or a note from Ray itself).
    kinds = re.compile(r"\d\d:\d\d:\d\d |\[[#.]{20}\] step \d+/2 |  [a-z ]{11}  |\(raylet\) ")
    # Ray colours its own notes' prefix ("\x1b[33m(raylet)\x1b[0m ... over 95% full", seen in CI).
    plain = ANSI.sub("", console)
    assert [line for line in plain.splitlines() if not kinds.match(line)] == [], console
    assert re.search(r"^\[#{20}\] step 2/2 ", console, re.M), console
    assert re.search(r"^\d\d:\d\d:\d\d run finished:\n  steps        2 of 2\n", console, re.M), console
    assert f"  plot         python -m slime.plot {run_dir}\n" in console
    _check_engine_log(run_dir)
    assert "Started a local Ray instance" in (run_dir / "logs" / "ray.log").read_text()
    assert "run finished:" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_run_inside_a_process_that_started_ray_logs_into_its_run_dir(tmp_path, ray_cluster, capfd) -> None:
    rows = api.run(["+experiment=tiny", "trainer.steps=2", "logger.mode=disabled"], run_dir=str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1]
    captured = capfd.readouterr()
    assert not [line for line in (captured.out + captured.err).splitlines() if VLLM_LINE.search(line)]
    _check_engine_log(tmp_path)
    assert not (tmp_path / "logs" / "ray.log").exists()  # the caller's Ray: its messages stay the caller's
