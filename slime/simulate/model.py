"""The model of slime's loop: `Simulation` (one run under `Params`), `simulate`, `summarize` (a run's
means) and `predict` (both at once). Pure Python, no I/O, deterministic given `seed`.

It is a discrete-event simulation (a heap of timed events) of what slime/controller.py,
slime/buffer.py and rollout/worker.py do:

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
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slime.simulate.params import Params


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


def predict(params: Params) -> dict[str, float]:
    """The summary of a simulation of `params` (the steps after its warm-up)."""
    return summarize(simulate(params), params.warmup)
