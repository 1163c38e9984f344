"""Trained samples per second with 1, 2 and 4 rollout workers, on a tool-latency workload (where engines
wait on tools, so more of them help even on a 2-core machine) and on the tiny default workload.

    python -m benchmarks.workers [--steps 10] [--workers 1 2 4]

Both workloads run the tiny model asynchronously (staleness 1). `latency`: `long_tail` episodes of 2-4
turns at a median 1.5 s per tool step (lognormal, sigma 0.5); `tiny`: `+experiment=tiny`, single-turn
`target`. The first step (engine warm-up) is left out of the rates.
"""

from __future__ import annotations

import argparse
import os
import tempfile

WORKLOADS = {
    "latency": [
        "+experiment=tiny",
        "env=long_tail",
        "rollout.stop=[' ']",
        "rollout.max_tokens_per_turn=8",
        "rollout.max_turns=6",
        "env.kwargs.latency_sigma=0.5",
        "env.dataset.kwargs.slow_share=0",
        "env.dataset.kwargs.fast_turns=[2,4]",
        "env.dataset.kwargs.fast_step_s=1.5",
        "rollout.max_concurrent_groups=4",
    ],
    "tiny": ["+experiment=tiny"],
}


def rate(rows: list[dict]) -> tuple[float, float]:
    """(trained samples per second, mean step seconds) over the steps after the first."""
    steady = rows[1:] or rows
    wall = sum(r["time/step_s"] for r in steady)
    return sum(r["batch/trajectories"] for r in steady) / wall, wall / len(steady)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    args = ap.parse_args()
    from slime import api

    out = tempfile.mkdtemp(prefix="slime-workers-")
    print(f"{'workload':<9} {'workers':>7} {'samples/s':>10} {'vs 1':>6} {'step s':>7}")
    for name in args.workloads:
        base = None
        for n in args.workers:
            overrides = [
                *WORKLOADS[name],
                f"rollout.num_workers={n}",
                "rollout.kv_cache_gib=0.25",
                f"trainer.steps={args.steps}",
                "buffer.max_staleness=1",
                "logger.mode=disabled",
            ]
            rows = api.run(overrides, run_dir=os.path.join(out, f"{name}-{n}"))
            samples, step_s = rate(rows)
            base = base or samples
            print(f"{name:<9} {n:>7} {samples:>10.2f} {samples / base:>5.2f}x {step_s:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
