"""The sizing study of docs/scaling.md: a GLM-5-shaped agentic workload in the scheduling simulator
(slime/simulate/). Every number in GLM5 below is an assumption, said where it comes from in
docs/scaling.md; nothing here was measured on such hardware.

    python -m benchmarks.sizing [--out docs] [--steps 12]     # the grid, docs/scaling_sizing.json, docs/scaling.png
    python -m benchmarks.sizing --table docs/scaling_sizing.json   # the tables again, without simulating
    python -m benchmarks.sizing --set seq_tok_s=30 --sweep num_workers=4,8,16   # other points of GLM5

Units: an engine is one inference instance on one 8-GPU node; a trainer rank is one 8-GPU node's
share of the training job (its trained tokens/s). The grid varies the engines for 16 trainer
ranks, and the staleness bound.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from slime.simulate.model import simulate, summarize
from slime.simulate.params import Dist, Params

RANKS = 16
GLM5 = Params(
    # engine: one 8-GPU node serving a ~40B-active MoE in FP8; one sequence alone decodes ~60 tok/s,
    # a full node saturates near seq_tok_s * b_sat = 6,000 tok/s; 256 sequences fit its KV cache
    seq_tok_s=60.0,
    b_sat=100.0,
    max_concurrent_groups=32,
    group_size=8,
    turn_overhead_s=0.3,  # prefill of each turn's new tokens (the tool result) and scheduling
    # episodes: 20-50 turns, ~275 generated tokens a turn (reasoning + a tool call), a tool answer of
    # ~800 tokens after each, tool latency median 2 s with a heavy tail (lognormal sigma 1)
    turns=Dist("randint", 20, 50),
    tokens_per_turn=Dist("lognormal", 200.0, 0.8),
    latency_s=Dist("lognormal", 2.0, 1.0),
    prompt_tokens=3000.0,
    env_tokens_per_turn=800.0,
    # trainer: 64 groups of 8 per step; one rank (an 8-GPU node) trains ~5,000 tokens/s of the
    # ~40B-active model (forward for old logprobs + forward/backward), 10 s fixed per step
    batch_groups=64,
    num_ranks=RANKS,
    train_tok_s=5000.0,
    train_fixed_s=10.0,
    # push: 20 s to gather and send ~750B parameters while the engines decode, 10 s of load pause
    export_s=20.0,
    load_s=10.0,
    overhead_s=1.0,
    max_staleness=1,
    steps=12,
    warmup=4,
)
ENGINES = [2, 3, 4, 6, 8, 12, 16, 24]
LATENCY_ENGINES = [4, 8, 16]  # the sensitivity sweep's engines
STALENESS = [0, 1, 2, 4]
LATENCIES = [0.5, 2.0, 8.0]  # median tool seconds: the sensitivity sweep (S = 2 and sync)


def grid(steps: int) -> list[dict]:
    out = []
    points = [(e, s, 2.0) for s in STALENESS for e in ENGINES]
    points += [(e, s, lat) for lat in LATENCIES if lat != 2.0 for s in (0, 2) for e in LATENCY_ENGINES]
    for engines, staleness, latency in points:
        p = GLM5.with_(
            num_workers=engines,
            max_staleness=staleness,
            latency_s=Dist("lognormal", latency, 1.0),
            steps=steps,
        )
        t0 = time.perf_counter()
        s = summarize(simulate(p), p.warmup)
        out.append({"engines": engines, "staleness": staleness, "latency_median_s": latency, **s})
        print(
            f"engines {engines:>2} S {staleness} latency {latency:>4}: step {s['step_s']:7.1f}s "
            f"idle {s['trainer_idle_frac']:4.0%} samples/s {s['samples_s']:.3f} stale {s['staleness_mean']:.2f} "
            f"window {s['window_full_frac']:4.0%} slots {s['slots_full_frac']:4.0%} "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    return out


def ideal() -> dict[str, float]:
    """Back-of-envelope figures of GLM5: tokens per episode and batch, the trainer's step."""
    turns = GLM5.turns.mean()
    gen = turns * GLM5.tokens_per_turn.mean()
    trained = GLM5.prompt_tokens + gen + GLM5.env_tokens_per_turn * (turns - 1)
    episodes = GLM5.batch_groups * GLM5.group_size
    train = GLM5.train_fixed_s + episodes * trained / (GLM5.train_tok_s * GLM5.num_ranks)
    return {
        "turns": turns,
        "generated_per_episode": gen,
        "trained_per_episode": trained,
        "episodes_per_step": episodes,
        "train_s": train,
        "push_s": GLM5.export_s + GLM5.load_s,
        "trainer_bound_step_s": train + GLM5.export_s + GLM5.load_s,
    }


def bottleneck(r: dict) -> str:
    """What bounds a grid point's throughput: the slowest group of each batch (synchronous), the
    engines (every loop busy most of the time), the trainer (idle no more than the push), or else
    the staleness window (loops wait for tickets while the trainer waits for groups)."""
    if r["staleness"] == 0:
        return "slowest group"
    if r["slots_full_frac"] >= 0.5:
        return "engines"
    push = GLM5.export_s + GLM5.load_s + GLM5.overhead_s
    if r["trainer_idle_frac"] <= (push + 10.0) / r["step_s"]:
        return "trainer"
    return "staleness window"


