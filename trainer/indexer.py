"""Sparse-attention indexers in the trainer: indexer replay and the `dsa/` metrics.

DeepSeek sparse attention (GLM-5's DSA, transformers `glm_moe_dsa`): in every layer with an indexer,
a lightning indexer scores each query's causal keys and the attention uses only the `index_topk` best
(layers whose `indexer_types` is "shared" reuse the previous indexer layer's choice). The indexer's
top-k is a second place, after MoE routing, where the engine and the trainer can disagree: several
inference top-k kernels are not deterministic, and reduced precision moves near-ties. A different key
set changes the attention output and so the logprob the trainer scores.

Each indexer of the policy is hooked once (`Indexing.install`): a forward hook takes the indexer's own
selection, [B, S, k] int32 key positions (k = min(index_topk, keys)), and, where the current model call
replays selections (`algorithm.indexer_replay=rollout`), returns the engine's instead, so the
attention (and the "shared" layers after it) use exactly the keys the engine used. Rows the engine
recorded nothing for (dense rows: fewer than index_topk + 1 keys, where every key is kept anyway;
tokens the engine never computed; padding) keep the trainer's own selection.

Gradients: transformers computes the indexer under `torch.no_grad` (DSA trains the indexer with its
own distillation loss, not through the language-model loss), so its scores have no gradient to keep
and replay changes only which keys the attention sees; the attention's gradient flows through the
replayed keys' queries, keys and values as through its own.

Tokens and keys: a call is announced with `Indexing.call(mb, rows, cols, ...)` (trainer/forward.py
does it for every policy forward), so the hook knows which micro-batch rows and positions its [B, S]
queries are. Keys are positions in the row (the trainer pads on the right and a cached shared prefix
keeps absolute positions), which is how `IndexerKeys` stores them. Packed forwards are not used for
sparse-attention models (trainer/rank.py: the packed path has no per-sequence mask for the indexer).

Metrics (`dsa/`), over real selective (token, layer) pairs the engine recorded, of the first policy
forward of each micro-batch (as `moe/`): `dsa/index_mismatch` (the trainer indexer's own key set
differs from the engine's), `dsa/index_mismatch_used` (the keys the attention used differ: 0 with
replay), per layer `dsa/layer{i}/index_mismatch`, `dsa/index_pairs` (pairs compared) and
`dsa/selective_share` (share of real tokens whose query has more than index_topk keys).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

INDEXER_CLASSES = ("GlmMoeDsaIndexer", "DeepseekV32Indexer")


@dataclass
class IndexerSite:
    """One layer's indexer as the hooks see it."""

    layer: int  # decoder-layer index
    module: nn.Module
    topk: int  # index_topk


def find_indexer_sites(model: nn.Module) -> list[IndexerSite]:
    """The sparse-attention indexers of a transformers decoder (`model.model.layers[i].self_attn.indexer`),
    in layer order; [] for a model with dense attention."""
    body = getattr(model, "model", model)
    sites = []
    for i, layer in enumerate(getattr(body, "layers", None) or []):
        indexer = getattr(getattr(layer, "self_attn", None), "indexer", None)
        if indexer is not None and type(indexer).__name__ in INDEXER_CLASSES:
            sites.append(IndexerSite(layer=i, module=indexer, topk=int(indexer.index_topk)))
    return sites


def same_key_sets(a: Tensor, b: Tensor) -> Tensor:
    """[...] bool: whether rows of a [..., K] and b [..., K] hold the same set of key positions."""
    return (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)


@dataclass
class _Call:
    """What the hook needs to know about the model call in progress (tokens flattened as [N = B * S])."""

    batch: int  # B rows of this call
    engine: Tensor | None  # [repeat * B, S, M, K] int64 engine key positions, -1 where none
    engine_have: Tensor | None  # [repeat * B, S] bool: a selective row the engine recorded, real
    replay: bool  # use the engine's keys where it has them
    real: Tensor  # [B, S] bool
    selective: Tensor  # [B, S] bool: real tokens at positions >= index_topk
    repeat: int  # rows sharing these tokens (the shared-prefix call: every row of the micro-batch)
    measure: bool


