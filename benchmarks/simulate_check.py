"""The scheduling simulator (slime/simulate/) against measured runs: figures in docs/scaling.md.

    python -m benchmarks.simulate_check run OUT_DIR [--steps 16] [--only sync ...]   # the runs, one at a time
    python -m benchmarks.simulate_check pack OUT_DIR docs/scaling_runs               # one small JSON per run
    python -m benchmarks.simulate_check report docs/scaling_runs/round1 docs/scaling_runs/round2 [--reference async_s1]

Every run is the tiny model (`+experiment=tiny`) with one engine thread and one trainer thread
pinned (`rollout.threads_per_worker=1 trainer.threads_per_rank=1`), so that an engine and the
trainer cost the same in every mode and the simulator's job is the scheduling: with the auto
thread budget a synchronous run gives each phase both cores and an asynchronous one half
(slime/core/cores.py), which changes the speeds themselves. `run` records the machine's load
(`uptime`) before and after each run in `load.txt`.

`report` calibrates on one run (`--reference`, of the first round; every step after the first),
puts that fit on each other run's shape (its config) and workload (its recorded episodes: turns,
tokens, tool seconds; the share of tokens the trainer skipped), and compares the predicted mean step
time with the measured one (every step after the first). Then, per round, the same from every run's
calibration to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PINNED = ["+experiment=tiny", "rollout.threads_per_worker=1", "trainer.threads_per_rank=1"]
TOOL = [
    "env=long_tail",
    "rollout.stop=[' ']",
    "rollout.max_tokens_per_turn=8",
    "rollout.max_turns=6",
    "env.dataset.kwargs.slow_share=0",
    "env.dataset.kwargs.fast_turns=[2,4]",
    "env.dataset.kwargs.fast_step_s=1.0",
]
CONFIGS = {
    "sync": ["buffer.max_staleness=0"],
    "async_s1": ["buffer.max_staleness=1"],
    "workers2": ["buffer.max_staleness=1", "rollout.num_workers=2"],
    "tool_s1": ["buffer.max_staleness=1", *TOOL],
    "tool_sync": ["buffer.max_staleness=0", *TOOL],
}
DESCRIBE = {
    "sync": "sync (S=0), 1 engine",
    "async_s1": "async (S=1), 1 engine",
    "workers2": "async (S=1), 2 engines",
    "tool_s1": "tool latency 1 s x 2-4 turns, S=1",
    "tool_sync": "tool latency 1 s x 2-4 turns, S=0",
}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(out: str, steps: int, only: list[str]) -> None:
    for name in only or list(CONFIGS):
        run_dir = os.path.join(out, name)
        cmd = [
            sys.executable,
            "-m",
            "slime.train",
            *PINNED,
            f"trainer.steps={steps}",
            *CONFIGS[name],
            f"hydra.run.dir={run_dir}",
        ]
        before = _uptime()
        print(f"{name}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(run_dir, "load.txt"), "w") as f:
            f.write(f"before: {before}\nafter: {_uptime()}\n")


def _load(text: str) -> str:
    """The 1-minute load averages of `load.txt` (before -> after)."""
    loads = [
        line.split("load average:")[1].split(",")[0].strip() for line in text.splitlines() if "load" in line
    ]
    return " -> ".join(loads)


def pack(out: str, to: str) -> None:
    from slime.simulate.calibration import pack_run, read_run

    os.makedirs(to, exist_ok=True)
    for name in CONFIGS:
        run_dir = os.path.join(out, name)
        if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            continue
        load_file = Path(run_dir) / "load.txt"
        load = _load(load_file.read_text()) if load_file.exists() else ""
        packed = pack_run(read_run(run_dir), name=name, load=load)
        packed["path"] = name
        with open(os.path.join(to, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(packed, f)
        print(f"{to}/{name}.json")


def _runs(where: str) -> dict[str, str]:
    paths = {name: os.path.join(where, f"{name}.json") for name in CONFIGS}
    return {name: p for name, p in paths.items() if os.path.exists(p)}


def report(rounds: list[str], reference: str) -> list[dict]:
    """Calibrate on `reference` of the first round, predict every run of every round; then, within
    each round, every run from every other run's calibration (the error matrix)."""
    from slime.simulate.calibration import calibrate, measured_summary, read_run, retarget
    from slime.simulate.model import predict

    ref_params, _ = calibrate(read_run(_runs(rounds[0])[reference]))
    results = []
    print(
        f"| config | round | load (1 min, before -> after) | measured step s | predicted from `{reference}` "
        "(round 1) | error | trainer idle measured / predicted | staleness mean measured / predicted |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        for i, where in enumerate(rounds, 1):
            path = _runs(where).get(name)
            if path is None:
                continue
            run = read_run(path)
            steps = [int(r["step"]) for r in run.rows[1:]]
            m = measured_summary(run, steps)
            p = predict(retarget(ref_params, run, steps))
            load = json.loads(Path(path).read_text()).get("load", "")
            results.append({"name": name, "round": i, "load": load, "measured": m, "predicted": p})
            print(
                f"| {DESCRIBE[name]} | {i} | {load} | {m['step_s']:.3f} | {p['step_s']:.3f} "
                f"| {p['step_s'] / m['step_s'] - 1:+.1%} | {m['trainer_idle_frac']:.0%} / {p['trainer_idle_frac']:.0%} "
                f"| {m['staleness_mean']:.2f} / {p['staleness_mean']:.2f} |"
            )
    print("\nThe fitted speeds, run by run (every step after the first)\n")
    print(
        "| run | round | engine tok/s, one sequence | s per generate call | trainer s per 1k tokens computed "
        "| trainer fixed s | push s (engines paused) | controller s | tokens skipped | own fit's step error |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    all_fits = []
    for i, where in enumerate(rounds, 1):
        runs = {name: read_run(path) for name, path in _runs(where).items()}
        fits = {name: calibrate(run)[0] for name, run in runs.items()}
        all_fits.append((runs, fits))
        for name, f in fits.items():
            m = measured_summary(runs[name])["step_s"]
            print(
                f"| {name} | {i} | {f.seq_tok_s:.1f} | {f.turn_overhead_s:.3f} | {1000 / f.train_tok_s:.3f} "
                f"| {f.train_fixed_s:.3f} | {f.export_s + f.load_s:.3f} ({f.load_s:.3f}) | {f.overhead_s:.3f} "
                f"| {f.skip_frac:.0%} | {predict(f)['step_s'] / m - 1:+.1%} |"
            )
    for i, (runs, fits) in enumerate(all_fits, 1):
        print(
            f"\nRound {i}: step time error predicting each run (row) from each run's calibration (column)\n"
        )
        print("| predicted \\ calibrated on | " + " | ".join(runs) + " |")
        print("|---|" + "---|" * len(runs))
        for name, run in runs.items():
            steps = [int(r["step"]) for r in run.rows[1:]]
            m = measured_summary(run, steps)["step_s"]
            cells = [f"{predict(retarget(fits[c], run, steps))['step_s'] / m - 1:+.0%}" for c in runs]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out")
    r.add_argument("--steps", type=int, default=16)
    r.add_argument("--only", nargs="*", default=[], choices=list(CONFIGS))
    p = sub.add_parser("pack")
    p.add_argument("out")
    p.add_argument("to")
    q = sub.add_parser("report")
    q.add_argument("rounds", nargs="+", help="folders of packed runs, one per round")
    q.add_argument("--reference", default="async_s1", choices=list(CONFIGS))
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.out, args.steps, args.only)
    elif args.cmd == "pack":
        pack(args.out, args.to)
    else:
        report(args.rounds, args.reference)


if __name__ == "__main__":
    main()
