"""How far off-policy can training go? Staleness 0, 1, 2, 4 and 8 with the old and the new corrections.

    python -m benchmarks.staleness_study                                  # the tiny grid, docs/
    python -m benchmarks.staleness_study --setting smollm2 --steps 30     # SmolLM2-135M, calculator
    python -m benchmarks.staleness_study --staleness 4 --corrections tis m2 --steps 20
    python -m benchmarks.staleness_study --replot docs/staleness_study.json   # redraw from saved results
    python -m benchmarks.staleness_study --cost                           # cost of the corrections
    python -m benchmarks.staleness_study --staleness 0 4 --corrections tis none m2 ess geo --repeats 3

Every run of a setting uses the same task, seed and number of steps (so the same number of trained
samples: steps x trainer.batch_groups x rollout.group_size); only `buffer.max_staleness` and the
correction change. Results go to `<out>/staleness_study[_<setting>].json` after every run, and a run
already there is not repeated: an interrupted grid resumes where it stopped (`--fresh` starts over).
`--repeats N` runs every cell N times (repeat k with `seed=k`: other tasks, other samples); the table
and the figure average a cell's repeats, reward curve by curve, and list each repeat's last 20%. One
run of the tiny setting is not enough to rank corrections: its take-off step varies from run to run.

Settings:
- `tiny`: `+experiment=tiny`, the tiny random Llama learning the `target` env (reward: the share of
  lowercase words), lr 5e-2, 4 groups of 4 per step: a policy that moves a lot per version.
- `smollm2`: `+experiment=calculator`, SmolLM2-135M-Instruct on calculator word problems with the tool,
  lr 5e-5.

Corrections (`CORRECTIONS`): the old `tis` (the default: clip at pi_prox, min(pi_prox / mu, 2)) and
`none` (PPO clipped straight at mu), and the new ones of trainer/importance.py, all with
`off_policy=factored` (the discrepancy factor truncated at 2 as before):
- `m2`: the staleness factor untruncated inside M2PO's second-moment trust region (m2_tau 0.04);
- `ess`: the staleness factor truncated at 2, each step's learning rate times the ESS (VCPO-style);
- `geo`: the staleness factor's geometric mean per sequence masked to [0.5, 2].
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import traceback

STALENESS = (0, 1, 2, 4, 8)
FACTORED = ["algorithm.off_policy=factored"]
CORRECTIONS: dict[str, list[str]] = {
    "tis": ["algorithm.off_policy=tis"],
    "none": ["algorithm.off_policy=none"],
    "m2": [*FACTORED, "algorithm.staleness.mode=m2"],
    "ess": [*FACTORED, "algorithm.ess_lr_power=1.0"],
    "geo": [
        *FACTORED,
        "algorithm.staleness.level=geomean",
        "algorithm.staleness.mode=mask",
        "algorithm.staleness.low=0.5",
        "algorithm.staleness.high=2.0",
    ],
}
SETTINGS: dict[str, list[str]] = {
    "tiny": ["+experiment=tiny"],
    "smollm2": ["+experiment=calculator", "logger.sample_every=0", "trainer.save_every=0"],
}
# Per-step metrics averaged into the table (absent ones are left out).
MEANS = (
    "mismatch/logprob_abs",
    "offpolicy/ess",
    "offpolicy/ess_raw",
    "offpolicy/log_ratio_m2",
    "offpolicy/lr_scale",
    "masked_frac",
    "is_truncated_frac",
    "time/train_s",
)


def _smooth(xs: list[float], k: int = 3) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def _steps_to(rewards: list[float], level: float) -> int | None:
    """First trainer step (1-based) at which the 3-step moving average reaches `level`."""
    return next((i + 1 for i, r in enumerate(_smooth(rewards)) if r >= level - 1e-9), None)


def _name(s: int, corr: str, repeat: int = 0) -> str:
    """A run's key in the results; repeat 0 keeps the name runs had before `--repeats`."""
    return f"staleness={s} {corr}" + (f" repeat={repeat}" if repeat else "")


