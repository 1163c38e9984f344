"""MoE routers in the trainer: routing replay, router losses and router statistics.

Each MoE layer's router is hooked once (`Routing.install`): a forward hook takes the router's own
output (logits, top-k weights, top-k ids) and, where the current model call replays routes, swaps the
ids for the replayed ones and recomputes their gate weights from the router's own scores, so the
router still gets a gradient for the experts actually used. Without replay the router's output is
returned unchanged. Three router kinds are handled:

- transformers Qwen3-MoE (`Qwen3MoeTopKRouter`: softmax, top-k, optional renormalisation) and
  GLM-4.5/GLM-5 (`Glm4MoeTopkRouter`, and `GlmMoeDsaTopkRouter` of GLM-5's own architecture: sigmoid scores, selection on scores + correction bias in
  groups, weights = unbiased scores renormalised and scaled by `routed_scaling_factor`): the gate
  returns (logits [N, E], weights [N, K], ids [N, K]);
- DeepSpeed AutoEP's `TokenChoiceTopKRouter` (expert parallelism replaced the block): it returns
  (weights [N, K], ids [N, K], tokens per expert [E]); its logits come from a hook on its `gate`
  linear.

Tokens: a router sees the call's hidden states flattened row-major, [B, L, H] -> [B*L, H]; a call is
announced with `Routing.call(mb, rows, cols, ...)` so that the hook knows which micro-batch rows and
positions its N tokens are (the shared-prefix forward runs rows [0:1] x positions [0:P], then all rows x
positions [P:L]). Routes of token t belong to input position t (docs/moe.md).

Statistics are over real (unpadded) tokens of the *measured* forwards only: the first policy forward of
each micro-batch in a step (the proximal pass when there is one, else the training forward), so they
describe the weights the batch was scored with. Routers here are dropless (every token reaches its k
experts; no capacity factor), so no token is ever dropped or capped.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


@dataclass
class RouterSite:
    """One MoE layer's router as the hooks see it."""

    layer: int  # decoder-layer index
    kind: str  # "hf" (gate returns logits, weights, ids) or "autoep" (DeepSpeed TokenChoiceTopKRouter)
    module: nn.Module  # the router module whose output is rewritten
    num_experts: int
    top_k: int
    score: str  # "softmax" or "sigmoid"
    norm: bool  # renormalise the selected experts' scores to sum to 1
    scale: float  # multiply the (renormalised) weights by this


def find_router_sites(model: nn.Module, strict: bool = True) -> list[RouterSite]:
    """The MoE routers of a transformers decoder (`model.model.layers[i].mlp`), in layer order.

    Dense layers are skipped. An MoE block of an unknown kind raises ValueError naming it when `strict`
    (routing replay needs it), else it is skipped with a warning (no router metrics for it): replay and
    the metrics are written for the router kinds listed in the module docstring.
    """
    body = getattr(model, "model", model)
    layers = getattr(body, "layers", None)
    if layers is None:
        return []
    sites: list[RouterSite] = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        router = getattr(mlp, "router", None)
        if type(mlp).__name__ == "AutoEPMoELayer" and router is not None:
            sites.append(
                RouterSite(
                    layer=i,
                    kind="autoep",
                    module=router,
                    num_experts=int(router.num_experts),
                    top_k=int(router.top_k),
                    score=str(router.score_func),
                    norm=bool(router.route_norm),
                    scale=float(router.route_scale),
                )
            )
            continue
        gate = getattr(mlp, "gate", None)
        if gate is None or not hasattr(getattr(mlp, "experts", None), "parameters"):
            continue  # a dense MLP
        name = type(gate).__name__
        if name not in ("Qwen3MoeTopKRouter", "Glm4MoeTopkRouter", "GlmMoeDsaTopkRouter"):
            message = (
                f"layer {i}: MoE router {name} is not supported by the trainer's routing hooks "
                "(Qwen3-MoE, GLM-4.5/GLM-5 MoE and DeepSpeed AutoEP layers are)"
            )
            if strict:
                raise ValueError(f"algorithm.routing_replay: {message}")
            log.warning("%s: no moe/ metrics for it", message)
            continue
        sigmoid = hasattr(gate, "e_score_correction_bias")
        sites.append(
            RouterSite(
                layer=i,
                kind="hf",
                module=gate,
                num_experts=int(gate.num_experts),
                top_k=int(gate.top_k),
                score="sigmoid" if sigmoid else "softmax",
                norm=bool(gate.norm_topk_prob),
                scale=float(getattr(gate, "routed_scaling_factor", 1.0) or 1.0),
            )
        )
    return sites


