"""Metrics sinks: metrics.jsonl (always), wandb (offline by default), a console progress line.

Key names are a public contract (README "Command line"): users script against them. `batch_metrics`
derives the rollout-side metrics of one training batch from its groups; the trainer adds its own.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slime.core.config import LoggerConfig
from slime.core.types import Group, Trajectory


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _std(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def _quantile(xs: list[float], q: float) -> float:
    """The q-quantile of xs by the nearest-rank method (0 for none)."""
    if not xs:
        return 0.0
    ordered = sorted(xs)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])


def episodes(trajs: list[Trajectory]) -> list[list[Trajectory]]:
    """Trajectories by episode, in order: the segments of one episode (same `episode_id`) together,
    any other trajectory alone."""
    by_key: dict[Any, list[Trajectory]] = {}
    for t in trajs:
        by_key.setdefault(t.episode_id or id(t), []).append(t)
    return list(by_key.values())


def batch_metrics(groups: list[Group], version: int) -> dict[str, float]:
    """Reward, length, turn, tool, context and staleness statistics of the batch trained at `version`.

    Episode-level figures count each episode once however many segments a context limit split it
    into (reward, turns, tool calls and errors, context tokens, response length summed over its
    segments); token-level figures (staleness) take every generated token.
    """
    trajs = [t for g in groups for t in g.trajectories]
    eps = episodes(trajs)
    first = [e[0] for e in eps]
    rewards = [t.reward for t in first]
    tool_calls = [float(t.info.get("tool_calls", 0)) for t in first]
    # Tool errors: calls the loop could not parse, plus those the environment reports as failed.
    tool_errors = [
        float(t.info.get("malformed_tool_calls", 0)) + float((t.info.get("env") or {}).get("tool_errors", 0))
        for t in first
    ]
    context = [float(e[0].info.get("context_tokens", max(len(s.token_ids) for s in e))) for e in eps]
    # Tokens the loss uses (buffer.stale_tokens=mask took the stale ones out), and every generated
    # token (version >= 0; prompt and env tokens carry -1) however old.
    staleness = [version - v for t in trajs for v, m in zip(t.versions, t.loss_mask, strict=True) if m]
    generated = [version - v for t in trajs for v in t.versions if v >= 0]
    seq_stale = [version - t.min_version for t in trajs]
    partial = [e for e in eps if len({v for s in e for v in s.versions if v >= 0}) > 1]
    lengths = [float(sum(s.num_generated for s in e)) for e in eps]
    return {
        "reward/mean": _mean(rewards),
        "reward/std": _std(rewards),
        "reward/max": max(rewards, default=0.0),
        "response/len_mean": _mean(lengths),
        "response/len_max": max(lengths, default=0.0),
        "episode/turns_mean": _mean([float(t.turns) for t in first]),
        "episode/tool_calls_mean": _mean(tool_calls),
        "episode/tool_calls_p50": _quantile(tool_calls, 0.5),
        "episode/tool_calls_p90": _quantile(tool_calls, 0.9),
        "episode/tool_calls_max": max(tool_calls, default=0.0),
        "episode/tool_errors_mean": _mean(tool_errors),
        "episode/context_tokens_mean": _mean(context),
        "episode/context_tokens_max": max(context, default=0.0),
        "episode/truncated_frac": _mean([float(t.status.value == "truncated") for t in first]),
        "episode/segments_mean": _mean([float(len(e)) for e in eps]),
        "staleness/mean": _mean([float(s) for s in staleness]),
        "staleness/max": float(max(staleness, default=0)),
        "staleness/seq_max": float(max(seq_stale, default=0)),
        "staleness/token_max": float(max(generated, default=0)),
        "rollout/partial_episodes": float(len(partial)),
        "batch/trajectories": float(len(trajs)),
        "batch/episodes": float(len(eps)),
    }


def eval_metrics(groups: list[Group], success: float) -> dict[str, float]:
    """Evaluation figures of `groups` (each the n samples of one held-out task): mean reward and
    length, pass@1 (share of samples with reward >= `success`) and pass@k (share of tasks with at
    least one such sample among its k = n)."""
    trajs = [t for g in groups for t in g.trajectories]
    solved = [[t.reward >= success for t in g.trajectories] for g in groups]
    return {
        "eval/reward_mean": _mean([t.reward for t in trajs]),
        "eval/reward_std": _std([t.reward for t in trajs]),
        "eval/pass@1": _mean([float(s) for task in solved for s in task]),
        "eval/pass@k": _mean([float(any(task)) for task in solved]),
        "eval/k": float(max((len(g.trajectories) for g in groups), default=0)),
        "eval/len_mean": _mean([float(t.num_generated) for t in trajs]),
        "eval/turns_mean": _mean([float(t.turns) for t in trajs]),
        "eval/failed": float(sum(t.status.value == "failed" for t in trajs)),
        "eval/num_tasks": float(len(groups)),
    }


def truncate_from_step(path: str, start_step: int) -> None:
    """Cut an append-only JSONL log (one row per step, e.g. metrics.jsonl) before the first row of
    step >= start_step: a resumed run trains those steps again and logs them once more."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if int(row.get("step", 0)) >= start_step:
            break
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, path)


