"""What a simulation of slime's loop takes (slime/simulate/model.py runs it): `Params`, every field
of which `--set key=value` sets, and the workload's distributions (`Dist`), among them `recorded`:
`RecordedEpisode`s read from a run dir. Pure data and its validation: no simulation, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

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
