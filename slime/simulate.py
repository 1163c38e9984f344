"""A scheduling simulator of slime's loop, calibrated from a run dir: what step time, trainer idle and
staleness would another shape give (more engines, another staleness bound, slower tools)?

    python -m slime.simulate RUN_DIR                          # calibrate, then simulate the run's own shape
    python -m slime.simulate RUN_DIR --set num_workers=4 --set max_staleness=2
    python -m slime.simulate RUN_DIR --sweep num_workers=1,2,4,8 --sweep max_staleness=0,1
    python -m slime.simulate RUN_DIR --compare OTHER_RUN ...  # predict other runs' shapes, against their metrics
    python -m slime.simulate --set seq_tok_s=40 --set ...     # no run dir: every parameter from --set

The model is a discrete-event simulation (a heap of timed events; pure and deterministic given
`seed`) of what slime/controller.py, slime/buffer.py and rollout/worker.py do:

- Rollout: `num_workers` engines, each running `max_concurrent_groups` loops that acquire a ticket,
  run `group_size` episodes of its task at once and put the group. An episode is `turns` turns; a
  turn waits `turn_overhead_s` (the request's prefill and scheduling), generates `tokens_per_turn`
  tokens on its engine, then waits `latency_s` for the environment (a tool call), holding no engine.
- Engine batching: continuous batching as processor sharing. With b sequences decoding, an engine
  produces X(b) = seq_tok_s * b / (1 + b / b_sat) tokens/s, each sequence seq_tok_s / (1 + b / b_sat);
  every arrival or departure changes every sequence's speed (tokens/s saturates at seq_tok_s * b_sat).
- Admission: the buffer's rule exactly: a ticket is issued while
  issued < (version + max_staleness + 1) * batch_groups + refunded, to the least loaded waiting
  worker. Groups dropped on arrival (`drop_frac`: DAPO's zero-variance drops, failures) are refunded.
- Trainer: waits for `batch_groups` finished groups (the oldest by ticket), trains for
  train_fixed_s + tokens / (train_tok_s * num_ranks), exports the weights for `export_s` (the engines
  keep decoding), then every engine pauses `load_s` to load them and serves version + 1; the buffer
  widens its window; `overhead_s` of controller bookkeeping (stats, logging) precedes the next wait.
- Partial rollouts: an episode keeps going across pushes; each token carries the version its engine
  served when it was generated, so a batch's staleness (trained version - token version) is
  token-exact. `stale_tokens=drop_group` drops (and refunds) groups with a token more than
  max_staleness versions old when the trainer takes a batch; `keep` and `mask` train them (`mask`
  counts the stale tokens as lost).
- A shared CPU machine (`cores` > 0): busy engines (`engine_threads` each, while they decode) and a
  training rank (`trainer_threads`) share `cores` cores; when they ask for more threads than there
  are cores, every busy one runs at cores / threads asked of its speed. `cores=0`: every engine and
  rank on hardware of its own (GPUs).

Not modelled: prefill as a function of context length (only the per-turn `turn_overhead_s`), KV-cache
capacity limits, worker failures and restarts, the buffer's max_groups overflow, evaluation.

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

docs/scaling.md has the validation against measured runs and a sizing study.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slime.core.cores import available_cores

# ------------------------------------------------------------------------------------ distributions


@dataclass(frozen=True)
class Dist:
    """A distribution of one workload quantity, written on the command line as `3` (fixed),
    `lognormal:MEDIAN:SIGMA`, `uniform:LOW:HIGH`, `randint:LOW:HIGH` (integers, both included),
    `choice:V1,V2,...` (equally likely) or `recorded` (from the run dir's recorded episodes)."""

    kind: str = "fixed"
    a: float = 0.0
    b: float = 0.0
    values: tuple[float, ...] = ()

    KINDS = ("fixed", "lognormal", "uniform", "randint", "choice", "recorded")

    @classmethod
    def parse(cls, text: str | float | Dist) -> Dist:
        if isinstance(text, Dist):
            return text
        if isinstance(text, int | float):
            return cls("fixed", float(text))
        kind, _, rest = str(text).strip().partition(":")
        if not rest and kind not in cls.KINDS:
            return cls("fixed", float(kind))
        args = rest.split(":") if rest else []
        if kind == "recorded" and not args:
            return cls("recorded")
        if kind == "fixed" and len(args) == 1:
            return cls("fixed", float(args[0]))
        if kind in ("lognormal", "uniform", "randint") and len(args) == 2:
            lo, hi = float(args[0]), float(args[1])
            if kind != "lognormal" and hi < lo:
                raise ValueError(f"{text!r}: HIGH must be >= LOW")
            return cls(kind, lo, hi)
        if kind == "choice" and len(args) == 1 and args[0]:
            return cls("choice", values=tuple(float(v) for v in args[0].split(",")))
        raise ValueError(
            f"cannot read {text!r} as a distribution: a number, lognormal:MEDIAN:SIGMA, uniform:LOW:HIGH, "
            "randint:LOW:HIGH, choice:V1,V2,... or recorded"
        )

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "lognormal":
            return self.a * math.exp(rng.gauss(0.0, self.b)) if self.b > 0 else self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "randint":
            return float(rng.randint(int(self.a), int(self.b)))
        if self.kind == "choice":
            return rng.choice(self.values)
        raise ValueError("a `recorded` distribution is sampled from the recorded episodes")

    def mean(self) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "lognormal":
            return self.a * math.exp(self.b**2 / 2)
        if self.kind in ("uniform", "randint"):
            return (self.a + self.b) / 2
        if self.kind == "choice":
            return sum(self.values) / len(self.values)
        raise ValueError("a `recorded` distribution has no mean of its own")

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}"
        if self.kind == "recorded":
            return "recorded"
        if self.kind == "choice":
            return "choice:" + ",".join(f"{v:g}" for v in self.values)
        return f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass(frozen=True)
