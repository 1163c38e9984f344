"""A transformers-generate engine with `VLLMEngine`'s interface.

A fallback for architectures vLLM lacks (`rollout.engine: transformers`), and a reference the tests
compare vLLM against; never the default: it has no paged KV cache and no continuous batching.

How it works. One scheduler task owns the model. It takes up to `max_batch_size` queued requests
that share sampling settings, left-pads them into one batch and runs `model.generate` in a thread.
A stopping criterion runs between decoding steps, in that thread; it
- records which policy version produced each step's tokens,
- applies a pending weight update (so `keep` mode switches weights mid-generation), then, for an
  `abort`-mode update or `kv_after_update="recompute"`, ends every row: those requests are resubmitted
  from prompt + tokens so far and prefilled again with the new weights (as `VLLMEngine` does); with
  `kv_after_update="keep"` the rows go on over the KV cache computed with the old weights,
- ends rows that were aborted by the user or reached their own `max_tokens`.
Logprobs are of softmax(logits / temperature), the policy the trainer recomputes; a request with top-p or
top-k is warped by the engine itself as vLLM warps it (`truncate_logits`: temperature, top-k, top-p), its
logprobs are of the truncated distribution and each token's support size is its sampling mask, as
`VLLMEngine` reports them. A request with
a `seed` runs in a batch of its own after `torch.manual_seed(seed)`.

Routes and indexer selections (`capture_routes`, `capture_indexer`): forward hooks on the model's MoE
routers and sparse-attention indexers record every computed token's experts and kept keys
(rollout/engines/hf_capture.py); each finished row takes its own, so outputs carry `routed_experts` and
`indexer_keys` as the vLLM engine's do (the last generated token has none).

Weights: `open_weights(channel)` opens the engine's end of the weight transport in this process
(slime/core/transport.py); `update_weights` takes the manifest's tensors through it (or from its safetensors
files; checkpoint names, see slime.core.checkpoint) and loads them with
`load_state_dict` when the names are the model's own; otherwise (transformers v5 layouts such as fused
MoE experts) through transformers' checkpoint conversion, as `from_pretrained` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from rollout.engines.base import (
    EngineSettings,
    RequestBook,
    Segment,
    check_kv_after_update,
    check_update_mode,
)
from slime.core.config import KvAfterUpdate, WeightUpdateMode
from slime.core.types import (
    GenerateOutput,
    IndexerKeys,
    RoutedExperts,
    SamplingParams,
    WeightChannel,
    WeightManifest,
)

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "auto": "float32",
}


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    sampling: SamplingParams
    max_new: int
    future: asyncio.Future
    aborted: bool = False  # set by the user's abort(); read by the generation thread
    generated: int = 0  # tokens so far, all segments (written by the generation thread)


@dataclass
class _Pending:
    state: dict[str, Any]
    version: int
    end_rows: bool  # running rows end and are resubmitted (abort mode, or their KV is recomputed)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    applied: bool = False
    load_s: float = 0.0


@dataclass
class _SegmentResult:
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    reason: str  # stop | length | abort | update_abort ("" while running)
    routes: RoutedExperts | None = None  # of prompt + tokens, when captured
    keys: IndexerKeys | None = None
    kept: list[int] = dataclasses.field(default_factory=list)  # the sampling mask of `tokens`


class TransformersEngine:
    """Same contract as `rollout.engines.vllm.VLLMEngine`; see that class for the method semantics.

    kv_cache_gib, enforce_eager, tensor_parallel_size and work_dir are accepted for interface parity and
    ignored. num_threads calls `torch.set_num_threads` for this whole process (the model runs in-process).
    """

    def __init__(self, model_dir: str, **options: Any) -> None:
        """`options`: the other fields of `EngineSettings` (rollout/engines/base.py)."""
        self.settings = EngineSettings(model_dir, **options)
        if self.settings.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.settings.dtype!r}")
        self.model_dir = model_dir
        self.dtype = _DTYPES[self.settings.dtype]
        self.max_model_len = self.settings.max_model_len
        self.max_batch_size = self.settings.max_batch_size
        self.version: int = 0
        self.start_s: float | None = None
        self.last_update: dict[str, Any] = {}
        self._model: Any = None
        self._tok: Any = None
        self._eos: set[int] = set()
        self._pad: int = 0
        self._queue: list[_Request] = []
        self.requests = RequestBook()  # request id -> its queue entry, progress, aborts
        self._wake: asyncio.Event | None = None
        self._update_lock: asyncio.Lock | None = None
        self._pending: _Pending | None = None
        self._pending_lock = threading.Lock()
        self._scheduler: asyncio.Task | None = None
        self._receiver: Any = None  # this engine's end of the weight transport (open_weights)
        self._capture: Any = None  # hf_capture.Capture when routes or indexer selections are captured

    # ------------------------------------------------------------------ lifecycle

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.settings.num_threads:
            torch.set_num_threads(self.settings.num_threads)
        torch.manual_seed(self.settings.seed)
        self._tok = AutoTokenizer.from_pretrained(self.model_dir)
        self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.dtype))
        self._model.eval()
        if self.settings.capture_routes or self.settings.capture_indexer:
            from rollout.engines.hf_capture import Capture

            self._capture = Capture(self._model, self.settings.capture_routes, self.settings.capture_indexer)
        eos = self._model.generation_config.eos_token_id
        if eos is None:
            eos = self._model.config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = self._tok.pad_token_id
        if pad is None:
            pad = min(self._eos) if self._eos else 0
        self._pad = int(pad)

    async def start(self) -> None:
        """Load the model and start the scheduler task on the running loop."""
        if self._model is not None:
            raise RuntimeError("engine already started")
        t0 = time.perf_counter()
        await asyncio.to_thread(self._load)
        self._wake = asyncio.Event()
        self._update_lock = asyncio.Lock()
        self._scheduler = asyncio.create_task(self._schedule(), name="hf-engine-scheduler")
        self.start_s = time.perf_counter() - t0

    async def shutdown(self) -> None:
        """Stop the scheduler; queued requests end with "abort". Idempotent."""
        task, self._scheduler = self._scheduler, None
        for req in list(self._queue) + [r for r in self.requests.active.values() if r is not None]:
            req.aborted = True
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        for req in self._queue:
            if not req.future.done():
                req.future.set_result(_SegmentResult([], [], [], "abort"))
        self._queue.clear()
        self._model = None

    async def health(self) -> bool:
        return self._model is not None and self._scheduler is not None and not self._scheduler.done()

    # ------------------------------------------------------------------ generation

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, request_id: str | None = None
    ) -> GenerateOutput:
        """See `VLLMEngine.generate`."""
        if self._model is None or self._wake is None:
            raise RuntimeError("engine is not started (call `await engine.start()`)")
        if len(prompt_ids) + sampling.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)}) + max_tokens ({sampling.max_tokens}) exceeds max_model_len "
                f"{self.max_model_len}"
            )
        req = _Request(
            request_id or uuid.uuid4().hex, [], sampling, 0, asyncio.get_running_loop().create_future()
        )
        cap = self._capture
        return await self.requests.generate(
            prompt_ids,
            sampling,
            req.rid,
            functools.partial(self._segment, req),
            self._no_routes if cap is not None and cap.routers else None,
            self._no_keys if cap is not None and cap.indexers else None,
        )

    def _no_routes(self, length: int) -> RoutedExperts:
        cap = self._capture
        return RoutedExperts.empty(length, cap.route_layers, cap.top_k, cap.route_dtype)

    def _no_keys(self, length: int) -> IndexerKeys:
        cap = self._capture
        return IndexerKeys.empty(length, cap.index_layers, cap.index_topk)

    async def _segment(
        self, req: _Request, rid: str, index: int, prompt_ids: list[int], remaining: int, done: int
    ) -> Segment:
        """Queue one segment of `req` for the scheduler and wait for the step that ends it."""
        assert self._wake is not None
        self.requests.active[rid] = req
        req.prompt = prompt_ids
        req.max_new = remaining
        req.future = asyncio.get_running_loop().create_future()
        self._queue.append(req)
        self._wake.set()
        try:
            seg: _SegmentResult = await req.future
        except asyncio.CancelledError:
            req.aborted = True
            if req in self._queue:
                self._queue.remove(req)
            raise
        by_update = seg.reason == "update_abort"
        return Segment(
            tokens=seg.tokens,
            logprobs=seg.logprobs,
            versions=seg.versions,
            reason="abort" if by_update else seg.reason,
            by_update=by_update and rid not in self.requests.user_aborted,
            routes=seg.routes,
            keys=seg.keys,
            kept=seg.kept if req.sampling.truncates else None,
        )

    async def wait_generated(self, request_id: str, n: int) -> int:
        """See `VLLMEngine.wait_generated`."""
        return await self.requests.progress.wait(request_id, n)

    async def abort(self, request_id: str) -> None:
        """See `VLLMEngine.abort`."""
        req = self.requests.active.get(request_id)
        if req is None:
            return
        self.requests.user_aborted.add(request_id)
        req.aborted = True
        if req in self._queue:  # not started yet: end it now
            self._queue.remove(req)
            if not req.future.done():
                req.future.set_result(_SegmentResult([], [], [], "abort"))

    def _take_batch(self) -> list[_Request]:
        first = self._queue[0]
        key = _batch_key(first.sampling)
        batch = [first]
        if first.sampling.seed is None:
            for req in self._queue[1:]:
                if len(batch) >= self.max_batch_size:
                    break
                if _batch_key(req.sampling) == key:
                    batch.append(req)
        for req in batch:
            self._queue.remove(req)
        return batch

    async def _schedule(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending is not None or self._queue:
                if self._pending is not None:
                    await asyncio.to_thread(self._apply_pending)
                    continue
                # Let tasks that became ready in the same loop iteration enqueue too, so requests
                # submitted together (asyncio.gather) share one batch.
                await asyncio.sleep(0)
                batch = self._take_batch()
                loop = asyncio.get_running_loop()
                try:
                    await asyncio.to_thread(self._run_batch, batch, loop)
                except Exception as exc:  # a failed batch fails its requests, not the engine
                    logger.exception("transformers generate failed")
                    for req in batch:
                        if not req.future.done():
                            req.future.set_exception(exc)

    def _run_batch(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        """Run one left-padded batch through `model.generate`; each row's future is resolved (on `loop`)
        at the decoding step that ends it, so short requests return while long ones keep going."""
        import torch
        from transformers import (
            GenerationConfig,
            LogitsProcessor,
            LogitsProcessorList,
            StoppingCriteria,
            StoppingCriteriaList,
        )

        engine = self
        n = len(batch)
        s = batch[0].sampling
        width = max(len(r.prompt) for r in batch)
        ids = torch.full((n, width), self._pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt) :] = 1
        rows = [_SegmentResult([], [], [], "") for _ in batch]
        last_logprobs: list[Any] = [None]
        last_kept: list[Any] = [None]
        capture = self._capture
        if capture is not None:
            capture.begin([width - len(r.prompt) for r in batch], width + max(r.max_new for r in batch))

        def finish(i: int, reason: str) -> None:
            rows[i].reason = reason
            if capture is not None:  # what was computed so far: prompt + all but the newest token
                rows[i].routes, rows[i].keys = capture.take(i, len(batch[i].prompt) + len(rows[i].tokens))
            fut, res = batch[i].future, rows[i]

            def resolve() -> None:
                if not fut.done():
                    fut.set_result(res)

            loop.call_soon_threadsafe(resolve)

        tau = s.temperature if s.temperature > 0 else 1.0

        greedy = s.temperature <= 0
        truncate = s.truncates

        class _CaptureRaw(LogitsProcessor):
            # Custom processors run before temperature / top-k / top-p, so these are the raw logits.
            # A truncating request is warped here, as vLLM does it (temperature, then top-k, then
            # top-p), and sampled from the result; the logprobs are of that distribution and the
            # support size of each row is its sampling mask.
            def __call__(self, input_ids, scores):
                if not truncate:
                    last_logprobs[0] = torch.log_softmax(scores.float() / tau, dim=-1)
                    return scores
                z = truncate_logits(scores.float() / tau, s.top_k, s.top_p)
                last_logprobs[0] = torch.log_softmax(z, dim=-1)
                last_kept[0] = torch.isfinite(z).sum(dim=-1).tolist()
                return z

        class _Control(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                version = engine.version  # the weights that produced this step's tokens
                new = input_ids[:, -1].tolist()
                for i, r in enumerate(batch):
                    if rows[i].reason:
                        continue
                    row = rows[i]
                    row.tokens.append(new[i])
                    r.generated += 1
                    loop.call_soon_threadsafe(engine.requests.progress.update, r.rid, r.generated)
                    row.logprobs.append(float(last_logprobs[0][i, new[i]]))
                    row.versions.append(version)
                    if last_kept[0] is not None:
                        row.kept.append(int(last_kept[0][i]))
                    if new[i] in engine._eos:
                        finish(i, "stop")
                    elif r.sampling.stop and engine._hits_stop(row.tokens, r.sampling.stop):
                        finish(i, "stop")
                    elif r.aborted:
                        finish(i, "abort")
                    elif len(row.tokens) >= r.max_new:
                        finish(i, "length")
                if engine._apply_pending_in_batch():  # abort-mode update: end every running row
                    for i in range(n):
                        if not rows[i].reason:
                            finish(i, "update_abort")
                return torch.tensor([bool(row.reason) for row in rows], device=input_ids.device)

        cfg = GenerationConfig(
            max_new_tokens=max(r.max_new for r in batch),
            do_sample=not greedy,
            # A truncating request's warping is done by _CaptureRaw (temperature included).
            temperature=None if greedy else (1.0 if truncate else s.temperature),
            top_p=None if greedy or truncate else s.top_p,
            top_k=None if greedy or truncate or s.top_k is None or s.top_k <= 0 else s.top_k,
            eos_token_id=sorted(self._eos) or None,
            pad_token_id=self._pad,
        )
        if s.seed is not None:
            torch.manual_seed(s.seed)
        try:
            with torch.inference_mode():
                self._model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    generation_config=cfg,
                    logits_processor=LogitsProcessorList([_CaptureRaw()]),
                    stopping_criteria=StoppingCriteriaList([_Control()]),
                )
            for i in range(n):  # generate stopped by itself (it should not): report what each row has
                if not rows[i].reason:
                    finish(i, "length")
        finally:
            if capture is not None:
                capture.end()

    def _hits_stop(self, toks: list[int], stops: list[str]) -> bool:
        """Whether the text of the last few tokens contains a stop string. Checked as each token arrives,
        so the first hit ends the row at the token that completed the stop string (as vLLM does)."""
        tail = self._tok.decode(toks[-8:], skip_special_tokens=True)
        return any(st in tail for st in stops)

    # ------------------------------------------------------------------ weights

    def _load_state(self, state: dict[str, Any]) -> float:
        import torch

        t0 = time.perf_counter()
        model = self._model
        own = model.state_dict()
        with torch.no_grad():
            if all(k in own for k in state):
                missing, unexpected = model.load_state_dict(state, strict=False)
                assert not unexpected, unexpected
            else:
                from transformers.core_model_loading import convert_and_load_state_dict_in_model
                from transformers.modeling_utils import LoadStateDictConfig

                mapping = getattr(model, "_weight_conversions", None)
                if mapping is None:
                    from transformers.conversion_mapping import get_model_conversion_mapping

                    mapping = get_model_conversion_mapping(model, add_legacy=False)
                cfg = LoadStateDictConfig(weight_mapping=mapping, dtype=model.dtype)
                convert_and_load_state_dict_in_model(model, dict(state), cfg)
            if getattr(model.config, "tie_word_embeddings", False):
                model.tie_weights()
        return time.perf_counter() - t0

    def _finish_pending(self, p: _Pending) -> None:
        def resolve() -> None:
            if not p.future.done():
                p.future.set_result(p.load_s)

        p.loop.call_soon_threadsafe(resolve)

    def _apply_pending(self) -> _Pending | None:
        """Apply a pending weight update, if any (between decoding steps or while idle); returns it."""
        with self._pending_lock:
            p, self._pending = self._pending, None
        if p is not None:
            p.load_s = self._load_state(p.state)
            self.version = p.version
            self._finish_pending(p)
        return p

    def _apply_pending_in_batch(self) -> bool:
        """Called between decoding steps: apply a pending update; True if rows must end (to be resumed
        by `generate`: abort mode, or KV recomputed with the new weights)."""
        p = self._apply_pending()
        return p is not None and p.end_rows

    async def open_weights(self, channel: WeightChannel) -> None:
        """See `VLLMEngine.open_weights` (the receiver runs in this process; joining a broadcast group
        waits for trainer rank 0 in a thread)."""
        from slime.core.transport import open_receiver

        if self._receiver is not None:
            self._receiver.close()
        self._receiver = await asyncio.to_thread(open_receiver, channel)

    async def update_weights(
        self, manifest: WeightManifest, mode: str = "keep", kv_after_update: str = "keep"
    ) -> float:
        """See `VLLMEngine.update_weights`: loads between decoding steps; returns seconds. The KV cache
        is recomputed by ending the running rows, which `generate` resubmits (prompt + tokens so far)."""
        mode = check_update_mode(mode)
        kv = check_kv_after_update(kv_after_update)
        if self._model is None or self._wake is None:
            raise RuntimeError("engine is not started (call `await engine.start()`)")
        from slime.core.transport import manifest_tensors

        assert self._update_lock is not None
        async with self._update_lock:
            t0 = time.perf_counter()
            state = await asyncio.to_thread(lambda: dict(manifest_tensors(manifest, self._receiver)))
            loop = asyncio.get_running_loop()
            end_rows = mode is WeightUpdateMode.abort or kv is KvAfterUpdate.recompute
            p = _Pending(state, manifest.version, end_rows, loop.create_future(), loop)
            self.requests.not_updating.clear()
            try:
                with self._pending_lock:
                    self._pending = p
                self._wake.set()
                await p.future
            finally:
                self.requests.not_updating.set()
            elapsed = time.perf_counter() - t0
            self.last_update = {
                "total_s": elapsed,
                "load_s": p.load_s,
                "version": manifest.version,
                "mode": mode.value,
                "kv_after_update": kv.value,
                "num_tensors": len(state),
            }
            return elapsed


def _batch_key(s: SamplingParams) -> tuple:
    return (s.temperature, s.top_p, s.top_k, s.seed)


def truncate_logits(z: Any, top_k: int | None, top_p: float) -> Any:
    """vLLM's top-k then top-p truncation (vllm/v1/sample/ops/topk_topp_sampler.py
    `apply_top_k_top_p_pytorch`) of temperature-scaled logits `z` [n, V]: logits outside the support
    become -inf. Ties at the top-k boundary are kept; top-p keeps the smallest set of largest logits
    whose probability reaches p (at least one)."""
    import torch

    z = z.clone()
    sorted_z, order = z.sort(dim=-1, descending=False)
    if top_k is not None and 0 < top_k < z.shape[-1]:
        kth = sorted_z[:, -top_k : -top_k + 1] if top_k > 1 else sorted_z[:, -1:]
        sorted_z = sorted_z.masked_fill(sorted_z < kth, -torch.inf)
    if top_p < 1.0:
        cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        sorted_z = sorted_z.masked_fill(drop, -torch.inf)
    return z.scatter(-1, order, sorted_z)
