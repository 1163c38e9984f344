"""The trainer's forward passes: policy logits (with the shared-prefix and packed paths), logprobs,
critic values.

Shapes follow trainer.batching: a micro-batch has B rows of L tokens and T = L-1-start kept
prediction columns; column t describes token start+t+1. Packed forwards (trainer.packing) return the
K real kept columns as [1, K, ...] with the `Packed` layout that puts them back into [B, T].
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trainer.batching import PER_TOKEN, MicroBatch
from trainer.flops import ModelFlops, forward_flops, packed_flops
from trainer.packing import Packed, pack, placeholder_mask, uses_segment_attention

if TYPE_CHECKING:
    from trainer.indexer import Indexing
    from trainer.routing import Routing


@dataclass
class Forward:
    """Forward passes of the policy (or the frozen reference) over micro-batches.

    `share_prefix`: run the rows' common leading tokens once (see `kept_logits`); the caller turns it
    off under ZeRO-3. `pack`: run the rows without padding, as one packed row, on models that use
    trainer.packing's segment attention (others run padded). `temperature`: logprobs are of
    softmax(logits / temperature), the policy the engine sampled from. `shared_prefix_forwards` and
    `packed_forwards` count the forwards that took those paths, so callers and tests can tell that
    they ran (the forward falls back to the plain one silently otherwise). With `flops`, `flops_done`
    adds up the model FLOPs of every forward (3x under grad mode: forward and backward;
    trainer.flops), dummy micro-batches excluded.
    """

    share_prefix: bool
    temperature: float = 1.0
    pack: bool = False
    flops: ModelFlops | None = None
    shared_prefix_forwards: int = 0
    packed_forwards: int = 0
    flops_done: float = 0.0

    def kept_logits(
        self,
        model: Any,
        mb: MicroBatch,
        routing: Routing | None = None,
        measure: bool = False,
        indexing: Indexing | None = None,
    ) -> tuple[Tensor, Packed | None]:
        """Logits of the micro-batch's kept prediction columns: ([B, T, V] (a view), None) padded,
        or ([1, K, V], layout) packed (`layout.to_rows` puts per-token values back into [B, T]).

        `logits_to_keep` makes the model apply its head to the kept positions only, so the
        vocabulary-sized work skips the trimmed prompt columns (padded: the last L-start positions,
        whose last one predicts past the end and is dropped; packed: exactly the real kept ones).
        With `share_prefix`, tokens that several rows have in common run once. Packed (dense
        policies, or MoE without routing hooks): the rows are packed as a prefix tree in one call
        (trainer.packing: a group's prompt once, a system prompt all groups share once, the replies
        after them), so a micro-batch of several groups shares each group's whole prompt. Padded,
        or with routing hooks: the P = `mb.shared_prefix` leading tokens that every row shares run
        once as a [1, P] forward whose cache (kept in the autograd graph, so the prefix still gets
        its gradient) the rows' suffixes attend to: packed, the suffixes run as one row after it;
        padded, the cache is repeated for the B rows' [B, L-P] suffix forward (routing replay needs
        that one prefix call: it may share only positions whose replayed routes agree).

        `routing` (MoE policies): each model call is announced to the router hooks (routing replay,
        router losses and statistics; trainer/routing.py); `measure` makes it count for the step's
        router statistics. Under grad mode the router losses keep their graph (`Routing.take_losses`).
        `indexing` (sparse-attention policies): likewise for the indexer hooks (indexer replay and
        the `dsa/` statistics; trainer/indexer.py). Such models never run packed (trainer/rank.py).
        """
        b, length = mb.input_ids.shape
        packed = self.pack and b >= 2 and uses_segment_attention(model) and indexing is None
        want_loss = torch.is_grad_enabled()
        passes = 3 if want_loss else 1
        if packed and routing is None:
            pk = pack(mb.input_ids, mb.lengths, mb.start, share=self.share_prefix)
            if self.flops is not None and not mb.dummy:
                self.flops_done += passes * packed_flops(self.flops, pk)
            self.shared_prefix_forwards += int(pk.shared_tokens > 0)
            self.packed_forwards += 1
            return packed_logits(model, pk), pk
        p = mb.shared_prefix if self.share_prefix and b >= 2 else 0
        if routing is not None:
            p = routing.shared_prefix(mb, p)  # replayed routes must be shared too
        if indexing is not None:
            p = indexing.shared_prefix(mb, p)  # and replayed key selections
        if self.flops is not None and not mb.dummy:
            self.flops_done += passes * forward_flops(self.flops, mb.lengths.tolist(), mb.start, p)

        def announce(view: Any, rows: slice, cols: slice, shared: bool = False) -> Any:
            stack = contextlib.ExitStack()
            if routing is not None:
                stack.enter_context(
                    routing.call(view, rows, cols, measure=measure, want_loss=want_loss, shared=shared)
                )
            if indexing is not None:
                stack.enter_context(indexing.call(view, rows, cols, measure=measure, shared=shared))
            return stack

        cache = None
        if p >= 1:
            with announce(mb, slice(0, 1), slice(0, p), shared=True):
                head = model(input_ids=mb.input_ids[:1, :p], use_cache=True, logits_to_keep=1)
            cache = head.past_key_values
            self.shared_prefix_forwards += 1
        if packed:
            pk = pack(mb.input_ids, mb.lengths, mb.start, first=p)
            view = PackedRoutes.of(mb, pk) if routing is not None else None
            with announce(view, slice(None), slice(None)):
                logits = packed_logits(model, pk, cache)
            if view is not None:
                view.write_back(mb, pk)
            self.packed_forwards += 1
            return logits, pk
        if cache is None:
            with announce(mb, slice(None), slice(None)):
                out = model(
                    input_ids=mb.input_ids,
                    attention_mask=mb.attention_mask,
                    use_cache=False,
                    logits_to_keep=mb.logits_to_keep,
                )
            return out.logits[:, :-1], None
        cache.batch_repeat_interleave(b)  # [1, H, P, D] -> [B, H, P, D] per layer, differentiable
        positions = torch.arange(p, length, device=mb.input_ids.device).expand(b, -1)  # [B, L-P]
        with announce(mb, slice(None), slice(p, None)):
            out = model(
                input_ids=mb.input_ids[:, p:],
                attention_mask=mb.attention_mask,  # [B, L]: the cached prefix plus the suffix
                past_key_values=cache,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=mb.logits_to_keep,  # <= L-P because P <= start
            )
        return out.logits[:, :-1], None

    def logits(
        self,
        model: Any,
        mb: MicroBatch,
        routing: Routing | None = None,
        measure: bool = False,
        indexing: Indexing | None = None,
    ) -> Tensor:
        """Logits of the micro-batch's kept prediction columns: [B, T, V] (see `kept_logits`); a
        packed forward's are put back into rows, zero on columns no row keeps (padding)."""
        logits, layout = self.kept_logits(model, mb, routing, measure, indexing)
        return logits if layout is None else layout.to_rows(logits)

    def logprobs(
        self,
        model: Any,
        mb: MicroBatch,
        routing: Routing | None = None,
        measure: bool = False,
        indexing: Indexing | None = None,
    ) -> Tensor:
        """[B, T] float32 logprobs of the micro-batch's target tokens under softmax(logits / T),
        truncated to each token's sampling support where the engine recorded one (`mb.kept`);
        0 on padding when packed."""
        from trainer.losses import token_logprobs_from_logits

        logits, layout = self.kept_logits(model, mb, routing, measure, indexing)
        if layout is None:
            return token_logprobs_from_logits(logits, mb.targets, self.temperature, mb.kept)
        kept = None if mb.kept is None else layout.kept(mb.kept)
        return layout.to_rows(
            token_logprobs_from_logits(logits, layout.kept(mb.targets), self.temperature, kept)
        )


