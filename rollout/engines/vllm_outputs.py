"""Reading what a vLLM request produced into slime's per-token fields, on the engine's side.

`VLLMEngine._segment` (rollout/engines/vllm.py) turns each finished vLLM request into a `Segment`:
the sampled token's logprob from vLLM's per-token logprobs (`_sampled_logprob`), the exact weight
version of every token from the engine's version spans (`_apply_spans`), and slime's finish reason
(`_normalise_reason`). What the worker extension recorded for a request besides (MoE routes, indexer
selections, sampling masks: rollout/engines/vllm_capture.py) is fetched with `_Taker`, one
`collective_rpc` for all the requests that finish in one engine step. Nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any


class _Taker:
    """Takes per-request records out of the worker with one `collective_rpc(method, [vrids])`:
    requests that finish together (a batch ends in one step) share the call, since each call waits
    for the engine's next step boundary."""

    def __init__(self, llm: Any, method: str) -> None:
        self.llm = llm  # () -> the AsyncLLM
        self.method = method
        self.waiters: dict[str, asyncio.Future] = {}
        self.fetch: asyncio.Task | None = None

    async def take(self, vrid: str) -> Any:
        """The worker's record of finished request `vrid` (None: it holds none)."""
        fut = asyncio.get_running_loop().create_future()
        self.waiters[vrid] = fut
        if self.fetch is None or self.fetch.done():
            self.fetch = asyncio.ensure_future(self._fetch())
        return await fut

    async def _fetch(self) -> None:
        while self.waiters:
            await asyncio.sleep(0)  # let the other requests that finished in this step join in
            waiters, self.waiters = self.waiters, {}
            try:
                got = (await self.llm().collective_rpc(self.method, args=(list(waiters),)))[0]
            except Exception as e:
                for fut in waiters.values():
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for vrid, fut in waiters.items():
                if not fut.done():
                    fut.set_result(got.get(vrid))

    def discard(self, vrid: str) -> None:
        """Let the worker drop what it holds for `vrid` (a segment that raised or was cancelled)."""

        async def drop() -> None:
            with contextlib.suppress(Exception):
                await self.llm().collective_rpc(self.method, args=([vrid],))

        asyncio.ensure_future(drop())


def _sampled_logprob(lps: Any, i: int, token: int) -> float:
    if lps is None:
        return math.nan
    entry = lps[i]
    with contextlib.suppress(KeyError, TypeError):
        return float(entry[token].logprob)
    return math.nan


def _apply_spans(versions: list[int], start: int, end: int, spans: Any) -> None:
    """Overwrite arrival tags of versions[start:end] with the engine's exact per-token version spans."""
    if not spans:
        return
    if spans[-1].end != end - start:
        return  # spans do not cover this segment's tokens (should not happen): keep arrival tags
    for span in spans:
        try:
            v = int(span.version)
        except (TypeError, ValueError):
            continue
        for j in range(start + span.start, start + span.end):
            versions[j] = v


def _normalise_reason(reason: str | None) -> str:
    if reason in ("stop", "length", "abort"):
        return reason
    if reason is None:
        return "abort"  # the stream ended without a finished output
    return "abort" if reason == "error" else "stop"
