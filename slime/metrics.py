"""Metrics sinks: metrics.jsonl (always), wandb (offline by default), a console progress line.

Key names are a public contract (DESIGN.md, "The user's contract"). `batch_metrics` derives the
rollout-side metrics of one training batch from its groups; the trainer adds its own.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from slime.config import LoggerConfig
from slime.types import Group


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def batch_metrics(groups: list[Group], version: int) -> dict[str, float]:
    """Reward, length, turn, tool and staleness statistics of the trajectories trained at `version`."""
    trajs = [t for g in groups for t in g.trajectories]
    rewards = [t.reward for t in trajs]
    staleness = [version - v for t in trajs for v, m in zip(t.versions, t.loss_mask, strict=True) if m]
    seq_stale = [version - t.min_version for t in trajs]
    return {
        "reward/mean": _mean(rewards),
        "reward/std": _std(rewards),
        "reward/max": max(rewards, default=0.0),
        "response/len_mean": _mean([t.num_generated for t in trajs]),
        "response/len_max": max((t.num_generated for t in trajs), default=0),
        "episode/turns_mean": _mean([t.turns for t in trajs]),
        "episode/tool_calls_mean": _mean([float(t.info.get("tool_calls", 0)) for t in trajs]),
        "episode/truncated_frac": _mean([float(t.status.value == "truncated") for t in trajs]),
        "staleness/mean": _mean([float(s) for s in staleness]),
        "staleness/max": float(max(staleness, default=0)),
        "staleness/seq_max": float(max(seq_stale, default=0)),
        "batch/trajectories": float(len(trajs)),
    }


class MetricsLogger:
    """Writes one JSON object per trainer step to metrics.jsonl, mirrors it to wandb and the console."""

    def __init__(self, run_dir: str, cfg: LoggerConfig, config: dict[str, Any], total_steps: int) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._t0 = time.perf_counter()
        self._wandb = None
        if cfg.mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.project,
                name=cfg.run_name or None,
                dir=run_dir,
                mode=cfg.mode,
                config=config,
                settings=wandb.Settings(console="off", silent=True),
            )

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(
                {k: v for k, v in row.items() if isinstance(v, int | float)}, step=int(row["step"])
            )
        if self.cfg.console:
            self._console(row)

    def _console(self, m: dict[str, Any]) -> None:
        step = int(m["step"]) + 1
        n = self.total_steps
        done = int(20 * step / max(n, 1))
        elapsed = time.perf_counter() - self._t0
        line = (
            f"[{'#' * done}{'.' * (20 - done)}] step {step}/{n} v{m.get('version', 0)} "
            f"reward {m.get('reward/mean', 0):.3f}±{m.get('reward/std', 0):.2f} "
            f"stale {m.get('staleness/mean', 0):.2f}/{m.get('staleness/max', 0):.0f} "
            f"gen {m.get('perf/rollout_tokens_per_s', 0):.0f} tok/s train {m.get('perf/train_tokens_per_s', 0):.0f} tok/s "
            f"step {m.get('time/step_s', 0):.1f}s idle {m.get('perf/trainer_idle_frac', 0):.0%} [{elapsed:.0f}s]"
        )
        print(line, file=sys.stderr, flush=True)

    def log_samples(self, step: int, groups: list[Group], decode) -> None:
        """A table of sample trajectories (wandb) and samples.jsonl next to metrics.jsonl."""
        rows = []
        for g in groups[: self.cfg.num_samples]:
            t = g.trajectories[0]
            text = decode(t.token_ids[t.prompt_len :])
            rows.append(
                [step, g.task.id, decode(t.token_ids[: t.prompt_len])[-300:], text, t.reward, t.status.value]
            )
        with open(os.path.join(os.path.dirname(self.path), "samples.jsonl"), "a", encoding="utf-8") as f:
            for r in rows:
                f.write(
                    json.dumps(
                        dict(zip(["step", "task", "prompt", "response", "reward", "status"], r, strict=True))
                    )
                    + "\n"
                )
        if self._wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "task", "prompt", "response", "reward", "status"], data=rows)
            self._wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
