"""Async vs sync on the same workload, in one run: samples/s, trainer idle fraction, their ratio.

    python -m benchmarks.async_vs_sync                       # SmolLM2-135M calculator workload
    python -m benchmarks.async_vs_sync +experiment=tiny trainer.steps=8   # any overrides

Both runs share one Ray cluster and differ only in buffer.max_staleness (1 vs 0). The first step of
each run is excluded from the rates (it includes engine warm-up).
"""

from __future__ import annotations

import os
import sys
import tempfile

from slime import api


def _summary(rows: list[dict]) -> dict[str, float]:
    steady = rows[1:] or rows
    wall = sum(r["time/step_s"] for r in steady)
    samples = sum(r["batch/trajectories"] for r in steady)
    return {
        "steps": len(rows),
        "samples_per_s": samples / wall,
        "trainer_idle_frac": sum(r["perf/trainer_idle_frac"] * r["time/step_s"] for r in steady) / wall,
        "rollout_tok_per_s": sum(r["perf/rollout_tokens_per_s"] * r["time/step_s"] for r in steady) / wall,
        "step_s": wall / len(steady),
        "staleness_max": max(r["staleness/max"] for r in rows),
        "reward_mean": sum(r["reward/mean"] for r in rows) / len(rows),
    }


def main(argv: list[str]) -> None:
    overrides = argv or ["+experiment=calculator", "trainer.steps=8", "logger.mode=disabled"]
    out = tempfile.mkdtemp(prefix="slime-bench-")
    results = {}
    for name, staleness in (("async", 1), ("sync", 0)):
        rows = api.run([*overrides, f"buffer.max_staleness={staleness}"], run_dir=os.path.join(out, name))
        results[name] = _summary(rows)
    a, s = results["async"], results["sync"]
    print(f"\nworkload: {' '.join(overrides)}")
    print(
        f"{'mode':<6} {'samples/s':>10} {'idle':>6} {'gen tok/s':>10} {'step s':>7} {'stale max':>9} {'reward':>7}"
    )
    for name, r in results.items():
        print(
            f"{name:<6} {r['samples_per_s']:>10.3f} {r['trainer_idle_frac']:>6.0%} {r['rollout_tok_per_s']:>10.1f} "
            f"{r['step_s']:>7.1f} {r['staleness_max']:>9.0f} {r['reward_mean']:>7.3f}"
        )
    print(f"async/sync samples-per-second ratio: {a['samples_per_s'] / s['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
