"""Long-horizon workloads: partial rollouts against the drops they replace and against synchronous
training, and asynchronous training overlapping tool latency. Figures: docs/agents.md.

    python -m benchmarks.long_horizon heavy_tail [--steps 16]   # partial (keep, mask), drop_group, sync
    python -m benchmarks.long_horizon latency [--steps 10]      # tool latency median 2 s: async vs sync
    python -m benchmarks.long_horizon report RUN_DIR [RUN_DIR ...]  # any run dir's long-horizon figures

`heavy_tail` runs the `long_tail` workload (envs/long_tail.py) on the tiny model: a tenth of the
tasks take 6 turns at 3 s per step, the rest 1-2 turns at 0.3 s, every step's time spread
lognormally (sigma 0.5); the same tasks and seed in every mode. Per mode it prints the wall time to a
fixed number of trained tokens and to a batch reward threshold, the generated tokens lost and why,
and the slowest quarter's share of trained groups against its share of the issued tickets (the tasks
ranked by their expected duration, turns x step time).

`latency` runs 2-4 turns per episode at a median 2 s per step (lognormal, sigma 0.5; waiting holds
no core) asynchronously (staleness 1 and 2) and synchronously, and prints trained samples per second,
their ratio and the batches in flight: with staleness S, at most (S + 1) batches are in flight
against sync's one. The ratio can pass S + 1: a synchronous batch waits for its slowest group,
while asynchronous batches are made of the groups that finish first (the rest go on).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

TINY_TURNS = ["+experiment=tiny", "env=long_tail", "rollout.stop=[' ']", "rollout.max_tokens_per_turn=8"]
HEAVY_TAIL = [*TINY_TURNS, "rollout.max_turns=8", "env.kwargs.latency_sigma=0.5", "env.dataset.num_tasks=400"]
LATENCY = [
    *TINY_TURNS,
    "rollout.max_turns=6",
    "env.kwargs.latency_sigma=0.5",
    "env.dataset.kwargs.slow_share=0",
    "env.dataset.kwargs.fast_turns=[2,4]",
    "env.dataset.kwargs.fast_step_s=2.0",
    "rollout.max_concurrent_groups=16",
]
HEAVY_MODES = {
    "partial_keep": ["buffer.max_staleness=1", "buffer.stale_tokens=keep"],
    "partial_mask": ["buffer.max_staleness=1", "buffer.stale_tokens=mask"],
    "drop_group": ["buffer.max_staleness=1", "buffer.stale_tokens=drop_group"],
    "sync": ["buffer.max_staleness=0"],
}
LATENCY_MODES = {
    "async_s2": ["buffer.max_staleness=2"],
    "async_s1": ["buffer.max_staleness=1"],
    "sync": ["buffer.max_staleness=0"],
}


def _rows(run_dir: str) -> list[dict[str, Any]]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(x) for x in lines if x.strip()) if not r.get("eval")]


def _cumulative_time(rows: list[dict[str, Any]]) -> list[float]:
    out, t = [], 0.0
    for r in rows:
        t += r["time/step_s"]
        out.append(t)
    return out


def _time_to(rows: list[dict[str, Any]], key: str, target: float, cumulative: bool) -> float | None:
    """Seconds since the loop started until `key` (summed over steps when `cumulative`) reached
    `target`; None when it never did."""
    total = 0.0
    for r, t in zip(rows, _cumulative_time(rows), strict=True):
        total = total + r.get(key, 0.0) if cumulative else r.get(key, 0.0)
        if total >= target:
            return t
    return None


def slowest_quarter(run_dir: str) -> tuple[float, float]:
    """(share of the issued tickets whose task is in the slowest quarter, the same share among the
    trained groups), the tasks ranked by expected duration (turns x step time)."""
    from omegaconf import OmegaConf

    from envs.dataset import load_tasks
    from rollout.worker import TaskSchedule
    from slime.core.config import SlimeConfig

    raw = OmegaConf.load(os.path.join(run_dir, "config.yaml"))
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SlimeConfig), raw))
    tasks = load_tasks(cfg.env, cfg.seed)
    schedule = TaskSchedule(tasks, cfg.seed, cfg.env.dataset.shuffle)
    ranked = sorted(tasks, key=lambda t: t.env_args["turns"] * t.env_args["step_s"], reverse=True)
    slow = {t.id for t in ranked[: len(ranked) // 4]}
    rows = _rows(run_dir)
    issued = int(rows[-1]["buffer/issued"])
    issued_share = sum(schedule(k).id in slow for k in range(issued)) / max(issued, 1)
    trained_lines = (Path(run_dir) / "buffer" / "trained.jsonl").read_text().splitlines()
    trained = [t for line in trained_lines for t in json.loads(line)["tasks"]]
    return issued_share, sum(t in slow for t in trained) / max(len(trained), 1)


def report(run_dir: str, tokens: float, threshold: float) -> dict[str, Any]:
    """The long-horizon figures of one run dir."""
    rows = _rows(run_dir)
    issued_share, trained_share = slowest_quarter(run_dir)
    k = max(1, len(rows) // 5)
    lost = {
        reason: sum(r.get(f"rollout/tokens_lost/{reason}", 0) for r in rows)
        for reason in ("stale", "failed", "zero_variance", "overflow")
    }
    return {
        "steps": len(rows),
        "wall_s": _cumulative_time(rows)[-1],
        "to_tokens_s": _time_to(rows, "train/loss_tokens", tokens, cumulative=True),
        "to_reward_s": _time_to(rows, "reward/mean", threshold, cumulative=False),
        "reward_first20": sum(r["reward/mean"] for r in rows[:k]) / k,
        "reward_last20": sum(r["reward/mean"] for r in rows[-k:]) / k,
        "trained_tokens": sum(r.get("train/loss_tokens", 0.0) for r in rows),
        "tokens_lost": sum(lost.values()),
        "lost": lost,
        "dropped_stale": sum(r.get("buffer/dropped_stale", 0) for r in rows),
        "partial_episodes": sum(r.get("rollout/partial_episodes", 0) for r in rows),
        "token_staleness_max": max(r.get("staleness/token_max", 0) for r in rows),
        "slow_issued": issued_share,
        "slow_trained": trained_share,
        "samples_per_s": sum(r["batch/trajectories"] for r in rows[1:])
        / max(_cumulative_time(rows)[-1] - rows[0]["time/step_s"], 1e-9),
        "tool_calls_mean": sum(r.get("episode/tool_calls_mean", 0.0) for r in rows) / len(rows),
        "turns_mean": sum(r.get("episode/turns_mean", 0.0) for r in rows) / len(rows),
    }


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def heavy_tail(steps: int, tokens: float, threshold: float, out: str) -> None:
    from slime import api

    results = {}
    for name, mode in HEAVY_MODES.items():
        run_dir = os.path.join(out, name)
        api.run([*HEAVY_TAIL, *mode, f"trainer.steps={steps}", "logger.mode=disabled"], run_dir=run_dir)
        results[name] = report(run_dir, tokens, threshold)
    print(f"\nheavy-tailed workload: {' '.join(HEAVY_TAIL)} trainer.steps={steps}")
    print(
        f"{'mode':<13} {'wall s':>7} {f'to {tokens:.0f} tok s':>14} {f'to r>={threshold} s':>11} {'r first/last':>13} "
        f"{'lost tok':>9} {'dropped':>8} {'partial':>8} {'slow 1/4: issued trained':>25}"
    )
    for name, r in results.items():
        print(
            f"{name:<13} {r['wall_s']:>7.0f} {_fmt(r['to_tokens_s']):>14} {_fmt(r['to_reward_s']):>11} "
            f"{r['reward_first20']:>6.2f}/{r['reward_last20']:<6.2f} {r['tokens_lost']:>9.0f} {r['dropped_stale']:>8.0f} "
            f"{r['partial_episodes']:>8.0f} {r['slow_issued']:>12.1%} {r['slow_trained']:>12.1%}"
        )
    print(json.dumps(results, indent=1))


def latency(steps: int, out: str) -> None:
    from slime import api

    results = {}
    for name, mode in LATENCY_MODES.items():
        run_dir = os.path.join(out, name)
        api.run([*LATENCY, *mode, f"trainer.steps={steps}", "logger.mode=disabled"], run_dir=run_dir)
        results[name] = report(run_dir, 0.0, 2.0)
    sync = results["sync"]["samples_per_s"]
    print(f"\ntool-latency workload: {' '.join(LATENCY)} trainer.steps={steps}")
    print(f"{'mode':<9} {'samples/s':>10} {'vs sync':>8} {'in flight':>9} {'wall s':>7} {'turns':>6}")
    for name, r in results.items():
        s = int(next(m for m in LATENCY_MODES[name] if "max_staleness" in m).split("=")[1])
        print(
            f"{name:<9} {r['samples_per_s']:>10.3f} {r['samples_per_s'] / sync:>7.2f}x {s + 1:>9} "
            f"{r['wall_s']:>7.0f} {r['turns_mean']:>6.2f}"
        )
    print(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["heavy_tail", "latency", "report"])
    ap.add_argument("run_dirs", nargs="*", help="report: run dirs")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--tokens", type=float, default=400.0, help="heavy_tail: trained tokens to reach")
    ap.add_argument("--threshold", type=float, default=0.8, help="heavy_tail: batch reward to reach")
    ap.add_argument("--out", default=None, help="where the runs go (default: a temporary dir)")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="slime-long-horizon-")
    if args.what == "heavy_tail":
        heavy_tail(args.steps, args.tokens, args.threshold, out)
    elif args.what == "latency":
        latency(args.steps, out)
    else:
        for d in args.run_dirs:
            print(d, json.dumps(report(d, args.tokens, args.threshold), indent=1))


if __name__ == "__main__":
    main()
