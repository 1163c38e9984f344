"""The trainer's forward passes: policy logits (with the shared-prefix path), logprobs, critic values.

Shapes follow trainer.batching: a micro-batch has B rows of L tokens and T = L-1-start kept
prediction columns; column t describes token start+t+1.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from trainer.batching import MicroBatch

if TYPE_CHECKING:
    from trainer.routing import Routing


@dataclass
class Forward:
    """Forward passes of the policy (or the frozen reference) over micro-batches.

    `share_prefix`: run the rows' common leading tokens once (see `logits`); the caller turns it off
    under ZeRO-3. `temperature`: logprobs are of softmax(logits / temperature), the policy the engine
    sampled from. `shared_prefix_forwards` counts the forwards that took the shared-prefix path, so
    callers and tests can tell that it ran (it falls back to the plain forward silently otherwise).
    """

    share_prefix: bool
    temperature: float = 1.0
    shared_prefix_forwards: int = 0

    def logits(
        self, model: Any, mb: MicroBatch, routing: Routing | None = None, measure: bool = False
    ) -> Tensor:
        """Logits of the micro-batch's kept prediction columns: [B, T, V] (a view).

        `logits_to_keep` makes the model apply its head to the last L-start positions only, so the
        vocabulary-sized work skips the trimmed prompt columns; the last position predicts past the
        end and is dropped. With `share_prefix`, the P = `mb.shared_prefix` leading tokens that every
        row shares run once as a [1, P] forward whose cache (kept in the autograd graph, so the
        prefix still gets its gradient) is repeated for the B rows' [B, L-P] suffix forward: on
        agentic prompts (a long system prompt and tool list) that is most of the tokens.

        `routing` (MoE policies): each model call is announced to the router hooks (routing replay,
        router losses and statistics; trainer/routing.py); `measure` makes it count for the step's
        router statistics. Under grad mode the router losses keep their graph (`Routing.take_losses`).
        """
        b, length = mb.input_ids.shape
        p = mb.shared_prefix if self.share_prefix else 0
        if routing is not None:
            p = routing.shared_prefix(mb, p)  # replayed routes must be shared too
        want_loss = torch.is_grad_enabled()

        def announce(rows: slice, cols: slice, shared: bool = False) -> Any:
            if routing is None:
                return contextlib.nullcontext()
            return routing.call(mb, rows, cols, measure=measure, want_loss=want_loss, shared=shared)

        if p < 1 or b < 2:
            with announce(slice(None), slice(None)):
                out = model(
                    input_ids=mb.input_ids,
                    attention_mask=mb.attention_mask,
                    use_cache=False,
                    logits_to_keep=mb.logits_to_keep,
                )
            return out.logits[:, :-1]
        with announce(slice(0, 1), slice(0, p), shared=True):
            head = model(input_ids=mb.input_ids[:1, :p], use_cache=True, logits_to_keep=1)
        cache = head.past_key_values
        cache.batch_repeat_interleave(b)  # [1, H, P, D] -> [B, H, P, D] per layer, differentiable
        positions = torch.arange(p, length, device=mb.input_ids.device).expand(b, -1)  # [B, L-P]
        with announce(slice(None), slice(p, None)):
            out = model(
                input_ids=mb.input_ids[:, p:],
                attention_mask=mb.attention_mask,  # [B, L]: the cached prefix plus the suffix
                past_key_values=cache,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=mb.logits_to_keep,  # <= L-P because P <= start
            )
        self.shared_prefix_forwards += 1
        return out.logits[:, :-1]

    def logprobs(
        self, model: Any, mb: MicroBatch, routing: Routing | None = None, measure: bool = False
    ) -> Tensor:
        """[B, T] float32 logprobs of the micro-batch's target tokens under softmax(logits / T)."""
        from trainer.losses import token_logprobs_from_logits

        return token_logprobs_from_logits(
            self.logits(model, mb, routing, measure), mb.targets, self.temperature
        )


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
    for name in ("input_ids", "attention_mask", "loss_mask", "behavior_logprobs", "routes", "routes_valid"):
        if getattr(mb, name) is not None:
            setattr(mb, name, getattr(mb, name).to(device, non_blocking=True))
    return mb
