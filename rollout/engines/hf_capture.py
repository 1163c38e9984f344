"""What the transformers engine records besides tokens: MoE routes and sparse-attention key selections.

`rollout/engines/hf.py` runs one left-padded batch at a time through `model.generate`: a prefill of
the padded prompts, then one token per row and step over the KV cache. `Capture` hooks the model once,
when the engine loads it:

- a forward pre-hook and hook on the model: which padded positions the forward computes (the prefill
  covers 0 .. width - 1, decoding step j the position width + j - 1, counted from `begin`), and, once
  it returned, that they were computed;
- a forward hook on each MoE router whose output is (logits, weights, top-k ids) - Qwen3-MoE, GLM-4.5
  and GLM-5 routers, the kinds trainer/routing.py replays: its ids [B * S, K], tokens row-major;
- a forward hook on each sparse-attention indexer (GLM-5's `GlmMoeDsaIndexer`, DeepSeek-V3.2's
  `DeepseekV32Indexer`): the [B, S, k] key positions it kept (int32, in the batch's padded key
  coordinates; k = min(index_topk, keys so far)). Layers that reuse another layer's selection
  (`indexer_types` "shared") have no indexer and follow the one they reuse.

The hooks write into per-batch numpy buffers in padded coordinates. `take(row, length)` turns a row's
first `length` tokens into sequence coordinates (row i's padded position q is its token q - pads[i],
keys likewise) as `RoutedExperts` and `IndexerKeys`. A token has routes and a selection once a forward
computed it: the last token of a finished row (sampled, never fed back) has none, as with vLLM.

Selective rows only (position t >= index_topk; `IndexerKeys`): there the indexer's k kept keys are real
causal keys of the row, because left padding and later positions score -inf (the additive mask) and a
selective query has more than k real keys. A row that breaks this (it would be an engine bug) is
recorded as not computed, with a warning, rather than stored wrong.

Tokens are computed once per segment; the engine's own overlay (RequestBook) keeps the latest
computation when a request is prefilled again (an abort-mode update, or `kv_after_update=recompute`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from slime.core.types import IndexerKeys, RoutedExperts

logger = logging.getLogger(__name__)

ROUTER_CLASSES = ("Qwen3MoeTopKRouter", "Glm4MoeTopkRouter", "GlmMoeDsaTopkRouter")
INDEXER_CLASSES = ("GlmMoeDsaIndexer", "DeepseekV32Indexer")


def _decoder_layers(model: Any) -> list[Any]:
    body = getattr(model, "model", model)
    return list(getattr(body, "layers", []) or [])


def find_routers(model: Any) -> list[tuple[int, Any]]:
    """(decoder-layer index, router) of each MoE layer whose router kind is in ROUTER_CLASSES."""
    found = []
    for i, layer in enumerate(_decoder_layers(model)):
        gate = getattr(getattr(layer, "mlp", None), "gate", None)
        if gate is not None and type(gate).__name__ in ROUTER_CLASSES:
            found.append((i, gate))
    return found


def find_indexers(model: Any) -> list[tuple[int, Any]]:
    """(decoder-layer index, indexer) of each layer that runs its own sparse-attention indexer."""
    found = []
    for i, layer in enumerate(_decoder_layers(model)):
        indexer = getattr(getattr(layer, "self_attn", None), "indexer", None)
        if indexer is not None and type(indexer).__name__ in INDEXER_CLASSES:
            found.append((i, indexer))
    return found


def has_moe(model: Any) -> bool:
    """Whether any decoder layer has an MoE block (experts), of any router kind."""
    return any(hasattr(getattr(layer, "mlp", None), "experts") for layer in _decoder_layers(model))


class Capture:
    """Routes and/or indexer selections of the engine's batches (see the module docstring).

    Raises ValueError at construction when asked for what the model does not have (no router of a
    known kind, no indexer), naming the setting to turn off.
    """

    def __init__(self, model: Any, routes: bool, indexer: bool) -> None:
        self.routers = find_routers(model) if routes else []
        self.indexers = find_indexers(model) if indexer else []
        if routes and not self.routers:
            kind = "an MoE router of another kind" if has_moe(model) else "no MoE layers"
            raise ValueError(
                f"the transformers engine captures routes of {', '.join(ROUTER_CLASSES)}; this model has {kind}: "
                "set rollout.capture_routes=false (and algorithm.routing_replay=none)"
            )
        if indexer and not self.indexers:
            raise ValueError(
                "this model has no sparse-attention indexer to capture selections from: set "
                "rollout.capture_indexer=false (and algorithm.indexer_replay=none)"
            )
        self.route_layers = [i for i, _ in self.routers]
        self.index_layers = [i for i, _ in self.indexers]
        self.top_k = int(self.routers[0][1].top_k) if self.routers else 0
        experts = int(self.routers[0][1].num_experts) if self.routers else 0
        self.route_dtype = RoutedExperts.id_dtype(experts)
        self.index_topk = int(self.indexers[0][1].index_topk) if self.indexers else 0
        self._pads: list[int] = []
        self._routes: np.ndarray | None = None  # [n, length, M, K] expert ids, padded coordinates
        self._keys: np.ndarray | None = None  # [n, length, L, topk] int32 key positions, padded, -1 none
        self._computed: np.ndarray | None = None  # [n, length] bool
        self._next = 0
        self._cur: tuple[int, int] | None = None  # (first position, count) of the forward running
        self._warned = False
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after),
        ]
        for slot, (_, router) in enumerate(self.routers):
            self._handles.append(
                router.register_forward_hook(lambda _m, _i, out, s=slot: self._on_router(s, out))
            )
        for slot, (_, idx) in enumerate(self.indexers):
            self._handles.append(
                idx.register_forward_hook(lambda _m, _i, out, s=slot: self._on_indexer(s, out))
            )

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- one batch -------------------------------------------------------------------------------
    def begin(self, pads: list[int], length: int) -> None:
        """A batch of len(pads) rows left-padded by `pads`, computing at most `length` positions."""
        n = len(pads)
        self._pads = list(pads)
        self._next, self._cur = 0, None
        self._computed = np.zeros((n, length), dtype=bool)
        if self.routers:
            self._routes = np.zeros((n, length, len(self.routers), self.top_k), dtype=self.route_dtype)
        if self.indexers:
            self._keys = np.full((n, length, len(self.indexers), self.index_topk), -1, dtype=np.int32)

    def end(self) -> None:
        self._routes = self._keys = self._computed = None
        self._cur = None

    def take(self, row: int, length: int) -> tuple[RoutedExperts | None, IndexerKeys | None]:
        """Row `row`'s first `length` tokens (prompt then generated) in sequence coordinates."""
        assert self._computed is not None
        pad = self._pads[row]
        span = slice(pad, pad + length)
        valid = self._computed[row, span].copy()
        if valid.shape[0] < length:  # (cannot happen: the buffers cover prompt + max_new)
            valid = np.concatenate([valid, np.zeros(length - valid.shape[0], dtype=bool)])
        routes = keys = None
        if self._routes is not None:
            ids = np.zeros((length, len(self.routers), self.top_k), dtype=self.route_dtype)
            got = self._routes[row, span]
            ids[: got.shape[0]] = got
            routes = RoutedExperts(ids, valid, self.route_layers)
        if self._keys is not None:
            sel = np.full((length, len(self.indexers), self.index_topk), -1, dtype=np.int64)
            got = self._keys[row, span].astype(np.int64) - pad
            sel[: got.shape[0]] = got
            keys, bad = IndexerKeys.from_engine(sel, valid, self.index_topk, self.index_layers)
            if bad and not self._warned:
                logger.warning("indexer capture: %d rows kept keys outside their causal range", bad)
                self._warned = True
        return routes, keys

    # -- hooks -----------------------------------------------------------------------------------
    def _before(self, _module: Any, args: tuple, kwargs: dict) -> None:
        if self._computed is None:
            return
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = args[0] if args else kwargs.get("inputs_embeds")
        count = int(ids.shape[1])
        self._cur = (self._next, count)
        self._next += count

    def _after(self, _module: Any, _args: Any, _out: Any) -> None:
        if self._computed is None or self._cur is None:
            return
        start, count = self._cur
        self._computed[:, start : start + count] = True
        self._cur = None

    def _on_router(self, slot: int, out: Any) -> None:
        if self._routes is None or self._cur is None:
            return
        start, count = self._cur
        ids = out[2].detach().reshape(len(self._pads), count, -1)  # [B * S, K] row-major -> [B, S, K]
        self._routes[:, start : start + count, slot] = ids.cpu().numpy()

    def _on_indexer(self, slot: int, out: Any) -> None:
        if self._keys is None or self._cur is None:
            return
        if out.shape[-1] < self.index_topk:
            return  # fewer keys than index_topk so far: every row is dense, nothing to keep
        start, count = self._cur
        self._keys[:, start : start + count, slot] = out.detach().cpu().numpy()
