"""Summarise a run dir: wall time, steps, mean reward over the first and last 20% of steps.

python -m benchmarks.summarize outputs/2026-11-29/12-00-00
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(run_dir: str) -> dict[str, float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not rows:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no rows")
    k = max(1, len(rows) // 5)
    mean = lambda rs: sum(r["reward/mean"] for r in rs) / len(rs)  # noqa: E731
    return {
        "steps": len(rows),
        "wall_s": sum(r["time/step_s"] for r in rows),
        "reward_first20": mean(rows[:k]),
        "reward_last20": mean(rows[-k:]),
        "staleness_max": max(r["staleness/max"] for r in rows),
        "trainer_idle_frac": sum(r["perf/trainer_idle_frac"] for r in rows) / len(rows),
        "rollout_tok_per_s": sum(r["perf/rollout_tokens_per_s"] for r in rows) / len(rows),
    }


if __name__ == "__main__":
    for d in sys.argv[1:]:
        s = summarize(d)
        print(d)
        for key, value in s.items():
            print(f"  {key:<20} {value:.3f}" if isinstance(value, float) else f"  {key:<20} {value}")