def _cells(results: dict[str, dict]) -> dict[tuple[int, str], dict]:
    """Each (staleness, correction) cell's repeats averaged: the mean reward curve (over the steps all
    repeats have), the mean of every number, and `last20_each` with each repeat's last 20%."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["staleness"], r["correction"]), []).append(r)
    cells = {}
    for key, runs in groups.items():
        n = min(len(r["rewards"]) for r in runs)
        cell = {k: v for k, v in runs[0].items() if not isinstance(v, (int, float)) or isinstance(v, bool)}
        for k in {k for r in runs for k, v in r.items() if isinstance(v, (int, float))}:
            vals = [r[k] for r in runs if k in r]
            cell[k] = sum(vals) / len(vals)
        cell["staleness"], cell["correction"] = key
        cell["stale_max"] = max(r["stale_max"] for r in runs)
        cell["rewards"] = [sum(r["rewards"][i] for r in runs) / len(runs) for i in range(n)]
        cell["last20_each"] = [r["last20"] for r in runs]
        cells[key] = cell
    return cells


def summarise(s: int, corr: str, rows: list[dict], wall_s: float) -> dict:
    rewards = [r["reward/mean"] for r in rows]
    k = max(1, len(rows) // 5)
    out = {
        "staleness": s,
        "correction": corr,
        "rewards": rewards,
        "first20": sum(rewards[:k]) / k,
        "last20": sum(rewards[-k:]) / k,
        "stale_mean": sum(r["staleness/mean"] for r in rows) / len(rows),
        "stale_max": max(r["staleness/max"] for r in rows),
        "wall_s": wall_s,
    }
    for key in MEANS:
        vals = [r[key] for r in rows if key in r and math.isfinite(r[key])]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--setting", choices=sorted(SETTINGS), default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--staleness", type=int, nargs="*", default=list(STALENESS))
    p.add_argument(
        "--corrections", nargs="*", default=["tis", "none", "m2", "ess"], choices=sorted(CORRECTIONS)
    )
    p.add_argument("--repeats", type=int, default=1, help="runs per cell (repeat k with seed=k)")
    p.add_argument("--out", default="docs")
    p.add_argument("--fresh", action="store_true", help="ignore results already saved")
    p.add_argument("--replot", help="a staleness_study*.json to redraw the figure and table from (no runs)")
    p.add_argument("--cost", action="store_true", help="measure the corrections' cost per trainer step")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    if args.cost:
        cost()
        return
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        report(saved, args.out, os.path.splitext(os.path.basename(args.replot))[0])
        return
    stem = "staleness_study" if args.setting == "tiny" else f"staleness_study_{args.setting}"
    path = os.path.join(args.out, f"{stem}.json")
    base = [*SETTINGS[args.setting], f"trainer.steps={args.steps}", *args.overrides]
    saved = {"setting": args.setting, "overrides": base, "results": {}}
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            saved = json.load(f)
        if saved["overrides"] != base:
            raise SystemExit(f"{path} holds runs with other overrides ({saved['overrides']}); use --fresh")
    from slime import api

    work = tempfile.mkdtemp(prefix="slime-study-")
    os.makedirs(args.out, exist_ok=True)
    cells = [(k, s, corr) for k in range(args.repeats) for s in args.staleness for corr in args.corrections]
    for k, s, corr in cells:  # every cell once before any cell twice: an early stop leaves a full grid
        name = _name(s, corr, k)
        if name in saved["results"]:
            continue
        t0 = time.perf_counter()
        overrides = [*base, f"buffer.max_staleness={s}", *CORRECTIONS[corr], *([f"seed={k}"] if k else [])]
        try:
            rows = api.run(overrides, os.path.join(work, name.replace(" ", "_")))
        except Exception:
            traceback.print_exc()
            print(f"{name}: FAILED", flush=True)
            continue
        result = summarise(s, corr, rows, time.perf_counter() - t0)
        result["repeat"] = k
        result["load"] = os.getloadavg()[0]
        saved["results"][name] = result
        print(f"{name}: reward {result['first20']:.3f} -> {result['last20']:.3f} ({result['wall_s']:.0f} s)")
        with open(path, "w") as f:
            json.dump(saved, f, indent=1)
    report(saved, args.out, stem)


def report(saved: dict, out: str, stem: str) -> None:
    """Write `<stem>.png` and `<stem>_table.md` into `out` and print the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(saved["results"])  # (staleness, correction) -> its repeats averaged
    corrs = [c for c in CORRECTIONS if any(corr == c for _, corr in cells)]
    stales = sorted({s for s, _ in cells})
    sync = cells.get((0, "tis")) or next((c for (s, _), c in cells.items() if s == 0), None)
    target = sync["last20"] if sync else None
    fig, axes = plt.subplots(1, len(corrs) + 1, figsize=(4.2 * (len(corrs) + 1), 3.8), sharey=True)
    for ax, corr in zip(axes, corrs, strict=False):
        for s in stales:
            r = cells.get((s, corr)) or (cells.get((0, "tis")) if s == 0 else None)
            if r is not None:
                ax.plot(range(1, len(r["rewards"]) + 1), _smooth(r["rewards"]), label=f"staleness {s}")
        if target is not None:
            ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set_title(corr)
        ax.set_xlabel("trainer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean reward (3-step moving average)")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    for corr in corrs:
        xs = [s for s in stales if (s, corr) in cells]
        ax.plot(xs, [cells[(s, corr)]["last20"] for s in xs], marker="o", label=corr)
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls="--", label="synchronous")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(stales)
    ax.set_xticklabels([str(s) for s in stales])
    ax.set_xlabel("buffer.max_staleness")
    ax.set_title("reward, last 20% of steps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(" ".join(saved["overrides"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{stem}.png"), dpi=100)

    lines = [
        "| max_staleness | correction | runs | reward first 20% | reward last 20% (each run) | steps to sync final | "
        "staleness mean / max | ESS | ESS raw | log-ratio M2 | masked | lr scale | mismatch | train s/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def num(r: dict, key: str, fmt: str = ".3f") -> str:
        return format(r[key], fmt) if key in r else "-"

    for s in stales:
        for corr in corrs:
            r = cells.get((s, corr))
            if r is None:
                continue
            reach = _steps_to(r["rewards"], target) if target is not None else None
            each = ", ".join(f"{x:.2f}" for x in r["last20_each"])
            lines.append(
                f"| {s} | {corr} | {len(r['last20_each'])} | {r['first20']:.3f} | {r['last20']:.3f} ({each}) | "
                f"{reach if reach is not None else 'never'} | {r['stale_mean']:.2f} / {r['stale_max']:.0f} | "
                f"{num(r, 'offpolicy/ess')} | {num(r, 'offpolicy/ess_raw')} | {num(r, 'offpolicy/log_ratio_m2')} | "
                f"{num(r, 'masked_frac')} | {num(r, 'offpolicy/lr_scale')} | {num(r, 'mismatch/logprob_abs')} | "
                f"{num(r, 'time/train_s', '.1f')} |"
            )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(out, f"{stem}_table.md"), "w") as f:
        f.write(table + "\n")


