"""What the driver's console shows, and the summary at the end of a run.

The console of `python -m slime.train` shows:
- slime's own log lines (logger "slime", INFO and up): start-up, config notes, restarts, a worker that
  failed to load weights; WARNING and up of any other logger (`ConsoleFilter`);
- one progress line per step (slime/metrics.py `MetricsLogger._console`);
- the actors' warnings from slime's own code, which Ray forwards with the actor's name in front
  (slime/core/logs.py `send_output_to`: an actor's other output goes to its file);
- at the end, done, stopped or failed, the summary (`summary`).

Everything else goes to files: the driver's whole log to `<run_dir>/train.log` (Hydra's file handler,
`slime/configs/hydra/job_logging/slime.yaml`), Ray's driver messages to `<run_dir>/logs/ray.log`
(`ray_logs_to_file`), and each actor's output to its own file under `<run_dir>/logs/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Any

from slime.core.logs import LOGS_DIR, log_file

DRIVER_LOG = "train.log"  # Hydra's file handler: <run_dir>/<job name>.log
SUMMARY_WINDOW = 0.2  # the summary's reward is averaged over the first and the last 20% of steps


class ConsoleFilter(logging.Filter):
    """Lets slime's own lines through from INFO, any other logger's from WARNING: the libraries'
    INFO lines (and `trainer.actors`' set-up details) stay in train.log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "slime" or record.name.startswith("slime.")


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS message`; the level is named from WARNING up, and the logger when it is not slime's."""

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        head = [self.formatTime(record, self.datefmt)]
        if record.levelno >= logging.WARNING:
            head.append(record.levelname)
        if record.name != "slime":
            head.append(f"{record.name}:")
        text = " ".join([*head, record.getMessage()])
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def ray_logs_to_file(run_dir: str) -> str:
    """Send Ray's messages in this process (logger "ray": the cluster's start, token set-up) to
    `<run_dir>/logs/ray.log`; errors also stay on the console. For a process that runs one job and
    starts Ray for it (the CLI). Returns the file."""
    import ray  # noqa: F401  Ray puts its stderr handler on the "ray" logger when imported: replace it then

    path = log_file(run_dir, "ray")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    logger = logging.getLogger("ray")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    logger.addHandler(logging.FileHandler(path, encoding="utf-8"))
    logger.addHandler(errors)
    return path


def train_rows(run_dir: str) -> list[dict[str, Any]]:
    """The training rows of `<run_dir>/metrics.jsonl` (evaluation rows left out; [] without one)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut short
                continue
            if not row.get("eval"):
                rows.append(row)
    return rows


def duration(seconds: float) -> str:
    """45s, 1m56s, 2h03m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def summary(
    rows: list[dict[str, Any]],
    outcome: str,
    wall_s: float,
    run_dir: str,
    total_steps: int,
    log_path: str = "",
) -> str:
    """The block the console ends with, headed "run <outcome>:" ("finished", "stopped by SIGINT",
    "failed"): the steps in `rows` (the run's training rows, `train_rows`: a resumed run's earlier
    steps included) against `total_steps`; `wall_s` (this process's); the mean `reward/mean` over
    the first and over the last ceil(n / 5) of the n steps; the tokens generated but never trained on
    (`rollout/tokens_lost`, by reason), out of those generated (each step's
    `perf/rollout_tokens_per_s` times its `time/step_s`); the run dir, where the logs are, and the
    command that plots the run. `log_path`: the driver's log file where it is not
    `<run_dir>/train.log` (Hydra writes it in its own run dir, which a `run_dir=` override does not move).
    """
    n = len(rows)
    lines = [f"run {outcome}:", f"  steps        {n} of {total_steps}", f"  wall time    {duration(wall_s)}"]
    if n:
        k = max(1, math.ceil(n * SUMMARY_WINDOW))
        first = sum(float(r.get("reward/mean", 0.0)) for r in rows[:k]) / k
        last = sum(float(r.get("reward/mean", 0.0)) for r in rows[-k:]) / k
        steps = f"{k} step{'s' if k > 1 else ''}"
        lines.append(f"  reward       {first:.3f} over the first 20% ({steps}), {last:.3f} over the last 20%")
        lost = sum(int(r.get("rollout/tokens_lost", 0)) for r in rows)
        generated = sum(
            round(float(r.get("perf/rollout_tokens_per_s", 0.0)) * float(r.get("time/step_s", 0.0)))
            for r in rows
        )
        by_reason: dict[str, int] = {}
        for r in rows:
            for key, value in r.items():
                if key.startswith("rollout/tokens_lost/") and value:
                    reason = key.rsplit("/", 1)[1]
                    by_reason[reason] = by_reason.get(reason, 0) + int(value)
        text = f"{lost:,}"
        if generated:
            text += f" of {generated:,} generated ({lost / generated:.1%})"
        if by_reason:
            text += ": " + ", ".join(f"{reason} {count:,}" for reason, count in sorted(by_reason.items()))
        lines.append(f"  tokens lost  {text}")
    lines += [
        f"  run dir      {run_dir}",
        f"  logs         {os.path.join(run_dir, LOGS_DIR)}/ (engines, trainer ranks, Ray)",
        f"  driver log   {log_path or os.path.join(run_dir, DRIVER_LOG)} (this console and more)",
        f"  plot         python -m slime.plot {run_dir}",
    ]
    return "\n".join(lines)
