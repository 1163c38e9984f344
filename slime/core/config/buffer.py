"""The `buffer` group (configs/buffer/): the replay buffer between rollout and trainer."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from slime.core.config.fields import _require_non_negative, _require_positive, opt


class StaleTokens(enum.StrEnum):
    keep = "keep"  # trained, each against its own behaviour logprobs (algorithm.off_policy)
    mask = "mask"  # left out of the loss; counted in rollout/tokens_lost/stale
    drop_group = "drop_group"  # a group with any stale token is dropped whole (before partial rollouts)


class GenCap(enum.StrEnum):
    stop = "stop"
    train = "train"


@dataclass
class BufferConfig:
    """Replay buffer between rollout and trainer."""

    max_staleness: int = opt(
        1, "max policy versions between a token's generation and its training (0 = sync)"
    )
    stale_tokens: StaleTokens = opt(
        StaleTokens.keep,
        "generated tokens more than max_staleness versions old when their batch trains (an episode that "
        "outlived weight pushes): keep them with their correction, mask them out of the loss, or drop the "
        "whole group (docs/agents.md)",
    )
    max_groups: int = opt(256, "hard cap on finished groups held (>= trainer.batch_groups)")
    record: bool = opt(True, "write every accepted group to <run_dir>/buffer/groups.jsonl")
    replay_path: str = opt("", "train from a recorded groups.jsonl instead of live rollouts")
    max_gen_batches: int = opt(
        8, "batches' worth of zero-variance drops before on_gen_cap applies (0 = no cap)"
    )
    on_gen_cap: GenCap = opt(
        GenCap.stop, "at the cap: stop with a message, or train on the dropped groups too"
    )

    def validate(self) -> None:
        _require_non_negative(self, "buffer", "max_staleness", "max_gen_batches")
        _require_positive(self, "buffer", "max_groups")
