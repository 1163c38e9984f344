"""Is asynchronous training safe? Staleness 0, 1, 2, 4, with and without off-policy correction.

    python -m benchmarks.staleness_study                 # docs/staleness_study.{png,json}, staleness_table.md
    python -m benchmarks.staleness_study --steps 30 --out docs
    python -m benchmarks.staleness_study --replot docs/staleness_study.json   # redraw from saved results

Every run uses the same learnable task (`+experiment=tiny`: a tiny random model on the `target`
env), the same seed and the same number of steps; only `buffer.max_staleness` and
`algorithm.off_policy` change. "Correction" is truncated importance sampling against the engine's
behaviour logprobs (`off_policy=tis`); "none" clips the PPO ratio directly against the behaviour
logprobs, i.e. ignores that the data may be several versions old.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from slime import api

STALENESS = (0, 1, 2, 4)
CORRECTIONS = ("tis", "none")


def _smooth(xs: list[float], k: int = 3) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def _steps_to(rewards: list[float], level: float) -> int | None:
    """First trainer step (1-based) at which the 3-step moving average reaches `level`."""
    return next((i + 1 for i, r in enumerate(_smooth(rewards)) if r >= level), None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="docs")
    p.add_argument("--replot", help="a staleness_study.json to redraw the figure and table from (no runs)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        report(saved["overrides"], saved["results"], args.out)
        return
    base = ["+experiment=tiny", f"trainer.steps={args.steps}", *args.overrides]
    work = tempfile.mkdtemp(prefix="slime-study-")
    results: dict[str, dict] = {}
    for corr in CORRECTIONS:
        for s in STALENESS:
            name = f"staleness={s} off_policy={corr}"
            t0 = time.perf_counter()
            rows = api.run(
                [*base, f"buffer.max_staleness={s}", f"algorithm.off_policy={corr}"], os.path.join(work, name)
            )
            rewards = [r["reward/mean"] for r in rows]
            k = max(1, len(rows) // 5)
            results[name] = {
                "staleness": s,
                "correction": corr,
                "rewards": rewards,
                "first20": sum(rewards[:k]) / k,
                "last20": sum(rewards[-k:]) / k,
                "stale_mean": sum(r["staleness/mean"] for r in rows) / len(rows),
                "stale_max": max(r["staleness/max"] for r in rows),
                "samples_per_s": sum(r["batch/trajectories"] for r in rows[1:])
                / max(1e-9, sum(r["time/step_s"] for r in rows[1:])),
                "mismatch": sum(r["mismatch/logprob_abs"] for r in rows) / len(rows),
                "wall_s": time.perf_counter() - t0,
            }
            print(
                f"{name}: reward {results[name]['first20']:.3f} -> {results[name]['last20']:.3f}", flush=True
            )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "staleness_study.json"), "w") as f:
        json.dump({"overrides": base, "results": results}, f, indent=1)
    report(base, results, args.out)


def report(base: list[str], results: dict[str, dict], out: str) -> None:
    """Write staleness_study.png and staleness_table.md into `out` and print the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, corr in zip(axes, CORRECTIONS, strict=True):
        for s in STALENESS:
            r = results[f"staleness={s} off_policy={corr}"]
            ax.plot(range(1, len(r["rewards"]) + 1), _smooth(r["rewards"]), label=f"max_staleness={s}")
        ax.set_title(f"off_policy={corr}")
        ax.set_xlabel("trainer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean reward (3-step moving average)")
    axes[0].legend()
    fig.suptitle(" ".join(base))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "staleness_study.png"), dpi=110)

    lines = [
        "| max_staleness | off_policy | reward first 20% | reward last 20% | steps to 0.9 | "
        "staleness mean / max | samples/s | mismatch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        reach = _steps_to(r["rewards"], 0.9)
        lines.append(
            f"| {r['staleness']} | {r['correction']} | {r['first20']:.3f} | {r['last20']:.3f} | "
            f"{reach if reach is not None else 'never'} | {r['stale_mean']:.2f} / {r['stale_max']:.0f} | "
            f"{r['samples_per_s']:.2f} | {r['mismatch']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, "staleness_table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
