"""Shared data types: the contracts between rollout, buffer and trainer.

Plain, picklable dataclasses with Python lists (no tensors), so they cross Ray boundaries cheaply and
can be written to JSONL for replay. Token-level lists of a Trajectory are all the same length. The
exceptions are `RoutedExperts` (MoE routes, one small integer per token, layer and active expert) and
`IndexerKeys` (the keys a sparse-attention indexer kept, coded by slime.core.keysets): numpy arrays and
bytes, which pickle compactly and are written to JSON as base64.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slime.core import keysets

# Chat message in OpenAI form: {"role": ..., "content": ..., optional "tool_calls"/"tool_call_id"/"name"}.
Message = dict[str, Any]


class Status(enum.StrEnum):
    """How an episode ended."""

    COMPLETED = "completed"  # the environment said done
    TRUNCATED = "truncated"  # a turn/token limit ended it
    ABORTED = "aborted"  # the engine aborted the request (shutdown, weight update in `abort` mode)
    FAILED = "failed"  # the environment or agent raised, hung or returned malformed values


@dataclass
class Task:
    """One dataset row."""

    id: str
    prompt: str | list[Message]  # text (becomes one user message) or chat messages
    env: str = ""  # name of the environment the row was made for (informational)
    env_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"answer": "42"}

    def messages(self) -> list[Message]:
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return [dict(m) for m in self.prompt]


@dataclass(eq=False)
class RoutedExperts:
    """The experts an MoE engine's routers chose, per token and MoE layer (for routing replay).

    ids: [T, L, K] integer array, ids[t, l, k] = the k-th expert chosen for token t in the l-th MoE
        layer, in the router's top-k order (not sorted). dtype uint8 when the model has <= 256 experts,
        else int16. Rows whose `valid` is False hold 0 and mean nothing.
    valid: [T] bool, whether the engine computed token t's routes. False for tokens the engine never ran
        as input: the last generated token of a request, and env tokens appended after the last turn.
    layers: the decoder-layer index of each of the L MoE layers (dense layers are left out), ascending.

    Token t is the t-th token of the sequence (prompt first); its routes are those of the forward that
    had token t as input (the one that computed the logits for token t + 1). When a token was computed
    more than once (each multi-turn prefill recomputes the history, a preempted request is re-prefilled),
    the latest computation is kept.
    """

    ids: np.ndarray
    valid: np.ndarray
    layers: list[int]

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids)
        self.valid = np.asarray(self.valid, dtype=bool)
        if self.ids.ndim != 3 or self.valid.shape != (self.ids.shape[0],):
            raise ValueError(
                f"RoutedExperts: ids must be [T, L, K] and valid [T], got {self.ids.shape} and {self.valid.shape}"
            )
        if self.ids.shape[1] != len(self.layers):
            raise ValueError(
                f"RoutedExperts: ids has {self.ids.shape[1]} layers, `layers` lists {len(self.layers)}"
            )
        self.layers = [int(x) for x in self.layers]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutedExperts):
            return NotImplemented
        return (
            self.layers == other.layers
            and self.ids.dtype == other.ids.dtype
            and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.valid, other.valid)
        )

    @staticmethod
    def id_dtype(num_experts: int) -> np.dtype:
        """The narrowest dtype for expert ids of a model with `num_experts` experts."""
        return np.dtype(np.uint8 if num_experts <= 256 else np.int16)

    @classmethod
    def empty(cls, length: int, layers: Sequence[int], top_k: int, dtype: Any) -> RoutedExperts:
        """`length` tokens with no routes."""
        return cls(
            ids=np.zeros((length, len(layers), top_k), dtype=dtype),
            valid=np.zeros(length, dtype=bool),
            layers=list(layers),
        )

    def padded(self, length: int) -> RoutedExperts:
        """These routes extended (or cut) to `length` tokens; added tokens have none."""
        n = len(self)
        if length <= n:
            return RoutedExperts(self.ids[:length].copy(), self.valid[:length].copy(), self.layers)
        out = RoutedExperts.empty(length, self.layers, self.top_k, self.ids.dtype)
        out.ids[:n] = self.ids
        out.valid[:n] = self.valid
        return out

    def overlay(self, newer: RoutedExperts) -> RoutedExperts:
        """Routes of a sequence computed first here, then (again, for its first len(newer) tokens) by
        `newer`: length max of the two; tokens `newer` computed take its routes, the others keep these."""
        if newer.layers != self.layers or newer.top_k != self.top_k:
            raise ValueError(
                f"cannot merge routes of layers {newer.layers} top-{newer.top_k} into layers "
                f"{self.layers} top-{self.top_k}"
            )
        out = self.padded(max(len(self), len(newer)))
        rows = np.flatnonzero(newer.valid)
        out.ids[rows] = newer.ids[rows]
        out.valid[rows] = True
        return out

    @staticmethod
    def merge(older: RoutedExperts | None, newer: RoutedExperts | None) -> RoutedExperts | None:
        """`older.overlay(newer)`, where either may be None (no routes)."""
        if older is None:
            return newer
        if newer is None:
            return older
        return older.overlay(newer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: the arrays as base64 of their raw bytes."""
        return {
            "dtype": self.ids.dtype.name,
            "shape": list(self.ids.shape),
            "ids": base64.b64encode(np.ascontiguousarray(self.ids).tobytes()).decode("ascii"),
            "valid": base64.b64encode(np.packbits(self.valid).tobytes()).decode("ascii"),
            "layers": list(self.layers),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutedExperts:
        shape = tuple(int(x) for x in d["shape"])
        ids = np.frombuffer(base64.b64decode(d["ids"]), dtype=np.dtype(d["dtype"])).reshape(shape).copy()
        bits = np.frombuffer(base64.b64decode(d["valid"]), dtype=np.uint8)
        valid = np.unpackbits(bits, count=shape[0]).astype(bool)
        return cls(ids=ids, valid=valid, layers=list(d["layers"]))


@dataclass(eq=False)
class IndexerKeys:
    """The keys a sparse-attention engine's indexer kept, per token and indexer layer (indexer replay).

    DeepSeek sparse attention (GLM-5's DSA): each layer's lightning indexer scores the causal keys of
    every query and attention uses only the `topk` best. The query at position t has t + 1 keys: while
    t < topk it keeps them all (a dense row, nothing to record); from t = topk on it keeps exactly
    `topk` (a selective row), and those are what this records.

    topk: the model's `index_topk` (K).
    layers: decoder-layer index of each layer that runs its own indexer (L), ascending; layers that
        reuse another layer's selection (`indexer_types` "shared") are left out: they follow it.
    valid: [T] bool, whether the engine computed token t's selection (its forward with token t as
        input, the one whose logits score token t + 1). False for the last generated token and for
        env tokens appended after the last turn, as for `RoutedExperts`.
    data: the key sets of the selective valid rows (t >= topk and valid[t]), tokens ascending, coded by
        `slime.core.keysets.encode` (about one byte per key, less where consecutive tokens keep the
        same keys).

    `dense()` decodes them to [T, L, K] key positions. Token t's keys are positions in the same
    sequence (0 = its first token). When a token was computed more than once the latest computation
    is kept (`overlay`), as for routes.
    """

    topk: int
    layers: list[int]
    valid: np.ndarray
    data: bytes = b""

    def __post_init__(self) -> None:
        self.valid = np.asarray(self.valid, dtype=bool).reshape(-1)
        self.layers = [int(x) for x in self.layers]
        self.topk = int(self.topk)
        self.data = bytes(self.data)

    def __len__(self) -> int:
        return int(self.valid.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IndexerKeys):
            return NotImplemented
        return (
            self.topk == other.topk
            and self.layers == other.layers
            and np.array_equal(self.valid, other.valid)
            and self.data == other.data
        )

    @property
    def selective(self) -> np.ndarray:
        """[T] bool: the tokens whose selection is recorded (valid, position >= topk)."""
        return self.valid & (np.arange(len(self)) >= self.topk)

    @property
    def nbytes(self) -> int:
        """Bytes these selections take on the wire: the coded sets and the valid bits."""
        return len(self.data) + (len(self) + 7) // 8

    @classmethod
    def empty(cls, length: int, layers: Sequence[int], topk: int) -> IndexerKeys:
        """`length` tokens with no selections."""
        return cls(topk, list(layers), np.zeros(length, dtype=bool))

    @classmethod
    def from_dense(cls, keys: np.ndarray, valid: np.ndarray, topk: int, layers: Sequence[int]) -> IndexerKeys:
        """From [T, L, K] key positions (rows that are not selective, or not valid, are ignored)."""
        valid = np.asarray(valid, dtype=bool)
        out = cls(topk, list(layers), valid)
        rows = np.flatnonzero(out.selective)
        out.data = keysets.encode(np.asarray(keys)[rows], rows, topk) if rows.size else b""
        return out

    @classmethod
    def from_engine(
        cls, keys: np.ndarray, valid: np.ndarray, topk: int, layers: Sequence[int]
    ) -> tuple[IndexerKeys, int]:
        """`from_dense` of what an engine recorded ([T, L, K] key positions in the sequence), with every
        selective row that holds a key outside its causal range 0..t marked not computed (an engine
        that broke its contract must not be replayed); returns the selections and how many rows that
        dropped."""
        keys = np.asarray(keys, dtype=np.int64)
        valid = np.asarray(valid, dtype=bool).copy()
        t = np.arange(len(valid))
        selective = valid & (t >= topk)
        bad = selective & ((keys < 0) | (keys > t[:, None, None])).any(axis=(1, 2))
        valid &= ~bad
        return cls.from_dense(keys, valid, topk, layers), int(bad.sum())

    def dense(self) -> np.ndarray:
        """[T, L, K] int64: the kept key positions (ascending) of each selective row; -1 elsewhere
        (dense rows keep every causal key; rows not valid are unknown)."""
        out = np.full((len(self), len(self.layers), self.topk), -1, dtype=np.int64)
        rows = np.flatnonzero(self.selective)
        if rows.size:
            out[rows] = keysets.decode(self.data, rows, len(self.layers), self.topk)
        return out

    def padded(self, length: int) -> IndexerKeys:
        """These selections extended (or cut) to `length` tokens; added tokens have none."""
        n = len(self)
        if length >= n:  # added rows are not valid, so the coded rows stay as they are
            valid = np.concatenate([self.valid, np.zeros(length - n, dtype=bool)])
            return IndexerKeys(self.topk, self.layers, valid, self.data)
        return IndexerKeys.from_dense(self.dense()[:length], self.valid[:length], self.topk, self.layers)

    def overlay(self, newer: IndexerKeys) -> IndexerKeys:
        """Selections of a sequence computed first here, then (again, for its first len(newer) tokens)
        by `newer`: length max of the two; tokens `newer` computed take its selection."""
        if newer.layers != self.layers or newer.topk != self.topk:
            raise ValueError(
                f"cannot merge indexer selections of layers {newer.layers} top-{newer.topk} into layers "
                f"{self.layers} top-{self.topk}"
            )
        length = max(len(self), len(newer))
        keys = self.padded(length).dense()
        valid = self.padded(length).valid
        rows = np.flatnonzero(newer.valid)
        keys[rows] = newer.padded(length).dense()[rows]
        valid[rows] = True
        return IndexerKeys.from_dense(keys, valid, self.topk, self.layers)

    @staticmethod
    def merge(older: IndexerKeys | None, newer: IndexerKeys | None) -> IndexerKeys | None:
        """`older.overlay(newer)`, where either may be None (no selections)."""
        if older is None:
            return newer
        if newer is None:
            return older
        return older.overlay(newer)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: the coded sets and the bit-packed valid as base64."""
        return {
            "topk": self.topk,
            "layers": list(self.layers),
            "length": len(self),
            "valid": base64.b64encode(np.packbits(self.valid).tobytes()).decode("ascii"),
            "data": base64.b64encode(self.data).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexerKeys:
        bits = np.frombuffer(base64.b64decode(d["valid"]), dtype=np.uint8)
        valid = np.unpackbits(bits, count=int(d["length"])).astype(bool)
        return cls(int(d["topk"]), list(d["layers"]), valid, base64.b64decode(d["data"]))


@dataclass
class Trajectory:
    """One episode, token in / token out.

    token_ids holds the prompt and every turn exactly as the engine produced them or the chat template
    appended them; loss_mask is 1 only on tokens the policy generated; behavior_logprobs and versions
    are per token (0.0 and -1 where loss_mask is 0). routed_experts: for MoE policies when the engine
    captured routes (`rollout.capture_routes`), one row per token (see RoutedExperts); else None.
    indexer_keys: for sparse-attention (DSA) policies when the engine captured the indexer's selections
    (`rollout.capture_indexer`), one row per token (see IndexerKeys); else None.
    An episode split by a context limit is several Trajectories with one `episode_id` and `segment`
    0, 1, ...; they share reward, status, turns and info, and each generated token is in one of them.
    """

    task_id: str
    token_ids: list[int]
    loss_mask: list[int]
    behavior_logprobs: list[float]
    versions: list[int]
    prompt_len: int  # length of the first prompt (before the first generated token)
    reward: float = 0.0
    status: Status = Status.COMPLETED
    turns: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # generate_s, env_s, total_s
    start_version: int = 0  # engine version when the episode started
    routed_experts: RoutedExperts | None = None
    indexer_keys: IndexerKeys | None = None
    # The sampling mask (rollout.top_p / top_k, or an agent's own): per token, how many tokens the
    # distribution it was sampled from kept (0 = the whole vocabulary, and on every token the policy
    # did not generate); None when no token was sampled from a truncated distribution. The trainer
    # scores each token under the same truncation (trainer/losses.py `token_logprobs_from_logits`).
    sample_kept: list[int] | None = None
    # Teacher logprob of each generated token (algorithm.distill; 0.0 elsewhere), None without a teacher.
    teacher_logprobs: list[float] | None = None
    # Which episode this is a segment of (rollout/episode.py: a context limit can split an episode
    # into several training sequences that share its reward); "" = an episode of its own.
    episode_id: str = ""
    segment: int = 0

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        for name in ("loss_mask", "behavior_logprobs", "versions"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Trajectory.{name} has {len(getattr(self, name))} entries, token_ids {n}")
        if self.routed_experts is not None and len(self.routed_experts) != n:
            raise ValueError(f"Trajectory.routed_experts has {len(self.routed_experts)} rows, token_ids {n}")
        if self.indexer_keys is not None and len(self.indexer_keys) != n:
            raise ValueError(f"Trajectory.indexer_keys has {len(self.indexer_keys)} rows, token_ids {n}")
        for name in ("sample_kept", "teacher_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"Trajectory.{name} has {len(values)} entries, token_ids {n}")

    @property
    def num_generated(self) -> int:
        return int(sum(self.loss_mask))

    @property
    def min_version(self) -> int:
        """Oldest policy version among generated tokens (start_version when nothing was generated)."""
        gen = [v for v, m in zip(self.versions, self.loss_mask, strict=True) if m]
        return min(gen) if gen else self.start_version

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (routed_experts and indexer_keys by their to_dict, or None)."""
        d = dataclasses.asdict(dataclasses.replace(self, routed_experts=None, indexer_keys=None))
        d["status"] = self.status.value
        d["routed_experts"] = None if self.routed_experts is None else self.routed_experts.to_dict()
        d["indexer_keys"] = None if self.indexer_keys is None else self.indexer_keys.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        d = dict(d)
        d["status"] = Status(d["status"])
        routes = d.get("routed_experts")
        d["routed_experts"] = None if routes is None else RoutedExperts.from_dict(routes)
        keys = d.get("indexer_keys")
        d["indexer_keys"] = None if keys is None else IndexerKeys.from_dict(keys)
        return cls(**d)


@dataclass
class Group:
    """The n trajectories of one task (group baselines need all of them)."""

    task: Task
    trajectories: list[Trajectory]
    ticket: int = 0  # admission ticket from the buffer (global start order)
    start_version: int = 0  # policy version at admission
    worker: int = 0  # rollout worker index

    @property
    def min_version(self) -> int:
        return min((t.min_version for t in self.trajectories), default=self.start_version)

    @property
    def rewards(self) -> list[float]:
        return [t.reward for t in self.trajectories]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": dataclasses.asdict(self.task),
            "trajectories": [t.to_dict() for t in self.trajectories],
            "ticket": self.ticket,
            "start_version": self.start_version,
            "worker": self.worker,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        return cls(
            task=Task(**d["task"]),
            trajectories=[Trajectory.from_dict(t) for t in d["trajectories"]],
            ticket=d.get("ticket", 0),
            start_version=d.get("start_version", 0),
            worker=d.get("worker", 0),
        )


@dataclass
class Batch:
    """A training batch as the driver handles it (slime/buffer.py `get_batch`): the groups by
    reference (Ray object refs that the trainer ranks resolve; the groups themselves outside Ray)
    and what the driver needs of them, so trajectories never pass through the driver process.

    groups[i] holds the group of ticket tickets[i], task task_ids[i], tokens[i] tokens in all (the
    trainer shards by them); `metrics` are the batch's rollout-side figures at the version it trains
    (slime/metrics.py `batch_metrics`)."""

    groups: list[Any]
    tickets: list[int]
    task_ids: list[str]
    tokens: list[int]
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.groups)

    @classmethod
    def of(cls, groups: list[Group], metrics: dict[str, float] | None = None) -> Batch:
        """A batch holding `groups` themselves (in-process callers, recorded groups)."""
        return cls(
            groups=list(groups),
            tickets=[g.ticket for g in groups],
            task_ids=[g.task.id for g in groups],
            tokens=[sum(len(t.token_ids) for t in g.trajectories) for g in groups],
            metrics=dict(metrics or {}),
        )