@dataclass(frozen=True)
class StepTimes:
    """Wall-clock split of one controller step, in seconds."""

    step_s: float  # since the previous step ended
    train_s: float  # the trainer's optimizer step
    sync_s: float  # export + every engine's weight load
    wait_s: float  # waiting for the buffer to hand over a full batch
    gen_s: float = 0.0  # the busiest rollout worker's time with episodes in flight, weight loads left out
    load_s: float = 0.0  # the slowest engine's weight load (part of sync_s; the engines pause for it)


def overlap_efficiency(times: StepTimes) -> float:
    """How close a step came to perfect overlap of generation and training (1 = perfect).

    With generation time G, training time T and weight push P per batch, fully overlapped rollout
    and training deliver one batch every max(G, T) + P. Inside a run the engines keep generating
    while the trainer exports (only the engines' weight load L pauses them), so the bound used here
    is the longer of the two critical paths, max(G + L, T + P), which is max(G, T) + P when the whole
    push pauses generation; divided by the measured step time. A synchronous run, G + T + P per
    batch, scores max(G + L, T + P) over that.
    """
    if times.step_s <= 0:
        return 0.0
    return max(times.gen_s + times.load_s, times.train_s + times.sync_s) / times.step_s


def step_row(
    step: int,
    version: int,
    batch: dict[str, float],
    trainer: dict[str, float],
    buffer: dict[str, Any],
    sync: dict[str, float],
    times: StepTimes,
    rollout_tokens: int,
    restarts: int = 0,
) -> dict[str, Any]:
    """The one metrics row of a trainer step, as metrics.jsonl and wandb receive it.

    `version` is the policy version after the step; `batch` the batch's rollout figures at the
    version it trained at, `version - 1` (`batch_metrics`, computed where the groups are);
    `buffer` is the buffer's counters since the previous step ({} when replaying recorded groups);
    `rollout_tokens` is what every engine generated since the previous step; `restarts` counts
    rollout worker restarts since the run (or its resume) began.
    """
    row: dict[str, Any] = {"step": step, "version": version, **batch, **trainer}
    row.update({k: v for k, v in buffer.items() if k != "episode/failure_reasons"})
    row.update(sync)
    row.update(
        {
            "time/step_s": times.step_s,
            "time/train_s": times.train_s,
            "time/sync_s": times.sync_s,
            "time/wait_s": times.wait_s,
            "time/gen_s": times.gen_s,
            "perf/overlap_efficiency": overlap_efficiency(times),
            "perf/trainer_idle_frac": max(0.0, 1.0 - times.train_s / times.step_s),
            "perf/rollout_tokens_per_s": rollout_tokens / times.step_s,
            "perf/samples_per_s": trainer.get("train/sequences", 0.0) / times.step_s,
            "rollout/restarts": restarts,
        }
    )
    return row


# Metric-name sections (the part before the first "/"): wandb groups its panels by them; each is
# plotted against `step` rather than wandb's own row counter.
METRIC_SECTIONS = (
    "reward",
    "eval",
    "response",
    "episode",
    "staleness",
    "time",
    "perf",
    "mismatch",
    "loss",
    "is_ratio",
    "moe",
    "buffer",
    "batch",
    "train",
    "sync",
    "rollout",
)

# Columns of a sample row (wandb table and samples.jsonl).
SAMPLE_COLUMNS = ("step", "task", "prompt", "response", "reward", "status", "turns", "tool_calls", "segments")


