"""vLLM worker extension: methods that run inside vLLM's worker process, called with `collective_rpc`.

`VLLMEngine` passes `worker_extension_cls="rollout.engines.vllm_ext.SlimeWorkerExtension"`; vLLM mixes this
class into its worker class, so `self` is the vLLM worker (`self.model_runner`, `self.reload_weights`).
Only plain values cross the RPC boundary (vLLM's msgpack): weight channels and manifests go in as
dicts, small dicts come out (passing tensors through `collective_rpc` fails on CPU). The weights
themselves arrive through the worker's own end of the transport (slime/core/transport.py): a mapped
shared-memory slot, or a torch.distributed group it joined.

This module must not import vLLM at import time beyond what the worker already has loaded; it is
imported by the worker process when the engine starts.

The methods' machinery lives by role in two modules beside this one, loaded with it in the worker:

- rollout/engines/vllm_reload.py: the guards `slime_load_weights` puts around vLLM's in-place reload
  (the expected "not loaded" warnings filtered, an unused embedding prepack skipped, tied heads and
  CPU fused-MoE experts re-derived afterwards);
- rollout/engines/vllm_capture.py: what the worker records while the model runs, per request:
  sampling masks (`slime_enable_sample_masks`), MoE routes (`slime_enable_route_capture`) and
  sparse-attention indexer selections (`slime_enable_indexer_capture`), handed out once a request
  finishes (`slime_take_sample_masks`, `slime_take_routes`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rollout.engines.vllm_capture import (
    _IndexerCapture,
    _RouteCapture,
    _SampleMaskCapture,
    dsa_indexer_layers,
    moe_routers,
)
from rollout.engines.vllm_reload import (
    RELOAD_LOGGER,
    _counted,
    _ExpectedNotLoaded,
    _never_in_a_checkpoint,
    _no_unused_embedding_prepack,
    _refresh_cpu_moe,
    _refresh_tied_heads,
)

logger = logging.getLogger(__name__)


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