class RecordedEpisode:
    """One measured episode: its turns, generated tokens, environment seconds (all its steps),
    trained tokens (prompt, environment messages and generated tokens, every segment) and seconds
    in its engine's generate calls."""

    turns: int
    tokens: int
    env_s: float
    trained_tokens: int
    generate_s: float = 0.0


# ------------------------------------------------------------------------------------------ params


def _p(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Params:
    """Everything the simulation takes; every field but `recorded` can be set with --set key=value."""

    # rollout
    num_workers: int = _p(1, "engines (rollout workers)")
    max_concurrent_groups: int = _p(8, "groups one engine runs at once")
    group_size: int = _p(4, "episodes per group (one task)")
    seq_tok_s: float = _p(100.0, "an engine's decode tokens/s with one sequence (the curve's slope a)")
    b_sat: float = _p(64.0, "concurrency where an engine reaches half its asymptotic tokens/s (inf: linear)")
    turn_overhead_s: float = _p(0.0, "seconds per generate call besides decoding (prefill, scheduling)")
    # workload
    turns: Dist = _p(Dist("fixed", 1.0), "turns per episode (drawn once per group: the task fixes it)")
    tokens_per_turn: Dist = _p(Dist("fixed", 16.0), "generated tokens per turn")
    latency_s: Dist = _p(Dist("fixed", 0.0), "environment (tool) seconds per step, one step after each turn")
    prompt_tokens: float = _p(64.0, "trained tokens per episode besides the generated ones (prompt)")
    env_tokens_per_turn: float = _p(0.0, "trained tokens the environment appends per step")
    drop_frac: float = _p(0.0, "share of finished groups dropped and refunded (zero variance, failures)")
    skip_frac: float = _p(0.0, "share of trained tokens the trainer skips (zero-advantage sequences)")
    # trainer
    batch_groups: int = _p(4, "groups per training batch")
    num_ranks: int = _p(1, "trainer ranks (data parallel; tokens/s scales with them)")
    train_fixed_s: float = _p(0.0, "seconds per optimizer step whatever the tokens")
    train_tok_s: float = _p(1000.0, "trained tokens/s of one rank")
    export_s: float = _p(0.0, "push seconds while the engines keep decoding (gather, write, deliver)")
    load_s: float = _p(0.0, "push seconds every engine pauses to load the weights")
    overhead_s: float = _p(0.0, "controller seconds per step besides waiting, training and pushing")
    # buffer
    max_staleness: int = _p(1, "the staleness bound S (0: synchronous)")
    stale_tokens: str = _p("keep", "keep | mask | drop_group (buffer.stale_tokens)")
    # machine
    cores: float = _p(0.0, "one CPU machine's cores shared by busy engines and ranks (0: own hardware each)")
    engine_threads: int = _p(1, "threads of an engine while it decodes (with cores > 0)")
    trainer_threads: int = _p(1, "threads of a rank while it trains (with cores > 0)")
    # simulation
    steps: int = _p(40, "trainer steps to simulate")
    warmup: int = _p(1, "first steps left out of the summary")
    seed: int = _p(0, "seed of the workload draws")
    recorded: tuple[tuple[RecordedEpisode, ...], ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("turns", "tokens_per_turn", "latency_s"):
            value = getattr(self, name)
            if not isinstance(value, Dist):
                object.__setattr__(self, name, Dist.parse(value))
        if self.stale_tokens not in ("keep", "mask", "drop_group"):
            raise ValueError(f"stale_tokens must be keep, mask or drop_group, got {self.stale_tokens!r}")
        positive = (
            "num_workers",
            "max_concurrent_groups",
            "group_size",
            "batch_groups",
            "num_ranks",
            "steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_tok_s <= 0 or self.train_tok_s <= 0 or self.b_sat <= 0:
            raise ValueError("seq_tok_s, train_tok_s and b_sat must be > 0")
        if self.max_staleness < 0 or not 0.0 <= self.drop_frac < 1.0 or not 0.0 <= self.skip_frac <= 1.0:
            raise ValueError("max_staleness must be >= 0, drop_frac in [0, 1) and skip_frac in [0, 1]")
        uses_recorded = any(d.kind == "recorded" for d in (self.turns, self.tokens_per_turn, self.latency_s))
        if uses_recorded and not self.recorded:
            raise ValueError(
                "a `recorded` distribution needs recorded episodes (a run dir's buffer/groups.jsonl)"
            )

    def with_(self, **changes: Any) -> Params:
        return dataclasses.replace(self, **changes)

    def engine_tok_s(self, b: float) -> float:
        """One engine's tokens/s with `b` sequences decoding."""
        return self.seq_tok_s * b / (1.0 + b / self.b_sat)


SETTABLE = {f.name: f for f in dataclasses.fields(Params) if f.name != "recorded"}


def parse_setting(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value converted to the field's type)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or key not in SETTABLE:
        raise ValueError(f"--set {text!r}: expected key=value with key one of {', '.join(SETTABLE)}")
    return key, _convert(key, value.strip())


def _convert(key: str, value: str) -> Any:
    kind = SETTABLE[key].type
    if kind in ("Dist", Dist):
        return Dist.parse(value)
    if kind in ("int", int):
        return int(float(value))
    if kind in ("float", float):
        return float(value)
    return value


# ------------------------------------------------------------------------------------- simulation


@dataclass
class _Episode:
    group: _Group
    plan: list[tuple[float, float]]  # (tokens, environment seconds after it) per turn
    trained_tokens: float
    turn: int = 0
    generate_s: float = 0.0
    by_version: dict[int, float] = field(default_factory=dict)  # tokens generated at each version


@dataclass
class _Group:
    ticket: int
    worker: int
    episodes: list[_Episode] = field(default_factory=list)
    pending: int = 0


@dataclass
class _Seq:
    """One turn decoding on an engine: done when the engine's virtual clock reaches `end_v`."""

    episode: _Episode
    end_v: float
    seg_v: float  # virtual clock when the current version's tokens started
    started: float  # wall time the turn started (its overhead included)


@dataclass
class StepRecord:
    """One simulated trainer step, in the terms of slime/metrics.py's row."""

    step: int
    step_s: float
    wait_s: float
    train_s: float
    sync_s: float
    gen_s: float  # the busiest engine's seconds with groups in flight, weight loads left out
    gen_tokens: float  # tokens every engine generated during the step
    trained_tokens: float
    episodes: int
    staleness_mean: float
    staleness_max: int
    partial_episodes: int  # episodes in the batch with tokens of more than one version
    tokens_lost_stale: float  # stale_tokens=mask: tokens past the bound, out of the loss
    dropped_stale: int  # stale_tokens=drop_group: groups dropped when the batch was taken
    tickets: tuple[int, ...] = ()  # the batch's groups
    train_work_s: float = 0.0  # train_s at full speed (equal to it without shared cores)
    # Where the time went, as shares of the step (what bounds throughput):
    slots_full_frac: float = 0.0  # every engine loop had a group: more engines (or slots) would help
    window_full_frac: float = 0.0  # loops waited for a ticket the staleness window withheld
    decoding_mean: float = 0.0  # sequences decoding per engine, time-averaged

    @property
    def trainer_idle_frac(self) -> float:
        return max(0.0, 1.0 - self.train_s / self.step_s) if self.step_s > 0 else 0.0


class _Engine:
    """Continuous batching as processor sharing: every decoding sequence advances at the same speed,
    so one virtual clock `v` (tokens each has generated since the engine started) orders their
    completions."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.v = 0.0
        self.t = 0.0
        self.rate = 0.0  # tokens/s of each decoding sequence now
        self.heap: list[tuple[float, int, _Seq]] = []
        self.paused = False
        self.version = 0
        self.epoch = 0  # bumped on every reschedule: older completion events are stale
        self.groups = 0  # groups in flight (the buffer's load measure)
        self.busy_s = 0.0  # seconds with groups in flight and not paused, since the last step
        self.tokens = 0.0  # tokens generated since the last step

    def advance(self, now: float) -> None:
        if self.groups and not self.paused:
            self.busy_s += now - self.t
        dv = self.rate * (now - self.t)
        self.v += dv
        self.tokens += dv * len(self.heap)
        self.t = now

    @property
    def decoding(self) -> bool:
        return bool(self.heap) and not self.paused


class Simulation:
    """One run of the loop under `params`; `run()` returns a StepRecord per trainer step."""

    def __init__(self, params: Params) -> None:
        self.p = params
        self.rng = random.Random(params.seed)
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self.engines = [_Engine(i) for i in range(params.num_workers)]
        # buffer
        self.version = 0
        self.issued = 0
        self.refunded = 0
        self.ready: list[_Group] = []
        self.waiting: list[tuple[int, int]] = []  # (arrival order, worker) of loops waiting for a ticket
        self.max_ahead = 0  # the most tickets ever issued beyond those trained (a test's check)
        self.trained_groups = 0
        # trainer
        self.records: list[StepRecord] = []
        self.state = "wait"
        self.train_left = 0.0  # seconds of training at full speed still to do
        self.train_rate = 1.0
        self.train_epoch = 0
        self.train_t = 0.0
        self._step_start = 0.0
        self._wait_start = 0.0
        self._train_start = 0.0
        self._sync_start = 0.0
        self._batch: dict[str, Any] = {}
        self._loop_order = itertools.count()
        self.keep_groups = False  # keep every finished group in `finished` (calibration reads them)
        self.decoding = 0  # sequences decoding on every engine
        self._obs = [0.0, 0.0, 0.0]  # see _observe
        self.finished: dict[int, _Group] = {}

    # -- the event queue ---------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn, args))

    def run(self) -> list[StepRecord]:
        for e in self.engines:
            for _ in range(self.p.max_concurrent_groups):
                self.waiting.append((next(self._loop_order), e.index))
        self._admit()
        self._wait_start = 0.0
        self._try_batch()
        while self._events and len(self.records) < self.p.steps:
            t, _, fn, args = heapq.heappop(self._events)
            self._observe(t)
            self.now = t
            fn(*args)
        if len(self.records) < self.p.steps:
            raise RuntimeError("the simulation stalled before its last step (no event left)")
        return self.records

    # -- shared cores ------------------------------------------------------------------------------
    def _speed(self) -> float:
        """The share of its own speed every busy engine and rank gets on a shared CPU machine."""
        if self.p.cores <= 0:
            return 1.0
        asked = sum(self.p.engine_threads for e in self.engines if e.decoding)
        if self.state == "train":
            asked += self.p.trainer_threads * self.p.num_ranks
        return min(1.0, self.p.cores / asked) if asked else 1.0

    def _sync_all(self) -> None:
        """Bring every engine (and the training in progress) to `now` at their current speeds."""
        for e in self.engines:
            e.advance(self.now)
        if self.state == "train":
            self.train_left -= self.train_rate * (self.now - self.train_t)
            self.train_t = self.now

    def _reschedule(self, engines: Iterable[_Engine], trainer: bool) -> None:
        speed = self._speed()
        for e in engines:
            e.epoch += 1
            n = len(e.heap)
            e.rate = 0.0 if e.paused or not n else speed * self.p.engine_tok_s(n) / n
            if e.rate > 0:
                self.at(self.now + max(0.0, e.heap[0][0] - e.v) / e.rate, self._decoded, e, e.epoch)
        if trainer and self.state == "train":
            self.train_epoch += 1
            self.train_rate = speed
            self.at(self.now + max(0.0, self.train_left) / speed, self._trained, self.train_epoch)

    def _changed(self, engine: _Engine | None) -> None:
        """After a change to `engine` (None: to the trainer or every engine): new speeds and events.
        Without shared cores only that engine's sequences change speed."""
        if self.p.cores > 0 or engine is None:
            self._reschedule(self.engines, trainer=True)
        else:
            self._reschedule([engine], trainer=False)

    def _touch(self, engine: _Engine | None) -> None:
        """Before changing `engine` (None: the trainer or every engine): bring what it affects to now."""
        if self.p.cores > 0 or engine is None:
            self._sync_all()
        else:
            engine.advance(self.now)

    # -- admission (slime/buffer.py acquire) --------------------------------------------------------
    def window(self) -> int:
        return (self.version + self.p.max_staleness + 1) * self.p.batch_groups + self.refunded

    def _admit(self) -> None:
        while self.waiting and self.issued < self.window():
            # the least loaded waiting worker gets it (first come among equals)
            i = min(range(len(self.waiting)), key=lambda k: (self.engines[self.waiting[k][1]].groups, k))
            _, worker = self.waiting.pop(i)
            ticket = self.issued
            self.issued += 1
            self.max_ahead = max(self.max_ahead, self.issued - self.refunded - self.trained_groups)
            self._start_group(ticket, worker)

    def _draw_group(self) -> list[tuple[list[tuple[float, float]], float]]:
        """A group's episodes: per turn (tokens, environment seconds), and trained tokens."""
        p, rng = self.p, self.rng
        recorded = rng.choice(p.recorded) if p.recorded else ()
        task_turns = None if p.turns.kind == "recorded" else max(1, round(p.turns.sample(rng)))
        out = []
        for i in range(p.group_size):
            rec = recorded[i % len(recorded)] if recorded else None
            turns = task_turns if task_turns is not None else max(1, rec.turns)  # type: ignore[union-attr]
            plan = []
            for _ in range(turns):
                if p.tokens_per_turn.kind == "recorded":
                    tokens = rec.tokens / max(1, rec.turns)  # type: ignore[union-attr]
                else:
                    tokens = p.tokens_per_turn.sample(rng)
                if p.latency_s.kind == "recorded":
                    latency = rec.env_s / max(1, rec.turns)  # type: ignore[union-attr]
                else:
                    latency = p.latency_s.sample(rng)
                plan.append((max(1.0, tokens), max(0.0, latency)))
            generated = sum(t for t, _ in plan)
            if rec is not None and p.tokens_per_turn.kind == "recorded" and p.turns.kind == "recorded":
                trained = float(rec.trained_tokens)
            elif rec is not None:  # the recorded episode's non-generated tokens, per turn
                other = (rec.trained_tokens - rec.tokens) / max(1, rec.turns)
                trained = generated + other * turns
            else:
                trained = p.prompt_tokens + generated + p.env_tokens_per_turn * (turns - 1)
            out.append((plan, trained))
        return out

    def _start_group(self, ticket: int, worker: int) -> None:
        engine = self.engines[worker]
        group = _Group(ticket, worker)
        for plan, trained in self._draw_group():
            group.episodes.append(_Episode(group, plan, trained))
        group.pending = len(group.episodes)
        engine.advance(self.now)  # its busy time starts now
        engine.groups += 1
        for ep in group.episodes:
            self._start_turn(ep)

    # -- episodes (rollout/episode.py) ----------------------------------------------------------------
    def _start_turn(self, ep: _Episode) -> None:
        started = self.now
        if self.p.turn_overhead_s > 0:
            self.at(self.now + self.p.turn_overhead_s, self._decode, ep, started)
        else:
            self._decode(ep, started)

    def _decode(self, ep: _Episode, started: float) -> None:
        engine = self.engines[ep.group.worker]
        self._touch(engine)
        tokens = ep.plan[ep.turn][0]
        self.decoding += 1
        heapq.heappush(
            engine.heap,
            (engine.v + tokens, next(self._order), _Seq(ep, engine.v + tokens, engine.v, started)),
        )
        self._changed(engine)

    def _decoded(self, engine: _Engine, epoch: int) -> None:
        if epoch != engine.epoch:
            return
        self._touch(engine)
        done = []
        while engine.heap and engine.heap[0][0] <= engine.v + 1e-9 * max(1.0, engine.v):
            done.append(heapq.heappop(engine.heap)[2])
        self.decoding -= len(done)
        for seq in done:
            ep = seq.episode
            ep.by_version[engine.version] = ep.by_version.get(engine.version, 0.0) + seq.end_v - seq.seg_v
            ep.generate_s += self.now - seq.started
            latency = ep.plan[ep.turn][1]
            self.at(self.now + latency, self._stepped, ep)
        self._changed(engine)

    def _stepped(self, ep: _Episode) -> None:
        ep.turn += 1
        if ep.turn < len(ep.plan):
            self._start_turn(ep)
            return
        group = ep.group
        group.pending -= 1
        if group.pending:
            return
        engine = self.engines[group.worker]
        engine.advance(self.now)
        engine.groups -= 1
        if self.keep_groups:
            self.finished[group.ticket] = group
        if self.p.drop_frac and self.rng.random() < self.p.drop_frac:
            self.refunded += 1
        else:
            self.ready.append(group)
        self.waiting.append((next(self._loop_order), group.worker))
        self._admit()
        self._try_batch()

    # -- the trainer (slime/controller.py _step) ------------------------------------------------------
    def _min_version(self, group: _Group) -> int:
        versions = [v for ep in group.episodes for v, n in ep.by_version.items() if n > 0]
        return min(versions, default=self.version)

    def _try_batch(self) -> None:
        if self.state != "wait":
            return
        p = self.p
        dropped = 0
        if p.stale_tokens == "drop_group":
            keep = [g for g in self.ready if self.version - self._min_version(g) <= p.max_staleness]
            dropped = len(self.ready) - len(keep)
            if dropped:
                self.ready = keep
                self.refunded += dropped
                self._batch["dropped"] = self._batch.get("dropped", 0) + dropped
                self._admit()
        if len(self.ready) < p.batch_groups:
            return
        self.ready.sort(key=lambda g: g.ticket)
        batch, self.ready = self.ready[: p.batch_groups], self.ready[p.batch_groups :]
        self.trained_groups += len(batch)
        eps = [ep for g in batch for ep in g.episodes]
        weighted = [(self.version - v, n) for ep in eps for v, n in ep.by_version.items() if n > 0]
        tokens = sum(n for _, n in weighted)
        trained_tokens = sum(ep.trained_tokens for ep in eps)
        self._batch.update(
            wait_s=self.now - self._wait_start,
            staleness_mean=sum(s * n for s, n in weighted) / tokens if tokens else 0.0,
            staleness_max=max((s for s, _ in weighted), default=0),
            partial=sum(1 for ep in eps if sum(1 for n in ep.by_version.values() if n > 0) > 1),
            lost=sum(n for s, n in weighted if s > p.max_staleness) if p.stale_tokens == "mask" else 0.0,
            trained_tokens=trained_tokens,
            episodes=len(eps),
            tickets=tuple(g.ticket for g in batch),
            work_s=self._train_work(trained_tokens),
        )
        self._touch(None)
        self.state = "train"
        self._train_start = self.now
        self.train_left = self._train_work(trained_tokens)
        self.train_t = self.now
        self._changed(None)

    def _train_work(self, tokens: float) -> float:
        p = self.p
        return p.train_fixed_s + tokens * (1.0 - p.skip_frac) / (p.train_tok_s * p.num_ranks)

    def _trained(self, epoch: int) -> None:
        if epoch != self.train_epoch or self.state != "train":
            return
        self._touch(None)
        self.state = "export"
        self._batch["train_s"] = self.now - self._train_start
        self._sync_start = self.now
        self._changed(None)
        self.at(self.now + self.p.export_s, self._exported)

    def _exported(self) -> None:
        self._touch(None)
        self.state = "load"
        for e in self.engines:
            e.paused = True
        self._changed(None)
        self.at(self.now + self.p.load_s, self._loaded)

    def _loaded(self) -> None:
        self._touch(None)
        new = self.version + 1
        for e in self.engines:
            for _, _, seq in e.heap:  # partial rollouts: tokens so far keep the old version
                ep = seq.episode
                ep.by_version[e.version] = ep.by_version.get(e.version, 0.0) + e.v - seq.seg_v
                seq.seg_v = e.v
            e.version = new
            e.paused = False
        self.version = new
        self._record()
        self.state = "overhead"
        self._changed(None)
        self._admit()  # set_version widens the window
        self.at(self.now + self.p.overhead_s, self._next_wait)

    def _observe(self, t: float) -> None:
        """Time-weighted shares since the last event: loops all busy, loops held by the window,
        sequences decoding."""
        dt = t - self.now
        if dt <= 0:
            return
        if not self.waiting:
            self._obs[0] += dt
        elif self.issued >= self.window():
            self._obs[1] += dt
        self._obs[2] += dt * self.decoding

    def _record(self) -> None:
        b = self._batch
        step_s = self.now - self._step_start
        self.records.append(
            StepRecord(
                step=len(self.records),
                step_s=step_s,
                wait_s=b["wait_s"],
                train_s=b["train_s"],
                sync_s=self.now - self._sync_start,
                gen_s=max((e.busy_s for e in self.engines), default=0.0),
                gen_tokens=sum(e.tokens for e in self.engines),
                trained_tokens=b["trained_tokens"],
                episodes=b["episodes"],
                staleness_mean=b["staleness_mean"],
                staleness_max=b["staleness_max"],
                partial_episodes=b["partial"],
                tokens_lost_stale=b["lost"],
                dropped_stale=b.get("dropped", 0),
                tickets=b["tickets"],
                train_work_s=b["work_s"],
                slots_full_frac=self._obs[0] / step_s if step_s > 0 else 0.0,
                window_full_frac=self._obs[1] / step_s if step_s > 0 else 0.0,
                decoding_mean=self._obs[2] / step_s / len(self.engines) if step_s > 0 else 0.0,
            )
        )
        self._obs = [0.0, 0.0, 0.0]
        for e in self.engines:
            e.busy_s = 0.0
            e.tokens = 0.0
        self._batch = {}
        self._step_start = self.now

    def _next_wait(self) -> None:
        self.state = "wait"
        self._wait_start = self.now
        self._try_batch()


def simulate(params: Params) -> list[StepRecord]:
    """Simulate `params.steps` trainer steps; deterministic given `params.seed`."""
    return Simulation(params).run()


def summarize(records: Sequence[StepRecord], warmup: int = 1) -> dict[str, float]:
    """Means over the steps after `warmup`: step time, trainer idle (time-weighted, as
    benchmarks/summarize.py averages perf/trainer_idle_frac), staleness, rates."""
    rs = list(records[warmup:]) or list(records)
    total = sum(r.step_s for r in rs)
    n = len(rs)
    return {
        "step_s": total / n,
        "train_s": sum(r.train_s for r in rs) / n,
        "wait_s": sum(r.wait_s for r in rs) / n,
        "sync_s": sum(r.sync_s for r in rs) / n,
        "gen_s": sum(r.gen_s for r in rs) / n,
        "trainer_idle_frac": max(0.0, 1.0 - sum(r.train_s for r in rs) / total) if total else 0.0,
        "staleness_mean": sum(r.staleness_mean for r in rs) / n,
        "staleness_max": float(max(r.staleness_max for r in rs)),
        "partial_episodes": sum(r.partial_episodes for r in rs) / n,
        "gen_tok_s": sum(r.gen_tokens for r in rs) / total if total else 0.0,
        "samples_s": sum(r.episodes for r in rs) / total if total else 0.0,
        "slots_full_frac": sum(r.slots_full_frac * r.step_s for r in rs) / total if total else 0.0,
        "window_full_frac": sum(r.window_full_frac * r.step_s for r in rs) / total if total else 0.0,
        "decoding_mean": sum(r.decoding_mean * r.step_s for r in rs) / total if total else 0.0,
    }


# ------------------------------------------------------------------------------------ calibration


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


# -------------------------------------------------------------------------------------------- CLI

COLUMNS = (
    ("step_s", "step s", ".3f"),
    ("trainer_idle_frac", "idle", ".0%"),
    ("wait_s", "wait s", ".3f"),
    ("train_s", "train s", ".3f"),
    ("staleness_mean", "stale mean", ".2f"),
    ("staleness_max", "stale max", ".0f"),
    ("gen_tok_s", "gen tok/s", ".1f"),
    ("samples_s", "samples/s", ".2f"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _figures(summary: dict[str, float]) -> list[str]:
    return [format(summary[k], spec) for k, _, spec in COLUMNS]


def describe(params: Params) -> str:
    """The parameters, one line each (the recorded episodes counted, not listed)."""
    out = []
    for name in SETTABLE:
        value = getattr(params, name)
        out.append(f"  {name:<22} {value:.6g}" if isinstance(value, float) else f"  {name:<22} {value}")
    if params.recorded:
        n = sum(len(g) for g in params.recorded)
        out.append(f"  {'recorded':<22} {len(params.recorded)} groups, {n} episodes")
    return "\n".join(out)


def predict(params: Params) -> dict[str, float]:
    return summarize(simulate(params), params.warmup)


def _sweep_grid(sweeps: list[str]) -> list[dict[str, Any]]:
    axes = []
    for text in sweeps:
        key, sep, values = text.partition("=")
        if not sep:
            raise SystemExit(f"--sweep {text!r}: expected key=v1,v2,...")
        axes.append([parse_setting(f"{key}={v}") for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def compare_runs(
    reference: str, others: Sequence[str], base: Params, holdout: bool = False
) -> list[dict[str, Any]]:
    """Each run predicted two ways against its measured figures (steps after the first): from its
    own calibration (with `holdout`, fitted on its odd steps and compared on its even ones) and from
    `reference`'s calibration on its shape and workload."""
    ref_params, _ = calibrate(reference, base=base)
    out = []
    for path in others:
        run = read_run(path)
        steps = [int(r["step"]) for r in run.rows[1:]]
        fit = [s for s in steps if s % 2] if holdout else steps
        check = [s for s in steps if not s % 2] if holdout else steps
        own, _ = calibrate(run, fit, base)
        measured = measured_summary(run, check)
        out.append(
            {
                "run": path,
                "measured": measured,
                "own": predict(own),
                "from_reference": predict(retarget(ref_params, run, steps)),
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:

    ap = argparse.ArgumentParser(
        prog="python -m slime.simulate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "run_dir", nargs="?", help="a run dir to calibrate from (config.yaml, metrics.jsonl, buffer/)"
    )
    ap.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...")
    ap.add_argument(
        "--compare", nargs="+", default=[], metavar="RUN_DIR", help="runs to predict from RUN_DIR's fit"
    )
    ap.add_argument("--holdout", action="store_true", help="fit on odd steps, compare on even ones")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--params", action="store_true", help="print the parameters used")
    ap.add_argument(
        "--pack", metavar="FILE.json", help="write RUN_DIR as one small JSON file others can read"
    )
    args = ap.parse_args(argv)
    settings = dict(parse_setting(s) for s in args.settings)
    prior = {k: v for k, v in settings.items() if k in ("b_sat", "seed", "warmup")}
    base = Params(**prior)
    measured: dict[str, float] | None = None
    if args.run_dir:
        run = read_run(args.run_dir)
        if args.pack:
            with open(args.pack, "w", encoding="utf-8") as f:
                json.dump(pack_run(run), f)
            print(f"wrote {args.pack}")
            return 0
        steps = [int(r["step"]) for r in run.rows[1:]]
        fit = [s for s in steps if s % 2] if args.holdout else steps
        params, notes = calibrate(run, fit, base)
        measured = measured_summary(run, [s for s in steps if not s % 2] if args.holdout else steps)
        if not args.json:
            print(
                f"calibrated from {args.run_dir}, steps {notes['steps'][0]}-{notes['steps'][-1]}"
                f"{' (odd)' if args.holdout else ''}, {notes['episodes']} recorded episodes"
            )
    else:
        params = base
    params = params.with_(**settings)
    if args.params and not args.json:
        print(describe(params))
    if args.compare:
        if not args.run_dir:
            raise SystemExit("--compare needs a RUN_DIR to calibrate from")
        results = compare_runs(args.run_dir, args.compare, base, args.holdout)
        if args.json:
            print(json.dumps(results, indent=1))
            return 0
        rows = []
        for r in results:
            m, own, ref = r["measured"]["step_s"], r["own"]["step_s"], r["from_reference"]["step_s"]
            rows.append(
                [
                    r["run"],
                    f"{m:.3f}",
                    f"{own:.3f}",
                    f"{own / m - 1:+.0%}",
                    f"{ref:.3f}",
                    f"{ref / m - 1:+.0%}",
                ]
            )
        print(_table(["run", "measured step s", "own fit", "error", "from RUN_DIR", "error"], rows))
        return 0
    grid = _sweep_grid(args.sweep) if args.sweep else []
    if grid:
        results = [(combo, predict(params.with_(**combo))) for combo in grid]
        if args.json:
            print(json.dumps([{**{k: str(v) for k, v in c.items()}, **s} for c, s in results], indent=1))
            return 0
        keys = list(grid[0])
        print(
            _table(
                keys + [h for _, h, _ in COLUMNS],
                [[str(c[k]) for k in keys] + _figures(s) for c, s in results],
            )
        )
        return 0
    predicted = predict(params)
    if args.json:
        print(json.dumps({"predicted": predicted, "measured": measured}, indent=1))
        return 0
    rows = [["predicted", *_figures(predicted)]]
    if measured is not None and not settings:
        rows.insert(0, ["measured", *_figures(measured)])
    elif measured is not None:
        rows.insert(0, ["measured (run's own shape)", *_figures(measured)])
    print(_table(["", *[h for _, h, _ in COLUMNS]], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
