"""The engine contract: what every inference engine gives the rollout, written once.

An engine is one model replica behind an asyncio interface (`Engine` below). Two implement it:
`rollout/engines/vllm.py` (vLLM's AsyncLLM: the default on every machine) and
`rollout/engines/hf.py` (transformers generate: a fallback for architectures vLLM lacks, and the
reference tests compare vLLM with). `make_engine` (rollout/engines/__init__.py) builds the configured
one from `EngineSettings`. What every engine promises:

- Token in, token out: `generate(prompt_ids, sampling, request_id)` continues exactly `prompt_ids`
  (never re-tokenised) and returns only the new tokens, each with its logprob under the sampling
  policy softmax(logits / temperature) and the policy version that produced it (`GenerateOutput`).
- Weight updates during generation: `update_weights(manifest, mode, kv_after_update)` loads a
  version between decoding steps; tokens after it carry the new version. `mode="keep"`: in-flight
  requests continue on the new weights; `mode="abort"`: they are aborted and resumed by `generate`
  itself from prompt + tokens so far, so the caller sees one uninterrupted output. `kv_after_update`
  says whether in-flight requests keep their old-weight KV (`keep`) or are prefilled again
  (`recompute`). `open_weights(channel)` opens the engine's end of the weight transport once
  (slime/core/transport.py).
- Abort and progress: `abort(request_id)` ends a request with finish_reason "abort" and the tokens
  so far (never resumed); `wait_generated(request_id, n)` resolves once a running request has n
  tokens (tests land an update or an abort mid-generation with it, without sleeping).
- The sampling mask: a request that samples from a truncated distribution (top_p < 1 or top_k > 0)
  gets, per new token, the size of the support it was sampled from (`GenerateOutput.sample_kept`),
  so the trainer scores it under the same truncation; its logprobs are of that truncated distribution.
- Routes: an engine built with `capture_routes` returns every output's MoE routes
  (`GenerateOutput.routed_experts`, slime/core/types.py RoutedExperts); one that cannot capture them
  refuses `capture_routes` (at construction or start).
- Indexer selections: an engine built with `capture_indexer` returns, for a sparse-attention (DSA)
  model, the keys every indexer layer kept for every token (`GenerateOutput.indexer_keys`,
  slime/core/types.py IndexerKeys); one that cannot refuses `capture_indexer` likewise.
- Lifecycle: `start()` (on the loop that will serve it), `health()`, `shutdown()` (idempotent).

The generate/resume loop both engines share is `RequestBook.generate`: it tracks the requests in
flight, waits out a weight update before a segment starts, resubmits a request aborted by an
abort-mode update from prompt + tokens so far, and stops on the request's budget or a user abort;
each engine supplies only how one segment runs (`SegmentRunner`).

`import rollout.engines.base` imports neither vLLM nor torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from slime.core.config import KvAfterUpdate, WeightUpdateMode
from slime.core.types import (
    GenerateOutput,
    IndexerKeys,
    RoutedExperts,
    SamplingParams,
    WeightChannel,
    WeightManifest,
)


class Engine(Protocol):
    """The contract of the module docstring; `version` is the policy version now loaded,
    `last_update` the timings of the last `update_weights` (for logs and benchmarks)."""

    version: int
    last_update: dict[str, Any]

    async def start(self) -> None: ...

    async def health(self) -> bool: ...

    async def shutdown(self) -> None: ...

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, request_id: str | None = None
    ) -> GenerateOutput: ...

    async def abort(self, request_id: str) -> None: ...

    async def wait_generated(self, request_id: str, n: int) -> int: ...

    async def open_weights(self, channel: WeightChannel) -> None: ...

    async def update_weights(
        self, manifest: WeightManifest, mode: str = "keep", kv_after_update: str = "keep"
    ) -> float: ...


@dataclass(frozen=True)
class EngineSettings:
    """How to build an engine; every engine takes these fields as keyword arguments.

    dtype: "auto" (bf16 only where the hardware computes it natively, else float32), "float32" or
    "bfloat16". num_threads: OpenMP/torch threads of the process that runs the model; None inherits
    the environment (on a shared CPU machine give each engine its own budget: oversubscribed OpenMP
    threads spin). work_dir: where the vLLM engine keeps its caches and sockets (a temporary dir when
    None). kv_cache_gib (CPU), gpu_memory_utilization (GPU), enforce_eager, tensor_parallel_size and
    weight_alias (serve pushed weights
    from the shm slot: rollout/engines/cpu_alias.py) apply to vLLM only; max_batch_size to the transformers
    engine only.
    """

    model_dir: str
    dtype: str = "auto"
    max_model_len: int = 2048
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    work_dir: str | None = None
    num_threads: int | None = None
    max_batch_size: int = 16
    capture_routes: bool = False
    capture_indexer: bool = False
    weight_alias: bool = False
    gpu_memory_utilization: float = 0.85
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")


@contextlib.contextmanager
def scoped_env(updates: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables inside the block; restore them after it.

    For settings that processes spawned inside the block must inherit, without leaking them into the
    rest of this process.
    """
    saved = {k: os.environ.get(k) for k in updates}
    _apply_env(updates)
    try:
        yield
    finally:
        _apply_env(saved)


