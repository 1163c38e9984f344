"""What the endpoint records for one agent episode: its calls, token-exact, in completion order."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from slime.core.types import IndexerKeys, RoutedExperts

# Canonical message: (role, content, ((tool name, arguments JSON), ...), tool_call_id, name).
CanonMessage = tuple[str, str, tuple[tuple[str, str], ...], str, str]


@dataclass
class CallRecord:
    """One model call of an episode, token-exact.

    prompt_ids: the ids sent to the engine; completion_ids / logprobs / versions: what the engine
    returned, unchanged. reused_prefix: how many leading prompt ids were taken verbatim from an earlier
    call's prompt + completion (0 when the prompt was rendered from scratch).
    """

    index: int
    kind: str  # "chat" (Chat Completions, Responses, Messages: one prompt path) | "completion"
    request_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # the engine's: "stop" | "length" | "abort"
    reused_prefix: int
    sampling: dict[str, Any]
    generate_s: float
    tool_calls: int = 0  # tool calls returned to the agent
    malformed_tool_call: bool = False  # the reply tried to call a tool but could not be parsed
    # Matching state for token-exact continuation (rollout/agent/prefix.py).
    messages: tuple[CanonMessage, ...] = ()
    tools_key: str = ""
    reply: CanonMessage | None = None
    prompt_text: str | None = None
    continuation_text: str | None = None  # prompt_text + completion text, when the text is exact
    routed_experts: RoutedExperts | None = None  # MoE routes of prompt + completion, when captured
    indexer_keys: IndexerKeys | None = None  # sparse-attention key selections, likewise
    sample_kept: list[int] | None = None  # the sampling mask of the completion (top-p / top-k requests)


@dataclass
class EpisodeSession:
    """The calls of one agent episode. `calls` is in completion order.

    An engine exception during a call is kept in `engine_error` and signalled by `engine_failed`, so
    the episode runner can propagate it (engine failures are the worker's, not the agent's).
    `refused`: the last request the endpoint refused (its route and error message), cleared by the next
    recorded call: when the agent then gives up, the episode's failure reason names it.
    `conversations`: each Responses API response's whole conversation (normal-form messages, its
    reply last) by response id, for `previous_response_id` within the episode.
    """

    episode_id: str
    base_url: str
    calls: list[CallRecord] = field(default_factory=list)
    closed: bool = False
    engine_error: BaseException | None = None
    engine_failed: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[str] = field(default_factory=set)
    refused: str | None = None
    conversations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _next_index: int = 0

    def next_request_id(self) -> tuple[int, str]:
        """(call index, engine request id) for the next call."""
        i = self._next_index
        self._next_index += 1
        return i, f"agent-{self.episode_id}-{i}"

    def fail(self, error: BaseException) -> None:
        """Record an engine failure and wake the episode runner."""
        self.engine_error = error
        self.engine_failed.set()