def router_scores(logits: Tensor, score: str) -> Tensor:
    """[N, E] float32 routing scores of the logits: softmax or sigmoid."""
    if score == "softmax":
        return torch.softmax(logits.float(), dim=-1)
    return torch.sigmoid(logits.float())


def gate_weights(scores: Tensor, ids: Tensor, norm: bool, scale: float) -> Tensor:
    """[N, K] gate weights of the experts `ids` [N, K]: their scores, renormalised over the k when
    `norm`, times `scale` (how both transformers routers and AutoEP's weight their experts)."""
    w = scores.gather(1, ids)
    if norm:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scale


def same_sets(a: Tensor, b: Tensor) -> Tensor:
    """[N] bool: whether rows of a [N, K] and b [N, K] hold the same set of expert ids."""
    return (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)


@dataclass
class LayerStats:
    """One MoE layer's router statistics accumulated over a step's measured forwards (on one rank)."""

    load: Tensor  # [E] float64: (token, slot) assignments per expert, of the experts used
    entropy_sum: float = 0.0  # sum over tokens of the entropy of the normalised routing scores
    tokens: float = 0.0
    aux_sum: float = 0.0  # token-weighted sum of per-forward aux losses
    z_sum: float = 0.0
    mismatch: float = 0.0  # (token) pairs whose router top-k set differs from the engine's
    mismatch_used: float = 0.0  # ... whose experts actually used differ from the engine's
    compared: float = 0.0  # tokens with engine routes


@dataclass
class _Call:
    """What the hooks need to know about the model call in progress."""

    replay: Tensor | None  # [N, M, K] int64 expert ids to use, or None
    replay_valid: Tensor | None  # [N] bool
    engine: Tensor | None  # [repeat * N, M, K] int64 the engine's routes (for the mismatch metric)
    engine_valid: Tensor | None  # [repeat * N] bool
    real: Tensor  # [N] bool, real (unpadded) tokens
    repeat: int  # rows sharing these tokens (the shared-prefix call: every row of the micro-batch)
    measure: bool  # accumulate statistics
    want_loss: bool  # keep the router losses' graph (a training forward)
    own: dict[int, Tensor] = field(default_factory=dict)  # site index -> [N, K] the router's own ids
    aux: list[Tensor] = field(default_factory=list)  # per layer, with graph when want_loss
    z: list[Tensor] = field(default_factory=list)