@dataclass
class SamplingParams:
    """Engine-independent sampling parameters for one generate call."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @property
    def truncates(self) -> bool:
        """Whether tokens are sampled from a truncated distribution (top-p < 1 or top-k on), whose
        support the engine then records per token (`GenerateOutput.sample_kept`)."""
        return self.temperature > 0 and (self.top_p < 1.0 or (self.top_k is not None and self.top_k > 0))


@dataclass
class GenerateOutput:
    """What an engine returns for one request: only the new tokens."""

    token_ids: list[int]
    logprobs: list[float]  # logprob of each sampled token under softmax(logits / temperature)
    versions: list[int]  # policy version that produced each token
    finish_reason: str  # "stop" | "length" | "abort"
    # MoE routes of the whole sequence, prompt_ids + token_ids (one row per token), when the engine
    # captures them; None otherwise.
    routed_experts: RoutedExperts | None = None
    # The sparse-attention indexer's key selections of the whole sequence, likewise.
    indexer_keys: IndexerKeys | None = None
    # The sampling mask: per new token, the size of the truncated (top-p / top-k) distribution it was
    # sampled from (0 = the whole vocabulary); None when the request did not truncate.
    sample_kept: list[int] | None = None

    def check_lengths(self) -> int:
        """The number of generated tokens; RuntimeError when logprobs or versions do not line up with
        token_ids (an engine bug: the tokens cannot be trained on)."""
        n = len(self.token_ids)
        if len(self.logprobs) != n or len(self.versions) != n:
            raise RuntimeError(
                f"engine returned {n} tokens, {len(self.logprobs)} logprobs, {len(self.versions)} versions"
            )
        if self.sample_kept is not None and len(self.sample_kept) != n:
            raise RuntimeError(
                f"engine returned {n} tokens and {len(self.sample_kept)} sampling-mask entries"
            )
        return n


@dataclass
class WeightManifest:
    """One version of the policy's weights, as the engines find it (checkpoint names, see
    slime/core/checkpoint.py), written by one of the transports of slime/core/transport.py:

    "files": safetensors `files` (one per bucket), on a filesystem the engines read;
    "shm" / "broadcast": a flat buffer laid out as `tensors`, in the slot file `slot` of the engine's
    weights dir (shm) or sent over the engine's group in chunks of `bucket_bytes` (broadcast).
    """

    version: int
    transport: str  # a weights.transport choice other than auto: files | shm | broadcast
    num_bytes: int
    num_tensors: int
    files: list[str] = field(default_factory=list)  # files: absolute paths, in load order
    slot: str = ""  # shm: the slot file's name, relative to the weights dir
    # The flat buffer's layout: (name, dtype, shape, byte offset) per tensor, in load order.
    tensors: list[tuple[str, str, Sequence[int], int]] = field(default_factory=list)
    bucket_bytes: int = 0
    checksums: list[int] = field(default_factory=list)  # broadcast with weights.delta: CRC-32 per bucket


@dataclass
class WeightChannel:
    """How one engine receives pushed weights (slime/core/transport.py `open_receiver`); sent when it starts.

    shm: the weights dir holding trainer rank 0's slot files (the same path on the same node).
    broadcast: trainer rank 0's TCPStore at host:port, the engine's group `key` of `world` ranks
    (rank 0 the trainer, then the engine's workers) and its backend (gloo or nccl).
    """

    transport: str
    weights_dir: str = ""
    host: str = ""
    port: int = 0
    key: str = ""
    world: int = 2
    backend: str = "gloo"
    timeout_s: float = 600.0