class Indexing:
    """Indexer hooks of one policy model: replay (`mode`: none | rollout) and the `dsa/` statistics.

    Usage per micro-batch forward (trainer/forward.py does it): `with indexing.call(mb, rows, cols,
    measure=...): model(...)`. `reduce_metrics(comm)` returns and clears the step's statistics.
    """

    def __init__(self, sites: list[IndexerSite], mode: str) -> None:
        if not sites:
            raise ValueError("Indexing needs at least one sparse-attention indexer")
        self.sites = sites
        self.layers = [s.layer for s in sites]
        self.topk = sites[0].topk
        self.mode = mode
        self._call: _Call | None = None
        self._handles: list[Any] = []
        self._empty_stats()

    @classmethod
    def install(cls, model: nn.Module, mode: str) -> Indexing | None:
        """Hook every indexer of `model`; None for a model with dense attention."""
        sites = find_indexer_sites(model)
        if not sites:
            return None
        indexing = cls(sites, mode)
        for i, site in enumerate(sites):
            indexing._handles.append(
                site.module.register_forward_hook(lambda _m, _inp, out, i=i: indexing._on_indexer(i, out))
            )
        return indexing

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- calls ------------------------------------------------------------------------------------
    def _check_layers(self, mb: Any) -> None:
        if getattr(mb, "index_keys", None) is not None and list(mb.index_layers) != self.layers:
            raise ValueError(
                f"trajectories carry indexer selections of layers {list(mb.index_layers)}; the model's "
                f"indexers are in layers {self.layers}"
            )

    def shared_prefix(self, mb: Any, p: int) -> int:
        """How many of the `p` leading tokens the rows share *with their replayed selections*: the
        shared-prefix forward computes the prefix once, with row 0's selections."""
        keys = getattr(mb, "index_keys", None)
        if self.mode != "rollout" or keys is None or p < 1:
            return p
        ids, have = keys[:, :p], mb.index_valid[:, :p]  # [B, p, M, K], [B, p]
        same = (ids == ids[:1]).flatten(2).all(dim=-1).all(dim=0) & (have == have[:1]).all(dim=0)  # [p]
        differ = (~same).nonzero()
        return int(differ[0, 0]) if differ.numel() else p

    @contextlib.contextmanager
    def call(
        self, mb: Any, rows: slice, cols: slice, *, measure: bool, shared: bool = False
    ) -> Iterator[None]:
        """Announce a model call over micro-batch `mb`'s rows x positions. `shared`: the call computes
        tokens every row shares (the shared-prefix forward of row 0): statistics count them once per
        row, against each row's engine selection."""
        ids = mb.input_ids[rows, cols]  # [B, S]
        b, s = ids.shape
        if b == 0:
            yield
            return
        self._check_layers(mb)
        real = mb.attention_mask[rows, cols] != 0
        start = cols.start or 0
        positions = torch.arange(start, start + s, device=ids.device)
        selective = real & (positions >= self.topk)[None, :]
        keys = getattr(mb, "index_keys", None)
        engine = have = None
        if keys is not None:
            stat_rows = slice(None) if shared else rows
            engine = keys[stat_rows, cols].long()  # [repeat * B, S, M, K]
            have = mb.index_valid[stat_rows, cols] & (mb.attention_mask[stat_rows, cols] != 0)
        repeat = mb.input_ids.shape[0] if shared else 1
        replay = self.mode == "rollout" and keys is not None
        self._call = _Call(b, engine, have, replay, real, selective, repeat, measure)
        try:
            yield
        finally:
            self._call = None

    # -- the hook ---------------------------------------------------------------------------------
    def _on_indexer(self, i: int, out: Tensor) -> Tensor | None:
        call = self._call
        if call is None:
            return None  # a forward outside `call` (e.g. a test's plain forward): leave it alone
        if call.measure and i == 0:
            self.stats["tokens"] += call.repeat * float(call.real.sum())
            self.stats["selective"] += call.repeat * float(call.selective.sum())
        if out.shape[-1] < self.topk:
            return None  # fewer keys than index_topk: every row keeps all its keys
        b = call.batch
        used = out
        new_out = None
        if call.replay and call.engine is not None:
            # The shared-prefix call replays row 0's selections (`shared_prefix` made sure all agree).
            eng = call.engine[:b, :, i]  # [B, S, K]
            have = call.engine_have[:b]  # [B, S]
            used = torch.where(have.unsqueeze(-1), eng.to(out.dtype), out)
            new_out = used
        if call.measure:
            self._record(i, out, used, call)
        return new_out

    def _record(self, i: int, own: Tensor, used: Tensor, call: _Call) -> None:
        rep = call.repeat
        st = self.stats
        with torch.no_grad():
            if call.engine is None:
                return
            have = call.engine_have  # [rep * B, S]
            eng = call.engine[:, :, i]  # [rep * B, S, K]
            own_r = own.long().repeat(rep, 1, 1)
            used_r = used.long().repeat(rep, 1, 1)
            mis = (~same_key_sets(own_r, eng) & have).sum()
            mis_used = (~same_key_sets(used_r, eng) & have).sum()
            st["mismatch"][i] += float(mis)
            st["mismatch_used"][i] += float(mis_used)
            st["compared"][i] += float(have.sum())
            st["carried"] = 1.0

    # -- metrics ----------------------------------------------------------------------------------
    def _empty_stats(self) -> None:
        m = len(self.sites)
        self.stats: dict[str, Any] = {
            "tokens": 0.0,
            "selective": 0.0,
            "carried": 0.0,  # whether any forward compared against engine selections
            "mismatch": [0.0] * m,
            "mismatch_used": [0.0] * m,
            "compared": [0.0] * m,
        }

    def reduce_metrics(self, comm: Any) -> dict[str, float]:
        """The step's `dsa/...` metrics over all ranks (a collective), then cleared: selective_share
        always; when trajectories carried engine selections, index_mismatch, index_mismatch_used and
        index_pairs (0 pairs, and mismatch 0, when no token was selective) and per-layer
        index_mismatch where pairs were compared."""
        st = self.stats
        flat = [
            st["tokens"],
            st["selective"],
            st["carried"],
            *st["mismatch"],
            *st["mismatch_used"],
            *st["compared"],
        ]
        summed = comm.all_reduce(flat)
        self._empty_stats()
        m = len(self.sites)
        tokens, selective, carried = summed[:3]
        mis, mis_used, compared = summed[3 : 3 + m], summed[3 + m : 3 + 2 * m], summed[3 + 2 * m :]
        out = {"dsa/selective_share": selective / tokens if tokens else 0.0}
        if not carried:
            return out
        total = sum(compared)
        out["dsa/index_pairs"] = total
        out["dsa/index_mismatch"] = sum(mis) / total if total else 0.0
        out["dsa/index_mismatch_used"] = sum(mis_used) / total if total else 0.0
        for site, x, n in zip(self.sites, mis, compared, strict=True):
            if n:
                out[f"dsa/layer{site.layer}/index_mismatch"] = x / n
        return out