class Routing:
    """Routing hooks of one policy model: replay (`mode`: none | rollout | old) and router statistics.

    Usage per micro-batch forward (trainer/forward.py does it): `with routing.call(mb, rows, cols,
    measure=..., want_loss=...): model(...)`; then `take_losses()` returns the (aux, z) router losses of
    the calls since the last take (mean over layers and calls, with their graph) for the training loss.
    `metrics()` returns and clears the step's `moe/...` statistics (call `reduce_metrics` for all ranks).
    """

    def __init__(self, sites: list[RouterSite], mode: str) -> None:
        if not sites:
            raise ValueError("Routing needs at least one MoE router")
        self.sites = sites
        self.layers = [s.layer for s in sites]
        self.mode = mode
        self.num_experts = sites[0].num_experts
        self.top_k = sites[0].top_k
        self._call: _Call | None = None
        self.loss_graph = False  # keep the router losses' graph in training forwards (a coefficient > 0)
        self._handles: list[Any] = []
        self._logits: dict[int, Tensor] = {}  # AutoEP: site index -> logits of the gate hook
        self._pending: list[tuple[Tensor, Tensor, float]] = []  # (aux, z, tokens) per finished call
        self.stats = self._empty_stats()

    # -- installation ------------------------------------------------------------------------------
    @classmethod
    def install(cls, model: nn.Module, mode: str) -> Routing | None:
        """Hook every MoE router of `model` (a transformers model, possibly with AutoEP layers);
        None for a dense model."""
        sites = find_router_sites(model, strict=mode != "none")
        if not sites:
            return None
        routing = cls(sites, mode)
        for i, site in enumerate(sites):
            if site.kind == "autoep":
                routing._handles.append(
                    site.module.gate.register_forward_hook(
                        lambda _m, _inp, out, i=i: routing._logits.__setitem__(i, out)
                    )
                )
            routing._handles.append(
                site.module.register_forward_hook(lambda _m, _inp, out, i=i: routing._on_router(i, out))
            )
        return routing

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- calls ------------------------------------------------------------------------------------
    def _replay_of(self, mb: Any) -> tuple[Tensor, Tensor] | None:
        """The micro-batch's routes to replay, ([B, L, M, K] ids, [B, L] valid), or None."""
        if self.mode == "rollout" and getattr(mb, "routes", None) is not None:
            return mb.routes, mb.routes_valid
        if self.mode == "old" and getattr(mb, "old_routes", None) is not None:
            return mb.old_routes, mb.attention_mask != 0
        return None

    def shared_prefix(self, mb: Any, p: int) -> int:
        """How many of the `p` leading tokens the rows share *with their replayed routes*: the
        shared-prefix forward routes the prefix once, with row 0's routes, so it may only cover
        positions where every row replays the same experts."""
        replay = self._replay_of(mb)
        if replay is None or p < 1:
            return p
        ids, valid = replay[0][:, :p], replay[1][:, :p]  # [B, p, M, K], [B, p]
        same = (ids == ids[:1]).flatten(2).all(dim=-1).all(dim=0) & (valid == valid[:1]).all(dim=0)  # [p]
        differ = (~same).nonzero()
        return int(differ[0, 0]) if differ.numel() else p

    @contextlib.contextmanager
    def call(
        self,
        mb: Any,
        rows: slice,
        cols: slice,
        *,
        measure: bool,
        want_loss: bool,
        shared: bool = False,
    ) -> Iterator[None]:
        """Announce a model call over micro-batch `mb`'s rows x positions (see the module docstring).
        `shared`: the call computes tokens every row of the micro-batch shares (the shared-prefix
        forward of row 0): statistics count them once per row, against each row's engine routes."""
        b = mb.input_ids[rows].shape[0]
        real = mb.attention_mask[rows, cols].reshape(-1) != 0  # [N]
        repeat = mb.input_ids.shape[0] if shared else 1
        engine = engine_valid = replay = replay_valid = None
        routes = getattr(mb, "routes", None)
        if routes is not None:
            if list(mb.route_layers) != self.layers:
                raise ValueError(
                    f"trajectories carry routes of MoE layers {mb.route_layers}; the model's are {self.layers}"
                )
            stat_rows = slice(None) if shared else rows
            engine = routes[stat_rows, cols].reshape(-1, len(self.layers), routes.shape[-1]).long()
            engine_valid = mb.routes_valid[stat_rows, cols].reshape(-1) & (
                mb.attention_mask[stat_rows, cols].reshape(-1) != 0
            )
        if self.mode == "rollout" and routes is not None:
            # The shared prefix replays row 0's routes (`shared_prefix` made sure all rows agree).
            replay = routes[rows, cols].reshape(-1, len(self.layers), routes.shape[-1]).long()
            replay_valid = mb.routes_valid[rows, cols].reshape(-1) & real
        elif self.mode == "old" and not measure and getattr(mb, "old_routes", None) is not None:
            # (The measured forward is the old-policy pass itself: it routes by itself and records.)
            replay = mb.old_routes[rows, cols].reshape(-1, len(self.layers), self.top_k)
            replay_valid = real
        if b == 0:
            yield
            return
        self._call = _Call(
            replay, replay_valid, engine, engine_valid, real, repeat, measure, want_loss and self.loss_graph
        )
        try:
            yield
            self._finish(mb, rows, cols)
        finally:
            self._call = None
            self._logits.clear()

    def _finish(self, mb: Any, rows: slice, cols: slice) -> None:
        call = self._call
        assert call is not None
        if self.mode == "old" and call.measure and len(call.own) == len(self.sites):
            # The old-policy pass: its own routes become what later forwards of this batch replay.
            own = torch.stack([call.own[i] for i in range(len(self.sites))], dim=1)  # [N, M, K]
            if getattr(mb, "old_routes", None) is None:
                b, length = mb.input_ids.shape
                mb.old_routes = torch.zeros(
                    (b, length, len(self.sites), self.top_k), dtype=torch.long, device=own.device
                )
            n_rows = mb.input_ids[rows].shape[0]
            own = own.reshape(n_rows, -1, len(self.sites), self.top_k)
            # A shared-prefix call routed the prefix once for every row.
            mb.old_routes[slice(None) if call.repeat > 1 else rows, cols] = own
        if call.aux:
            tokens = float(call.real.sum())
            self._pending.append((torch.stack(call.aux).mean(), torch.stack(call.z).mean(), tokens))

    def take_losses(self) -> tuple[Tensor, Tensor] | None:
        """(aux, z) router losses of the calls since the last take: the token-weighted mean over
        calls of each call's mean over layers (with their graph); None when there were none."""
        pending, self._pending = self._pending, []
        if not pending:
            return None
        total = sum(t for _, _, t in pending) or 1.0
        aux = sum(a * (t / total) for a, _, t in pending)
        z = sum(z * (t / total) for _, z, t in pending)
        return aux, z  # type: ignore[return-value]

    # -- the hook ---------------------------------------------------------------------------------
    def _on_router(self, i: int, out: Any) -> Any:
        call = self._call
        if call is None:
            return None  # a forward outside `call` (e.g. a test's plain forward): leave it alone
        site = self.sites[i]
        if site.kind == "hf":
            logits, weights, own = out
        else:
            weights, own, counts = out
            logits = self._logits.pop(i)
        own = own.long()
        call.own[i] = own.detach()
        used = own
        new_out = None
        if call.replay is not None:
            replay = call.replay[:, i]  # [N, K]
            used = torch.where(call.replay_valid.unsqueeze(-1), replay, own)
            scores = router_scores(logits, site.score)
            w = gate_weights(scores, used, site.norm, site.scale).to(weights.dtype)
            if site.kind == "hf":
                new_out = (logits, w, used.to(out[2].dtype))
            else:
                new_counts = torch.bincount(used.reshape(-1), minlength=site.num_experts).to(counts.dtype)
                new_out = (w, used.to(out[1].dtype), new_counts)
        if call.measure or call.want_loss:
            self._record(i, site, logits, own, used, call)
        return new_out

    def _record(
        self, i: int, site: RouterSite, logits: Tensor, own: Tensor, used: Tensor, call: _Call
    ) -> None:
        real = call.real
        n = float(real.sum())
        grad_ctx = contextlib.nullcontext() if call.want_loss else torch.no_grad()
        with grad_ctx:
            lg = logits.float()[real]  # [n, E]
            scores = router_scores(lg, site.score)
            probs = scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # [n, E]
            # Switch/transformers load-balancing loss: E * sum_e (share of tokens sending a slot to e)
            # * (mean routing probability of e); top_k when perfectly balanced.
            hits = torch.zeros_like(probs).scatter_(1, used[real], 1.0)  # [n, E]
            aux = site.num_experts * (hits.mean(dim=0) * probs.mean(dim=0)).sum() if n else lg.sum() * 0
            z = torch.logsumexp(lg, dim=-1).pow(2).mean() if n else lg.sum() * 0
        if call.want_loss:
            call.aux.append(aux)
            call.z.append(z)
        if not call.measure:
            return
        st = self.stats[i]
        rep = call.repeat
        with torch.no_grad():
            st.load += rep * torch.bincount(used[real].reshape(-1), minlength=site.num_experts).double().cpu()
            ent = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1)
            st.entropy_sum += rep * float(ent.sum())
            st.tokens += rep * n
            st.aux_sum += rep * float(aux.detach()) * n
            st.z_sum += rep * float(z.detach()) * n
            if call.engine is not None:
                have = call.engine_valid  # [rep * N]
                eng = call.engine[:, i]
                st.mismatch += float((~same_sets(own.repeat(rep, 1), eng) & have).sum())
                st.mismatch_used += float((~same_sets(used.repeat(rep, 1), eng) & have).sum())
                st.compared += float(have.sum())

    # -- metrics ----------------------------------------------------------------------------------
    def _empty_stats(self) -> list[LayerStats]:
        return [LayerStats(load=torch.zeros(s.num_experts, dtype=torch.float64)) for s in self.sites]

    def reduce_metrics(self, comm: Any) -> dict[str, float]:
        """The step's `moe/...` metrics over all ranks (a collective), then cleared.

        Per layer i (decoder index): moe/layer{i}/load_max_over_mean, load_cv (coefficient of
        variation of the experts' token shares), router_entropy (mean entropy of the normalised
        routing scores, nats), aux_loss, z_loss, routing_mismatch; overall: the mean over layers of
        each, routing_mismatch over all (token, layer) pairs, and routing_mismatch_used (the experts the
        trainer actually used vs the engine's: 0 with routing_replay=rollout).
        """
        flat: list[float] = []
        for st in self.stats:
            flat += st.load.tolist()
            flat += [
                st.entropy_sum,
                st.tokens,
                st.aux_sum,
                st.z_sum,
                st.mismatch,
                st.mismatch_used,
                st.compared,
            ]
        summed = comm.all_reduce(flat)
        self.stats = self._empty_stats()
        out: dict[str, float] = {}
        per_layer: dict[str, list[float]] = {}
        totals = [0.0, 0.0, 0.0]
        pos = 0
        for site in self.sites:
            load = torch.tensor(summed[pos : pos + site.num_experts], dtype=torch.float64)
            pos += site.num_experts
            ent, tokens, aux, z, mis, mis_used, compared = summed[pos : pos + 7]
            pos += 7
            mean = float(load.mean())
            values = {
                "load_max_over_mean": float(load.max()) / mean if mean > 0 else 0.0,
                "load_cv": float(load.std(unbiased=False)) / mean if mean > 0 else 0.0,
                "router_entropy": ent / tokens if tokens else 0.0,
                "aux_loss": aux / tokens if tokens else 0.0,
                "z_loss": z / tokens if tokens else 0.0,
            }
            if compared:
                values["routing_mismatch"] = mis / compared
            totals[0] += mis
            totals[1] += mis_used
            totals[2] += compared
            for k, v in values.items():
                out[f"moe/layer{site.layer}/{k}"] = v
                per_layer.setdefault(k, []).append(v)
        for k, vs in per_layer.items():
            if k != "routing_mismatch":
                out[f"moe/{k}"] = sum(vs) / len(vs)
        if totals[2]:
            out["moe/routing_mismatch"] = totals[0] / totals[2]
            out["moe/routing_mismatch_used"] = totals[1] / totals[2]
        return out


def model_router_coefs(config: Any, aux: float, z: float) -> tuple[float, float]:
    """The (aux, z) loss coefficients: trainer.moe's when >= 0, else the model config's
    `router_aux_loss_coef` / `router_z_loss_coef` (0 when it has none)."""

    def pick(value: float, key: str) -> float:
        if value >= 0:
            return float(value)
        got = getattr(config, key, None)
        return float(got) if isinstance(got, int | float) and math.isfinite(got) else 0.0

    return pick(aux, "router_aux_loss_coef"), pick(z, "router_z_loss_coef")