def define_sections(run: Any) -> None:
    """Declare `step` as the x-axis of every metric on a wandb run, section by section (then every
    other key), so the dashboard shows one panel group per section, all against the trainer step."""
    run.define_metric("step")
    for section in METRIC_SECTIONS:
        run.define_metric(f"{section}/*", step_metric="step")
    run.define_metric("*", step_metric="step")


def render_turns(t: Trajectory, decode: Callable[[list[int]], str]) -> str:
    """Everything after the first prompt, span by span: each generated turn opened by the policy
    version(s) that produced it (`[v3]`, or `[v3->v4]` for a turn a weight push reached mid-way),
    environment messages as the chat template renders them."""
    out: list[str] = []
    start = t.prompt_len
    n = len(t.token_ids)
    while start < n:
        generated = bool(t.loss_mask[start]) or t.versions[start] >= 0
        end = start
        while end < n and (bool(t.loss_mask[end]) or t.versions[end] >= 0) == generated:
            end += 1
        text = decode(t.token_ids[start:end])
        if generated:
            vs = [v for v in t.versions[start:end] if v >= 0]
            tag = f"[v{vs[0]}]" if vs[0] == vs[-1] else f"[v{vs[0]}->v{vs[-1]}]"
            text = f"{tag} {text}"
        out.append(text)
        start = end
    return "".join(out)


def sample_rows(step: int, groups: list[Group], decode: Callable[[list[int]], str]) -> list[dict[str, Any]]:
    """One row per group (the last segment of its first episode): the whole decoded conversation,
    untruncated.

    `prompt` is the segment's first prompt (system message, tools, task; under a context limit, the
    compacted context) and `response` everything after it: every assistant turn tagged with the
    policy version that generated it (`render_turns`), and every environment message appended
    between turns, with the chat template's markers as `decode` renders them. Also the task id,
    reward, status, turns, tool calls and segments.
    """
    rows = []
    for g in groups:
        t = episodes(g.trajectories)[0][-1]
        rows.append(
            {
                "step": step,
                "task": g.task.id,
                "prompt": decode(t.token_ids[: t.prompt_len]),
                "response": render_turns(t, decode),
                "reward": t.reward,
                "status": t.status.value,
                "turns": t.turns,
                "tool_calls": int(t.info.get("tool_calls", 0)),
                "segments": t.segment + 1,
            }
        )
    return rows


class MetricsLogger:
    """Writes one JSON object per trainer step to metrics.jsonl, mirrors it to wandb and the console."""

    def __init__(
        self,
        run_dir: str,
        cfg: LoggerConfig,
        config: dict[str, Any],
        total_steps: int,
        resume_step: int | None = None,
        wandb_run_id: str | None = None,
    ) -> None:
        """A resumed run passes the checkpoint's step as `resume_step` and its `wandb_run_id`: rows the killed run
        wrote after that checkpoint are cut from metrics.jsonl (they are trained again), so every step
        appears once, and wandb continues the same run."""
        self.cfg = cfg
        self.total_steps = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            truncate_from_step(self.path, resume_step)
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
                id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
                settings=wandb.Settings(console="off", silent=True),
            )
            define_sections(self._wandb)

    @property
    def wandb_run_id(self) -> str | None:
        return self._wandb.id if self._wandb is not None else None

    def log(self, metrics: dict[str, Any]) -> None:
        row = {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            # No `step=`: every key is plotted against the row's own `step` (define_sections), so
            # evaluation rows, which finish out of step order, need no monotonic wandb counter.
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, int | float)})
        if self.cfg.console and not row.get("eval"):
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
            f"mfu {m.get('perf/mfu', 0):.0%} "
            f"step {m.get('time/step_s', 0):.1f}s idle {m.get('perf/trainer_idle_frac', 0):.0%} [{elapsed:.0f}s]"
        )
        print(line, file=sys.stderr, flush=True)

    def log_samples(self, step: int, groups: list[Group], decode: Callable[[list[int]], str]) -> None:
        """A table of sample trajectories (wandb, key `samples`) and the same rows appended to
        samples.jsonl next to metrics.jsonl: see `sample_rows`."""
        rows = sample_rows(step, groups[: self.cfg.num_samples], decode)
        with open(os.path.join(os.path.dirname(self.path), "samples.jsonl"), "a", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        if self._wandb is not None:
            import wandb

            table = wandb.Table(
                columns=list(SAMPLE_COLUMNS), data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows]
            )
            self._wandb.log({"samples": table, "step": step})

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