def _apply_env(values: Mapping[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def check_update_mode(mode: str) -> WeightUpdateMode:
    """`mode` as the config's WeightUpdateMode (`rollout.weight_update_mode`); ValueError naming the
    choices otherwise."""
    choices = tuple(m.value for m in WeightUpdateMode)
    if mode not in choices:
        raise ValueError(f"weight update mode must be one of {choices}, got {mode!r}")
    return WeightUpdateMode(mode)


def check_kv_after_update(kv: str) -> KvAfterUpdate:
    """`kv` as the config's KvAfterUpdate (`rollout.kv_after_update`); ValueError naming the choices
    otherwise."""
    choices = tuple(k.value for k in KvAfterUpdate)
    if kv not in choices:
        raise ValueError(f"kv_after_update must be one of {choices}, got {kv!r}")
    return KvAfterUpdate(kv)


class ProgressTracker:
    """Token counts of running requests, with awaitable thresholds (`wait`).

    Lets a caller wait for "request X has produced n tokens" without polling or sleeping (a weight
    update or an abort can then be put in the middle of a generation). Loop-thread only.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future]]] = {}

    def begin(self, rid: str) -> None:
        self.counts[rid] = 0

    def update(self, rid: str, count: int) -> None:
        if rid not in self.counts:
            return
        self.counts[rid] = count
        waiters = self._waiters.get(rid)
        if waiters:
            keep = []
            for n, fut in waiters:
                if count >= n:
                    if not fut.done():
                        fut.set_result(count)
                else:
                    keep.append((n, fut))
            self._waiters[rid] = keep

    def end(self, rid: str) -> None:
        count = self.counts.pop(rid, 0)
        for _, fut in self._waiters.pop(rid, []):
            if not fut.done():
                fut.set_result(count)

    async def wait(self, rid: str, n: int) -> int:
        """Wait until request `rid` has at least `n` tokens or has ended; its count then (0 when it is
        not running)."""
        count = self.counts.get(rid)
        if count is None or count >= n:
            return count or 0
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(rid, []).append((n, fut))
        return await fut


# ------------------------------------------------------------------------------- the shared loop
@dataclass
class Segment:
    """What one submission of a request produced (its tokens, their logprobs and versions) and how
    it ended: `reason` "stop" | "length" | "abort"; `by_update` when an abort-mode weight update
    aborted it (then it is resumed); `routes` and indexer `keys` of the sequence so far, when the
    engine captures them."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    reason: str = "length"
    by_update: bool = False
    routes: RoutedExperts | None = None
    keys: IndexerKeys | None = None
    kept: list[int] | None = None  # the sampling mask of `tokens` (truncating requests only)


# (request id, segment index (0, then 1.. for resumptions), prompt = prompt ids + tokens so far,
#  tokens still allowed, tokens so far) -> Segment
SegmentRunner = Callable[[str, int, list[int], int, int], Awaitable[Segment]]


class RequestBook:
    """The requests in flight of one engine and the generate/resume loop around its segments.

    `active[rid]` is the engine's handle of request `rid` (vLLM: the id of the current segment's
    vLLM request; transformers: its queue entry). `not_updating` is clear while a weight update
    loads: a segment never starts then (its version, prefix-cache salt and resumption all need the
    version it will run under). Event-loop thread only.
    """

    def __init__(self) -> None:
        self.active: dict[str, Any] = {}
        self.progress = ProgressTracker()
        self.user_aborted: set[str] = set()
        self.not_updating = asyncio.Event()
        self.not_updating.set()

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: SamplingParams,
        request_id: str | None,
        run_segment: SegmentRunner,
        finish: Callable[[int], RoutedExperts | None] | None = None,
        finish_keys: Callable[[int], IndexerKeys | None] | None = None,
    ) -> GenerateOutput:
        """Run request `request_id` (a fresh id when None) to its end as segments: resubmitted after
        an abort-mode update aborted it, ended by its budget (`sampling.max_tokens`), a stop, or a
        user `abort`. `finish(length)` gives empty routes of the whole sequence, for a request no
        segment captured any for (engines that capture them; None otherwise); `finish_keys` the same
        for indexer selections."""
        rid = request_id or uuid.uuid4().hex
        if rid in self.active:
            raise ValueError(f"request_id {rid!r} is already running")
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        kept: list[int] = []
        routes: RoutedExperts | None = None
        keys: IndexerKeys | None = None
        reason = "length"
        segment = 0
        self.active[rid] = None
        self.progress.begin(rid)
        try:
            while True:
                remaining = sampling.max_tokens - len(tokens)
                if remaining <= 0:
                    reason = "length"
                    break
                if not self.not_updating.is_set():
                    await self.not_updating.wait()
                if rid in self.user_aborted:
                    reason = "abort"
                    break
                seg = await run_segment(rid, segment, list(prompt_ids) + tokens, remaining, len(tokens))
                segment += 1
                tokens += seg.tokens
                logprobs += seg.logprobs
                versions += seg.versions
                kept += seg.kept if seg.kept is not None else [0] * len(seg.tokens)
                routes = RoutedExperts.merge(routes, seg.routes)
                keys = IndexerKeys.merge(keys, seg.keys)
                if seg.by_update and rid not in self.user_aborted:
                    continue  # the next segment waits for the new weights
                reason = seg.reason
                break
        finally:
            self.active.pop(rid, None)
            self.progress.end(rid)
            self.user_aborted.discard(rid)
        length = len(prompt_ids) + len(tokens)
        if finish is not None:
            routes = routes.padded(length) if routes is not None else finish(length)
        if finish_keys is not None:
            keys = keys.padded(length) if keys is not None else finish_keys(length)
        return GenerateOutput(
            token_ids=tokens,
            logprobs=logprobs,
            versions=versions,
            finish_reason=reason,
            routed_experts=routes,
            indexer_keys=keys,
            sample_kept=kept if sampling.truncates else None,
        )