def tables(rows: list[dict]) -> None:
    base = [r for r in rows if r["latency_median_s"] == 2.0]
    print("| engines per trainer rank | " + " | ".join(f"S={s}" if s else "sync" for s in STALENESS) + " |")
    print("|---|" + "---|" * len(STALENESS))
    for e in ENGINES:
        cells = []
        for s in STALENESS:
            r = next(r for r in base if r["engines"] == e and r["staleness"] == s)
            cells.append(f"{r['step_s']:.0f} s, idle {r['trainer_idle_frac']:.0%}, {bottleneck(r)}")
        print(f"| {e / RANKS:.3g} ({e} engines) | " + " | ".join(cells) + " |")
    print()
    print(
        "| engines per rank | S | samples/s | x sync | idle | staleness mean / max | window full | all slots busy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for e in ENGINES:
        sync = next(r for r in base if r["engines"] == e and r["staleness"] == 0)
        for s in STALENESS:
            r = next(r for r in base if r["engines"] == e and r["staleness"] == s)
            print(
                f"| {e / RANKS:.3g} | {s} | {r['samples_s']:.3f} | {r['samples_s'] / sync['samples_s']:.2f} "
                f"| {r['trainer_idle_frac']:.0%} | {r['staleness_mean']:.2f} / {r['staleness_max']:.0f} "
                f"| {r['window_full_frac']:.0%} | {r['slots_full_frac']:.0%} |"
            )
    print()
    print("| tool latency median | engines per rank | sync samples/s | S=2 samples/s | x sync | S=2 idle |")
    print("|---|---|---|---|---|---|")
    for lat in LATENCIES:
        for e in LATENCY_ENGINES:
            sync = next(
                r for r in rows if r["latency_median_s"] == lat and r["engines"] == e and r["staleness"] == 0
            )
            s2 = next(
                r for r in rows if r["latency_median_s"] == lat and r["engines"] == e and r["staleness"] == 2
            )
            print(
                f"| {lat:g} s | {e / RANKS:.3g} | {sync['samples_s']:.3f} | {s2['samples_s']:.3f} "
                f"| {s2['samples_s'] / sync['samples_s']:.2f} | {s2['trainer_idle_frac']:.0%} |"
            )


MARKERS = {"slowest group": "D", "engines": "o", "staleness window": "s", "trainer": "^"}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    base = [r for r in rows if r["latency_median_s"] == 2.0]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    x = [e / RANKS for e in ENGINES]
    bound = ideal()
    for s in STALENESS:
        rs = [next(r for r in base if r["engines"] == e and r["staleness"] == s) for e in ENGINES]
        label = "sync" if s == 0 else f"async S={s}"
        (line,) = axes[0].plot(x, [r["samples_s"] for r in rs], label=label)
        for xi, r in zip(x, rs, strict=True):
            axes[0].plot(xi, r["samples_s"], MARKERS[bottleneck(r)], color=line.get_color())
        axes[1].plot(x, [r["trainer_idle_frac"] for r in rs], marker="o", color=line.get_color(), label=label)
        axes[2].plot(x, [r["staleness_mean"] for r in rs], marker="o", color=line.get_color(), label=label)
    trainer_rate = bound["episodes_per_step"] / bound["trainer_bound_step_s"]
    axes[0].axhline(trainer_rate, color="grey", ls=":")
    handles, _ = axes[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", ls=":", label="trainer bound: 512 / (T + P)")]
    handles += [
        Line2D([], [], color="black", marker=m, ls="", label=f"bound by: {name}")
        for name, m in MARKERS.items()
    ]
    axes[0].legend(handles=handles, fontsize=7, loc="lower right")
    axes[0].set_ylabel("trained episodes / s")
    axes[1].set_ylabel("trainer idle (share of step; the push alone is 10%)")
    axes[2].set_ylabel("staleness of trained tokens, mean (versions)")
    titles = ("throughput, and what bounds it", "trainer idle", "what the overlap costs: staleness")
    for i, (ax, title) in enumerate(zip(axes, titles, strict=True)):
        ax.set_xlabel("engines (8-GPU nodes) per trainer rank (8-GPU node)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if i:
            ax.legend(fontsize=8)
    fig.suptitle(
        "GLM-5-shaped agentic RL in slime.simulate (assumed speeds, docs/scaling.md; 16 trainer ranks, "
        "64 groups x 8 episodes per step)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--table", help="print the tables (and redraw the plot) from this JSON instead")
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...")
    args = ap.parse_args()
    if args.sweep or args.settings:  # other points of GLM5, as slime.simulate's --set/--sweep
        from slime.simulate.cli import COLUMNS, _figures, _sweep_grid, _table
        from slime.simulate.model import predict
        from slime.simulate.params import parse_setting

        base = GLM5.with_(**dict(parse_setting(x) for x in args.settings))
        grid_ = _sweep_grid(args.sweep) if args.sweep else [{}]
        keys = list(grid_[0])
        rows_ = [[str(c[k]) for k in keys] + _figures(predict(base.with_(**c))) for c in grid_]
        print(_table(keys + [h for _, h, _ in COLUMNS], rows_))
        return
    if args.table:
        with open(args.table) as f:
            rows = json.load(f)["grid"]
    else:
        rows = grid(args.steps)
        with open(os.path.join(args.out, "scaling_sizing.json"), "w") as f:
            json.dump({"assumptions": ideal(), "grid": rows}, f, indent=1)
    tables(rows)
    plot(rows, os.path.join(args.out, "scaling.png"))


if __name__ == "__main__":
    main()
