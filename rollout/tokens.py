"""A training sequence as rollout builds it, token by token: the ids the engine saw, with the loss mask,
behaviour logprobs and policy versions that line up with them, and MoE routes.

Both ways of running an episode build their Trajectories with it: the environment loop
(rollout/episode.py, one per segment of an episode) and black-box agents (rollout/agent/runner.py,
one per token-exact run of calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from slime.core.types import IndexerKeys, RoutedExperts


@dataclass
class TokenLog:
    """token_ids, loss_mask, logprobs and versions grow together: context tokens (prompt,
    environment messages) with mask 0, logprob 0.0 and version -1; generated tokens with mask 1 and
    the engine's logprobs and versions. `prompt_len` is where the first generated token is (set by the
    first `add_generated` unless given)."""

    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    prompt_len: int = 0
    routes: RoutedExperts | None = None  # MoE routes (engines that capture them)
    keys: IndexerKeys | None = None  # sparse-attention key selections (engines that capture them)
    kept: list[int] = field(default_factory=list)  # the sampling mask per token (0: whole vocabulary)

    def add_context(self, ids: Sequence[int]) -> None:
        self.token_ids.extend(int(t) for t in ids)
        self.loss_mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))
        self.versions.extend([-1] * len(ids))
        self.kept.extend([0] * len(ids))

    def add_generated(
        self,
        ids: Sequence[int],
        logprobs: Sequence[float],
        versions: Sequence[int],
        routes: RoutedExperts | None = None,
        keys: IndexerKeys | None = None,
        kept: Sequence[int] | None = None,
    ) -> None:
        """Append generated ids; `routes` and `keys` cover the request's prompt (this sequence so
        far) and its output, so a later request's overlay earlier ones (the latest computation wins).
        `kept`: the engine's sampling mask of the new ids (GenerateOutput.sample_kept)."""
        if not len(ids) == len(logprobs) == len(versions):
            raise RuntimeError(f"{len(ids)} tokens, {len(logprobs)} logprobs, {len(versions)} versions")
        if kept is not None and len(kept) != len(ids):
            raise RuntimeError(f"{len(ids)} tokens, {len(kept)} sampling-mask entries")
        if self.prompt_len == 0 and not any(self.loss_mask):
            self.prompt_len = len(self.token_ids)
        self.token_ids.extend(int(t) for t in ids)
        self.loss_mask.extend([1] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)
        self.versions.extend(int(v) for v in versions)
        self.kept.extend([0] * len(ids) if kept is None else (int(k) for k in kept))
        self.routes = RoutedExperts.merge(self.routes, routes)
        self.keys = IndexerKeys.merge(self.keys, keys)

    def final_keys(self) -> IndexerKeys | None:
        """The indexer selections with one row per token, or None when the engine captured none."""
        return None if self.keys is None else self.keys.padded(len(self.token_ids))

    def final_kept(self) -> list[int] | None:
        """The sampling mask for a Trajectory: None when no token was sampled from a truncated
        distribution (nothing to record)."""
        return list(self.kept) if any(self.kept) else None

    def final_routes(self) -> RoutedExperts | None:
        """The routes with one row per token (context tokens after the last request have none), or
        None when the engine captured none."""
        return None if self.routes is None else self.routes.padded(len(self.token_ids))