def packed_logits(model: Any, pk: Packed, prefix_cache: Any = None) -> Tensor:
    """[1, K, V] logits of a packed row's kept positions, on a model with segment attention; with
    `prefix_cache` (a [1, P] forward's cache; `pk` packed from column P) every sequence also attends
    to the prefix."""
    out = model(
        input_ids=pk.input_ids,
        position_ids=pk.position_ids,
        attention_mask=placeholder_mask(pk.input_ids.device),
        cu_seq_lens_q=pk.cu_seqlens,
        slime_segment_context=pk.context,
        past_key_values=prefix_cache,
        use_cache=prefix_cache is not None,
        logits_to_keep=pk.keep,
    )
    return out.logits


def packing_leak(model: Any) -> str | None:
    """Check on two short random sequences that a packed forward keeps attention within each one:
    None when the second sequence's packed logits equal its own forward's, else what differed.
    A model whose layers do not route attention through transformers' attention interface (remote
    code with its own attention) would otherwise mix the sequences silently."""
    vocab = int(model.config.vocab_size)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (2, 7), generator=gen).to(device)
    lengths = torch.tensor([7, 5])
    with torch.no_grad():
        packed = packed_logits(model, pack(ids, lengths, start=0))[0, 6:]  # the second row
        alone = model(input_ids=ids[1:, :5], use_cache=False).logits[0, :4]
    if packed.shape == alone.shape and torch.allclose(packed.float(), alone.float(), rtol=1e-3, atol=1e-3):
        return None
    diff = (packed.float() - alone.float()).abs().max() if packed.shape == alone.shape else float("nan")
    return f"a packed sequence's logits differ from its own forward's by up to {float(diff):.3g}"