def cost(B: int = 64, T: int = 512, reps: int = 20) -> None:
    """Milliseconds per call of the policy loss with each correction, and of the per-step off-policy
    statistics, on a [B, T] micro-batch (float32, this process's threads), against the old `tis`."""
    import torch

    from slime.core.config import AlgorithmConfig, IsFactorConfig
    from trainer.importance import fallback_gap, importance_weights, offpolicy_stats
    from trainer.losses import policy_loss

    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand(B, T, generator=gen) < 0.8).float()
    mu = -torch.rand(B, T, generator=gen) * 5
    pi_v = mu + 0.01 * torch.randn(B, T, generator=gen)
    prox = pi_v + 0.5 * torch.randn(B, T, generator=gen)
    adv = torch.randn(B, 1, generator=gen).expand(B, T)
    stale = torch.randint(0, 5, (B, T), generator=gen)
    configs = {
        "tis (old)": AlgorithmConfig(name="grpo", off_policy="tis"),  # type: ignore[arg-type]
        "factored truncate": AlgorithmConfig(name="grpo", off_policy="factored"),  # type: ignore[arg-type]
        "factored m2": AlgorithmConfig(
            name="grpo",
            off_policy="factored",  # type: ignore[arg-type]
            staleness=IsFactorConfig(mode="m2"),  # type: ignore[arg-type]
        ),
        "factored geomean mask": AlgorithmConfig(
            name="grpo",
            off_policy="factored",  # type: ignore[arg-type]
            staleness=IsFactorConfig(level="geomean", mode="mask", low=0.5, high=2.0),  # type: ignore[arg-type]
        ),
    }

    def timed(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3

    print(f"[{B}, {T}] micro-batch, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
    for name, cfg in configs.items():

        def step(cfg: AlgorithmConfig = cfg) -> None:
            lp = prox.clone().requires_grad_(True)
            loss, _ = policy_loss(lp, prox, mu, adv, mask, cfg, None, pi_v)
            loss.backward()

        def stats(cfg: AlgorithmConfig = cfg) -> None:
            w = importance_weights(prox, mu, pi_v, mask, cfg)
            offpolicy_stats(prox, mu, pi_v, w, mask, stale)

        print(f"{name:24s} policy loss fwd+bwd {timed(step):7.2f} ms   statistics {timed(stats):6.2f} ms")
    known = mask.bool() & (stale > 0)
    gap = timed(lambda: fallback_gap(prox, mu, pi_v, known, configs["factored truncate"]))
    print(f"{'fallback gap':24s} {gap:7.2f} ms (only with algorithm.behavior_snapshots > 0)")


if __name__ == "__main__":
    main()
