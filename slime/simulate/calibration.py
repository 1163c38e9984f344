"""Calibration of the simulator from a recorded run: a run dir read (`read_run`), or packed into one
small JSON file (`pack_run`); its shape and workload (`workload_of`); the speeds fitted to it
(`calibrate`); and those speeds put on another run's shape (`retarget`), for slime/simulate/model.py
to predict.


Calibration (`calibrate`) reads a run dir's config.yaml (the shape), metrics.jsonl (the timings) and
buffer/groups.jsonl (the workload: every recorded episode's turns, generated tokens, environment
seconds and trained tokens). From the steps it is given (all but step 0, the warm-up, by default):

| parameter | fitted from |
|---|---|
| the workload (`turns`, `tokens_per_turn`, `latency_s` = `recorded`) | the recorded episodes of those steps' batches, drawn group by group |
| `train_fixed_s`, `train_tok_s` | least squares of `time/train_s` on `train/tokens`; when the tokens hardly vary (spread under 10%), all of it per token |
| `export_s`, `load_s` | means of `time/sync_s - time/engine_load_s` and of `time/engine_load_s` |
| `overhead_s` | mean of `time/step_s - time/wait_s - time/train_s - time/sync_s` |
| `turn_overhead_s` | least squares of episodes' `generate_s` on their turns and generated tokens, when both vary (else 0) |
| `seq_tok_s` | by simulation: the value whose simulated mean episode `generate_s` equals the recorded one (bisection) |
| `b_sat` | not identifiable from one run (its engines see one concurrency): a prior, `--set b_sat=` |
| `drop_frac` | groups dropped (zero variance, failures) over groups put |
| `cores`, threads | this machine's cores when the run was on CPU (0 with GPUs); the run's threads (auto resolved as slime/core/cores.py does) |

docs/scaling.md has the validation against measured runs.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from slime.core.cores import available_cores
from slime.simulate.model import Simulation
from slime.simulate.params import Dist, Params, RecordedEpisode


@dataclass
class Run:
    """What a run dir holds that the simulator reads."""

    path: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]  # metrics.jsonl, training steps only, by step
    trained: dict[int, list[int]]  # step -> tickets of its batch (buffer/trained.jsonl)
    groups: dict[int, tuple[RecordedEpisode, ...]]  # ticket -> its episodes (buffer/groups.jsonl)
    cores: float | None = None  # the cores of the machine it ran on, when known (a packed run)


def _jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _recorded_group(group: dict[str, Any]) -> tuple[RecordedEpisode, ...]:
    """A groups.jsonl group as its episodes (segments of one episode summed)."""
    by_episode: dict[str, list[dict[str, Any]]] = {}
    for i, t in enumerate(group["trajectories"]):
        by_episode.setdefault(t.get("episode_id") or str(i), []).append(t)
    out = []
    for segs in by_episode.values():
        first = segs[0]
        timings = first.get("timings") or {}
        out.append(
            RecordedEpisode(
                turns=max(1, int(first.get("turns", 1))),
                tokens=sum(1 for s in segs for v in s["versions"] if v >= 0),
                env_s=float(timings.get("env_s", 0.0)),
                trained_tokens=sum(len(s["token_ids"]) for s in segs),
                generate_s=float(timings.get("generate_s", 0.0)),
            )
        )
    return tuple(out)


def read_run(path: str) -> Run:
    """A run dir, or a run packed into one JSON file by `pack_run` (`--pack`)."""
    if path.endswith(".json") and os.path.isfile(path):
        return unpack_run(path)
    import yaml

    with open(os.path.join(path, "config.yaml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    rows = sorted(
        (r for r in _jsonl(os.path.join(path, "metrics.jsonl")) if not r.get("eval")), key=lambda r: r["step"]
    )
    if not rows:
        raise SystemExit(f"{path}/metrics.jsonl has no training steps")
    trained = {
        int(r["step"]): [int(t) for t in r["tickets"]]
        for r in _jsonl(os.path.join(path, "buffer", "trained.jsonl"))
    }
    groups = {
        int(g["ticket"]): _recorded_group(g) for g in _jsonl(os.path.join(path, "buffer", "groups.jsonl"))
    }
    return Run(path, config, rows, trained, groups)


# What a packed run keeps: the config sections the shape comes from, and the metrics the fits read.
PACKED_SECTIONS = ("rollout", "trainer", "buffer", "env", "ray")
PACKED_KEYS = (
    "step",
    "time/step_s",
    "time/wait_s",
    "time/train_s",
    "time/sync_s",
    "time/engine_load_s",
    "time/gen_s",
    "train/tokens",
    "perf/train_tokens_per_s",
    "perf/rollout_tokens_per_s",
    "staleness/mean",
    "staleness/max",
    "batch/trajectories",
    "episode/count",
    "episode/turns_mean",
    "response/len_mean",
    "buffer/dropped_zero_variance",
    "buffer/dropped_failed",
)


def pack_run(run: Run, **extra: Any) -> dict[str, Any]:
    """A run as one small JSON-able dict: what the simulator reads of it (episodes as [turns, tokens,
    env_s, trained_tokens, generate_s]), plus `extra` (e.g. the machine's load)."""
    return {
        "path": run.path,
        "config": {k: run.config.get(k) for k in PACKED_SECTIONS if k in run.config},
        "rows": [{k: r[k] for k in PACKED_KEYS if k in r} for r in run.rows],
        "trained": {str(k): v for k, v in run.trained.items()},
        "cores": run.cores if run.cores is not None else available_cores(),
        "groups": {
            str(t): [
                [e.turns, e.tokens, round(e.env_s, 4), e.trained_tokens, round(e.generate_s, 4)] for e in g
            ]
            for t, g in run.groups.items()
        },
        **extra,
    }


def unpack_run(path: str) -> Run:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    groups = {int(t): tuple(RecordedEpisode(*e) for e in g) for t, g in d["groups"].items()}
    trained = {int(k): v for k, v in d["trained"].items()}
    return Run(path, d["config"], d["rows"], trained, groups, d.get("cores"))


def _on_cpu(config: dict[str, Any]) -> bool:
    return not config["rollout"].get("gpus_per_worker") and not config["trainer"].get("gpus_per_rank")


def shape_from_config(config: dict[str, Any], cores: float | None = None) -> dict[str, Any]:
    """The shape a run's config.yaml gives: engines, groups, batch, ranks, staleness, and on CPU the
    cores and threads (`threads_per_*` 0 resolved as slime/core/cores.py does, for this machine's
    cores unless `cores` is given)."""
    r, t, b = config["rollout"], config["trainer"], config["buffer"]
    if not _on_cpu(config):
        cores = 0.0
    elif cores is None:
        cores = float(available_cores(int((config.get("ray") or {}).get("num_cpus") or 0)))
    workers, ranks, staleness = int(r["num_workers"]), int(t["num_ranks"]), int(b["max_staleness"])
    engine_threads = int(r.get("threads_per_worker") or 0)
    if not engine_threads:  # auto: slime/core/cores.py engine_threads
        share = cores if staleness == 0 else cores // 2
        engine_threads = max(1, int(share) // workers)
    trainer_threads = int(t.get("threads_per_rank") or 0)
    if not trainer_threads:  # auto: what busy engines leave (all of it when synchronous)
        claimed = 0 if staleness == 0 else engine_threads * workers
        trainer_threads = max(1, int(cores - claimed) // ranks)
    return {
        "num_workers": workers,
        "max_concurrent_groups": int(r["max_concurrent_groups"]),
        "group_size": int(r["group_size"]),
        "batch_groups": int(t["batch_groups"]),
        "num_ranks": ranks,
        "max_staleness": staleness,
        "stale_tokens": str(b.get("stale_tokens", "keep")),
        "cores": float(cores),
        "engine_threads": engine_threads,
        "trainer_threads": trainer_threads,
    }


def _fit_steps(run: Run, steps: Iterable[int] | None) -> list[dict[str, Any]]:
    wanted = set(steps) if steps is not None else {int(r["step"]) for r in run.rows[1:]}
    rows = [r for r in run.rows if int(r["step"]) in wanted]
    if not rows:
        raise SystemExit(f"{run.path}: no metrics rows for steps {sorted(wanted)}")
    return rows


def _recorded_for(run: Run, rows: list[dict[str, Any]]) -> tuple[tuple[RecordedEpisode, ...], ...]:
    """The recorded groups of the batches of `rows` (every recorded group if none is known)."""
    tickets = [t for r in rows for t in run.trained.get(int(r["step"]), [])]
    groups = [run.groups[t] for t in tickets if t in run.groups]
    if not groups:
        groups = list(run.groups.values())
    return tuple(g for g in groups if g)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _spread(xs: Sequence[float]) -> float:
    """Coefficient of variation (0 for constant or empty)."""
    m = _mean(xs)
    if not xs or m == 0:
        return 0.0
    return math.sqrt(_mean([(x - m) ** 2 for x in xs])) / abs(m)


def _least_squares(xs: Sequence[Sequence[float]], ys: Sequence[float]) -> list[float]:
    """Ordinary least squares without an intercept (normal equations; 1 or 2 regressors)."""
    k = len(xs[0])
    a = [[sum(x[i] * x[j] for x in xs) for j in range(k)] for i in range(k)]
    b = [sum(x[i] * y for x, y in zip(xs, ys, strict=True)) for i in range(k)]
    if k == 1:
        return [b[0] / a[0][0]]
    det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
    if abs(det) < 1e-12 * max(1.0, abs(a[0][0] * a[1][1])):
        raise ZeroDivisionError("singular")
    return [(b[0] * a[1][1] - b[1] * a[0][1]) / det, (a[0][0] * b[1] - a[1][0] * b[0]) / det]


def computed_tokens(row: dict[str, Any]) -> float:
    """The tokens a step's forward and backward ran on: `perf/train_tokens_per_s` counts those (the
    zero-advantage sequences it skipped left out), `train/tokens` every one."""
    if "perf/train_tokens_per_s" in row:
        return float(row["perf/train_tokens_per_s"]) * float(row["time/train_s"])
    return float(row.get("train/tokens", 0.0))


def fit_trainer(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(train_fixed_s, train_tok_s) from `time/train_s` against the tokens computed on; when these
    hardly vary (spread under 10%), every second per token."""
    tokens = [computed_tokens(r) for r in rows]
    secs = [float(r["time/train_s"]) for r in rows]
    if _spread(tokens) >= 0.1 and len(rows) >= 3:
        with_fixed = _least_squares([(1.0, x) for x in tokens], secs)
        if with_fixed[0] >= 0 and with_fixed[1] > 0:
            return with_fixed[0], 1.0 / with_fixed[1]
    return 0.0, max(sum(tokens), 1e-9) / max(sum(secs), 1e-9)


def skip_frac(rows: list[dict[str, Any]]) -> float:
    """The share of trained tokens the trainer skipped (zero-advantage sequences)."""
    total = sum(float(r.get("train/tokens", 0.0)) for r in rows)
    return min(1.0, max(0.0, 1.0 - sum(computed_tokens(r) for r in rows) / total)) if total else 0.0


def fit_turn_overhead(episodes: Sequence[RecordedEpisode]) -> float:
    """Seconds per generate call besides decoding: least squares of each episode's generate_s on its
    turns and generated tokens, when both vary (0 otherwise, or when the fit is not positive)."""
    turns = [float(e.turns) for e in episodes]
    tokens = [float(e.tokens) for e in episodes]
    if len(episodes) < 8 or _spread(turns) < 0.1 or _spread(tokens) < 0.1:
        return 0.0
    try:
        per_turn, per_token = _least_squares(
            [(a, b) for a, b in zip(turns, tokens, strict=True)], [e.generate_s for e in episodes]
        )
    except ZeroDivisionError:
        return 0.0
    return per_turn if per_turn > 0 and per_token > 0 else 0.0


def measured_summary(run: Run, steps: Iterable[int] | None = None) -> dict[str, float]:
    """A run's figures over `steps` (all but step 0 by default), as `summarize` gives them."""
    rows = _fit_steps(run, steps)
    total = sum(r["time/step_s"] for r in rows)
    return {
        "step_s": total / len(rows),
        "train_s": _mean([r["time/train_s"] for r in rows]),
        "wait_s": _mean([r["time/wait_s"] for r in rows]),
        "sync_s": _mean([r["time/sync_s"] for r in rows]),
        "gen_s": _mean([r.get("time/gen_s", 0.0) for r in rows]),
        "trainer_idle_frac": max(0.0, 1.0 - sum(r["time/train_s"] for r in rows) / total),
        "staleness_mean": _mean([r.get("staleness/mean", 0.0) for r in rows]),
        "staleness_max": float(max(r.get("staleness/max", 0.0) for r in rows)),
        "gen_tok_s": sum(r.get("perf/rollout_tokens_per_s", 0.0) * r["time/step_s"] for r in rows) / total,
        "samples_s": sum(r.get("batch/trajectories", 0.0) for r in rows) / total,
    }


def _simulated_generate_s(params: Params) -> tuple[float, float]:
    """(mean episode generate_s of the groups trained after the warm-up, the trainer's mean speed
    share: work over time) in a simulation of `params`."""
    sim = Simulation(params)
    sim.keep_groups = True
    records = sim.run()
    after = records[params.warmup :] or records
    eps = [ep for r in after for t in r.tickets for ep in sim.finished[t].episodes]
    speed = sum(r.train_work_s for r in after) / max(sum(r.train_s for r in after), 1e-12)
    return _mean([ep.generate_s for ep in eps]), speed


def fit_engine(params: Params, target_generate_s: float) -> float:
    """seq_tok_s whose simulated mean episode generate_s is `target_generate_s` (bisection on a log
    scale; faster engines give shorter generate calls)."""
    lo, hi = math.log(1e-3), math.log(1e7)
    if _simulated_generate_s(params.with_(seq_tok_s=math.exp(hi)))[0] >= target_generate_s:
        return math.exp(hi)  # the turn overheads alone take that long
    for _ in range(40):
        mid = (lo + hi) / 2
        if _simulated_generate_s(params.with_(seq_tok_s=math.exp(mid)))[0] > target_generate_s:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-3:
            break
    return math.exp((lo + hi) / 2)


def workload_of(run: Run, steps: Iterable[int] | None = None) -> dict[str, Any]:
    """A run's shape (its config) and workload over `steps`: the recorded episodes of those steps'
    batches (or, without buffer/groups.jsonl, the metrics' means and the config's tool latency), the
    share of groups dropped and of tokens the trainer skipped. These describe what was run, not how
    fast: `calibrate` fits the speeds, and `--compare` puts one run's speeds on another's workload."""
    rows = _fit_steps(run, steps)
    shape = shape_from_config(run.config, run.cores if _on_cpu(run.config) else None)
    put = sum(float(r.get("episode/count", 0.0)) for r in rows) / max(1, shape["group_size"])
    dropped = sum(
        float(r.get("buffer/dropped_zero_variance", 0)) + float(r.get("buffer/dropped_failed", 0))
        for r in rows
    )
    out = {
        **shape,
        "drop_frac": min(0.9, dropped / put) if put else 0.0,
        "skip_frac": skip_frac(rows),
        "steps": len(rows) + 1,
    }
    recorded = _recorded_for(run, rows)
    if recorded:
        rec = Dist("recorded")
        return {**out, "turns": rec, "tokens_per_turn": rec, "latency_s": rec, "recorded": recorded}
    turns = _mean([float(r.get("episode/turns_mean", 1.0)) for r in rows])
    length = _mean([float(r.get("response/len_mean", 16.0)) for r in rows])
    env = run.config.get("env") or {}
    latency = float(env.get("tool_latency_s") or 0.0)
    lognormal = env.get("tool_latency") == "lognormal"
    trained = _mean([r.get("train/tokens", 0.0) / max(1.0, r.get("batch/trajectories", 1.0)) for r in rows])
    return {
        **out,
        "turns": Dist("fixed", max(1.0, round(turns))),
        "tokens_per_turn": Dist("fixed", length / max(1.0, turns)),
        "latency_s": Dist("lognormal", latency, float(env.get("tool_latency_sigma", 1.0)))
        if lognormal
        else Dist("fixed", latency),
        "prompt_tokens": max(0.0, trained - length),
        "recorded": (),
    }


def calibrate(
    run: Run | str, steps: Iterable[int] | None = None, base: Params | None = None
) -> tuple[Params, dict[str, Any]]:
    """Params fitted to `run` over `steps` (all but step 0 by default; see the module docstring for
    what comes from what), on top of `base` (its b_sat and simulation settings). Returns them and
    notes on the fit."""
    run = read_run(run) if isinstance(run, str) else run
    rows = _fit_steps(run, steps)
    base = base or Params()
    work = workload_of(run, steps)
    fixed, tok_s = fit_trainer(rows)
    episodes = [e for g in work["recorded"] for e in g]
    params = base.with_(
        **{**work, "steps": max(base.steps, work["steps"])},
        train_fixed_s=fixed,
        train_tok_s=tok_s,
        load_s=_mean([float(r.get("time/engine_load_s", 0.0)) for r in rows]),
        export_s=_mean(
            [max(0.0, float(r["time/sync_s"]) - float(r.get("time/engine_load_s", 0.0))) for r in rows]
        ),
        overhead_s=_mean(
            [
                max(0.0, r["time/step_s"] - r["time/wait_s"] - r["time/train_s"] - r["time/sync_s"])
                for r in rows
            ]
        ),
        turn_overhead_s=fit_turn_overhead(episodes) if episodes else 0.0,
    )
    notes: dict[str, Any] = {
        "run": run.path,
        "steps": [int(r["step"]) for r in rows],
        "episodes": len(episodes),
    }
    target = _mean([e.generate_s for e in episodes])
    if target <= 0:  # no recorded episode timings: the engine from time/gen_s and the tokens generated
        gen_tok_s = _mean(
            [
                r.get("perf/rollout_tokens_per_s", 0.0)
                * r["time/step_s"]
                / max(r.get("time/gen_s", 0.0), 1e-9)
                for r in rows
            ]
        )
        b = params.max_concurrent_groups * params.group_size
        notes["engine_fit"] = "time/gen_s"
        return params.with_(seq_tok_s=max(1e-3, gen_tok_s * (1 + b / params.b_sat) / b)), notes
    # On a shared machine the trainer's measured seconds include the share of the cores it got:
    # rescale them to full speed by its share in the simulation, refit the engine, repeat.
    speed = 1.0
    for _ in range(3 if params.cores > 0 else 1):
        params = params.with_(train_fixed_s=fixed * speed, train_tok_s=tok_s / speed)
        params = params.with_(seq_tok_s=fit_engine(params, target))
        _, speed_now = _simulated_generate_s(params)
        if abs(speed_now - speed) < 1e-3:
            break
        speed = speed_now
    notes["engine_fit"] = "episode generate_s"
    notes["generate_s"] = target
    notes["trainer_speed_share"] = speed
    return params, notes


def retarget(params: Params, run: Run, steps: Iterable[int] | None = None) -> Params:
    """`params`' speeds on `run`'s shape and workload (for predicting one run from another's fit)."""
    work = workload_of(run, steps)
    return params.with_(**{**work, "steps": max(params.steps, work["steps"])})