@dataclass
class PackedRoutes:
    """The packed tokens as trainer.routing addresses a micro-batch: one row of N real tokens, with
    their engine routes and old-policy routes gathered from the padded micro-batch."""

    input_ids: Tensor  # [1, N]
    attention_mask: Tensor  # [1, N], all 1
    routes: Tensor | None  # [1, N, M, K]
    routes_valid: Tensor | None  # [1, N]
    route_layers: tuple[int, ...]
    old_routes: Tensor | None  # [1, N, M, K]; routing_replay=old's first pass fills it

    @staticmethod
    def of(mb: MicroBatch, pk: Packed) -> PackedRoutes:
        def take(x: Tensor | None) -> Tensor | None:
            return None if x is None else pk.tokens(x)

        return PackedRoutes(
            input_ids=pk.input_ids,
            attention_mask=torch.ones_like(pk.input_ids),
            routes=take(mb.routes),
            routes_valid=take(mb.routes_valid),
            route_layers=mb.route_layers,
            old_routes=take(mb.old_routes),
        )

    def write_back(self, mb: MicroBatch, pk: Packed) -> None:
        """Put the old-policy routes the routing hooks recorded for the packed tokens into `mb`."""
        if self.old_routes is None:
            return
        if mb.old_routes is None:
            b, length = mb.input_ids.shape
            mb.old_routes = self.old_routes.new_zeros((b, length, *self.old_routes.shape[2:]))
        pk.put_tokens(self.old_routes, mb.old_routes)


class ValueModel(nn.Module):
    """PPO critic: the policy's transformer body with a scalar head instead of the LM head.

    forward(input_ids [B, L], attention_mask [B, L]) -> values [B, L-1], aligned with predicted
    tokens: values[:, t] is V of the state after tokens <= t, i.e. before the action token t+1.
    The head starts at zero, so initial values are 0.
    """

    def __init__(self, model_dir: str) -> None:
        super().__init__()
        from transformers import AutoModel

        self.body = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
        hidden = self.body.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(h[:, :-1]).squeeze(-1).float()  # [B, L-1]


def values(critic: Any, mb: MicroBatch) -> Tensor:
    """Critic values of the micro-batch's kept prediction columns: [B, T] float32."""
    return critic(mb.input_ids, mb.attention_mask)[:, mb.start :].float()


def to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    """Move a micro-batch's tensors to `device` (in place; a no-op on CPU). Returns `mb`."""
    if device.type == "cpu":
        return mb
    for name in (
        "input_ids",
        "attention_mask",
        "routes",
        "routes_valid",
        "index_keys",
        "index_valid",
        *PER_TOKEN,
    ):
        if getattr(mb, name) is not None:
            setattr(mb, name, getattr(mb, name).to(device, non_blocking=True))
    return mb
