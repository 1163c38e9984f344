"""The replay buffer: finished groups in, training batches out, staleness bounded.

Admission control keeps the data fresh before it is generated: a rollout worker must `acquire()` a
ticket before starting a group (of the workers waiting, the one with the fewest groups in flight gets
it), and tickets are issued only while

    issued < (version + max_staleness + 1) * batch_groups + refunded

where `version` is the policy version the engines already serve and `refunded` counts groups that were
admitted but will never be trained on (dropped). Batch k (trained at version k) consumes tickets
[k*B, (k+1)*B) in FIFO order, so a group admitted at version v is trained at a version <= v +
max_staleness unless it finishes late. What happens to the tokens of a late group that are then
more than max_staleness versions old is `buffer.stale_tokens`, applied in `get_batch`: `keep` trains
them (each token against the behaviour logprobs of the version that sampled it), `mask` leaves them
out of the loss (counted in `rollout/tokens_lost/stale`); either way the group, its reward and its
fresher tokens are trained, so slow episodes are never wasted. `drop_group` (before partial rollouts)
drops the whole group and refunds its ticket. With max_staleness=0 exactly one batch is in flight per
version: the synchronous on-policy baseline.

Tokens lost: every generated token that will never be trained is counted by reason in `stats()`
(`rollout/tokens_lost/<reason>`: failed episodes, stale tokens, zero-variance and overflow drops).

Every accepted group can be appended to `groups.jsonl` so a run can be replayed into the trainer alone.
The class is plain asyncio (unit-testable); `slime.controller` hosts it in a Ray actor.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import time
from typing import Any

from slime.core.config import BufferConfig, StaleTokens
from slime.core.types import Batch, Group, Status
from slime.metrics import batch_metrics


class ReplayBuffer:
    """Version-tagged groups with admission control and a staleness bound."""

    def __init__(
        self,
        cfg: BufferConfig,
        batch_groups: int,
        record_dir: str | None = None,
        drop_zero_variance: bool = False,
        min_group_size: int = 1,
    ) -> None:
        self.cfg = cfg
        self.batch_groups = batch_groups
        self.drop_zero_variance = drop_zero_variance  # DAPO dynamic sampling
        self.min_group_size = min_group_size
        self.version = 0
        self.issued = 0
        self.refunded = 0
        self.closed = False
        self.failure: str | None = None  # set when episodes keep failing: the run cannot make progress
        self._failed_in_a_row = 0
        self._zero_variance_since_batch = 0  # dynamic-sampling drops since the last batch left
        self._kept_zero_variance = 0  # groups kept past the cap (on_gen_cap=train), since last stats()
        self._groups: list[Group] = []
        self._outstanding: dict[int, int] = {}  # ticket -> worker, admitted and not yet put
        self._incarnation: dict[int, int] = {}  # worker -> its latest restart (see requeue)
        self._waiting: collections.Counter[int] = collections.Counter()  # worker -> its calls in acquire
        self._reissue: list[int] = []  # tickets to hand out again, oldest first
        self._handed_out: list[Group] = []  # the batch of the latest get_batch call
        self._cond = asyncio.Condition()
        self._dropped: collections.Counter[str] = collections.Counter()  # since last stats()
        self._tokens_lost: collections.Counter[str] = collections.Counter()  # since last stats()
        self._failed_episodes = 0
        self._failure_reasons: collections.Counter[str] = collections.Counter()
        self._episodes = 0
        self._record = None
        if record_dir and cfg.record:
            os.makedirs(record_dir, exist_ok=True)
            self._record = open(os.path.join(record_dir, "groups.jsonl"), "a", encoding="utf-8")

    # -- admission ---------------------------------------------------------------------------------
    def _window(self) -> int:
        return (self.version + self.cfg.max_staleness + 1) * self.batch_groups + self.refunded

    def _retired(self, worker: int, incarnation: int) -> bool:
        return incarnation < self._incarnation.get(worker, 0)

    async def acquire(self, worker: int = 0, incarnation: int = 0) -> tuple[int, int] | None:
        """Wait for an admission ticket; returns (ticket, version at admission), or None once closed
        or once `worker` was requeued under a later `incarnation` (the caller is gone: a dead actor's
        call still waits here, and a ticket handed to it would never come back).

        Tickets whose groups were lost in flight (a dead worker, a resumed run) are handed out again
        first, under their old numbers, so every ticket's task is generated and trained once.
        """
        async with self._cond:
            self._waiting[worker] += 1
            try:
                await self._cond.wait_for(
                    lambda: (
                        self.closed
                        or self._retired(worker, incarnation)
                        or ((self._reissue or self.issued < self._window()) and self._least_loaded(worker))
                    )
                )
            finally:
                self._waiting[worker] -= 1
            if self.closed or self._retired(worker, incarnation):
                return None
            if self._reissue:
                ticket = self._reissue.pop(0)
            else:
                ticket = self.issued
                self.issued += 1
            self._outstanding[ticket] = worker
            self._cond.notify_all()  # the least loaded waiter may be another one now
            return ticket, self.version

    def _load(self, worker: int) -> int:
        """Groups `worker` has in flight (tickets handed to it, not yet put)."""
        return sum(1 for w in self._outstanding.values() if w == worker)

    def _least_loaded(self, worker: int) -> bool:
        """Whether `worker` has no more groups in flight than any other worker waiting for a ticket:
        new groups go to the least loaded engine, so a slow one (its groups stay in flight longer)
        gets fewer, and the others are never held back by it."""
        waiting = [w for w, n in self._waiting.items() if n > 0]
        return self._load(worker) <= min((self._load(w) for w in waiting), default=0)

    async def requeue(self, worker: int, incarnation: int = 0) -> list[int]:
        """`worker` died: its tickets in flight go back to the queue; returns them. `incarnation`
        numbers the worker that replaces it: calls of earlier ones still waiting in `acquire` get None."""
        async with self._cond:
            self._incarnation[worker] = max(self._incarnation.get(worker, 0), incarnation)
            lost = sorted(t for t, w in self._outstanding.items() if w == worker)
            for t in lost:
                del self._outstanding[t]
            self._reissue = sorted(self._reissue + lost)
            self._cond.notify_all()
            return lost

    async def set_version(self, version: int) -> None:
        """The engines now serve `version`: widen the admission window."""
        async with self._cond:
            self.version = version
            self._cond.notify_all()

    async def close(self) -> None:
        async with self._cond:
            self.closed = True
            self._cond.notify_all()

    # -- data in -------------------------------------------------------------------------------------
    def _drop(self, reason: str, groups: list[Group]) -> None:
        """Refund `groups` (dropped for `reason`): their tickets widen the window, their generated
        tokens are lost."""
        self._dropped[reason] += len(groups)
        self.refunded += len(groups)
        self._tokens_lost[reason] += sum(t.num_generated for g in groups for t in g.trajectories)

    async def put(self, group: Group) -> bool:
        """Accept a finished group; returns False when it was dropped (the ticket is refunded)."""
        async with self._cond:
            self._outstanding.pop(group.ticket, None)
            self._episodes += len(group.trajectories)
            failed = [t for t in group.trajectories if t.status == Status.FAILED]
            self._failed_episodes += len(failed)
            self._tokens_lost["failed"] += sum(t.num_generated for t in failed)
            for t in failed:
                self._failure_reasons[str(t.info.get("error", "unknown"))[:80]] += 1
            # Failed episodes carry no learning signal about the policy (their reward is an env
            # failure, not an outcome), so they never reach the trainer.
            group.trajectories = [t for t in group.trajectories if t.status != Status.FAILED]
            if len(group.trajectories) < self.min_group_size:
                self._drop("failed", [group])
                self._failed_in_a_row += 1
                # Failed groups are refunded, so a broken env would spin forever: give up loudly.
                if self._failed_in_a_row >= max(8, 4 * self.batch_groups) and self.failure is None:
                    reasons = "; ".join(f"{r} (x{n})" for r, n in self._failure_reasons.most_common(3))
                    self.failure = (
                        f"{self._failed_in_a_row} groups in a row lost their episodes to env failures "
                        f"(check env.name / env.kwargs / the environment code): {reasons}"
                    )
            elif self.drop_zero_variance and len(set(group.rewards)) <= 1 and not self._gen_cap_reached():
                self._drop("zero_variance", [group])
                self._zero_variance_since_batch += 1
            else:
                if len(self._groups) >= self.cfg.max_groups:
                    self._drop("overflow", [self._groups.pop(0)])
                self._groups.append(group)
                self._failed_in_a_row = 0
                if self._record is not None:
                    self._record.write(json.dumps(group.to_dict()) + "\n")
                    self._record.flush()
                self._cond.notify_all()
                return True
            self._cond.notify_all()
            return False

    def _gen_cap_reached(self) -> bool:
        """DAPO's cap on generation batches: dynamic sampling refunds every group whose rewards are
        all equal, which on a too-hard (or too-easy) task would generate forever without a step.
        After `max_gen_batches` batches' worth of such drops since the last batch, either keep
        those groups (`on_gen_cap=train`) or end the run with the reason (`on_gen_cap=stop`)."""
        cap = self.cfg.max_gen_batches
        if not cap or self._zero_variance_since_batch < cap * self.batch_groups:
            return False
        if self.cfg.on_gen_cap == "train":
            self._kept_zero_variance += 1
            return True
        if self.failure is None:
            self.failure = (
                f"dynamic sampling dropped {self._zero_variance_since_batch} groups in a row whose rewards "
                f"were all equal ({cap} batches' worth, buffer.max_gen_batches) without filling a batch: "
                "the task is too hard or too easy for the policy. Set algorithm.dynamic_sampling=false, "
                "buffer.on_gen_cap=train, or a larger buffer.max_gen_batches"
            )
            self._cond.notify_all()
        return False

    # -- data out ------------------------------------------------------------------------------------
    def _drop_stale(self, version: int) -> None:
        """stale_tokens=drop_group: drop every group with a token older than the bound."""
        keep, stale = [], []
        for g in self._groups:
            (keep if version - g.min_version <= self.cfg.max_staleness else stale).append(g)
        if stale:
            self._drop("stale", stale)
            # The refunds widen the admission window: wake the workers blocked in acquire(), or a
            # trainer waiting for replacements waits forever (this runs inside get_batch's wait).
            self._cond.notify_all()
        self._groups = keep

    def _mask_stale(self, batch: list[Group], version: int) -> None:
        """stale_tokens=mask: take the generated tokens more than max_staleness versions older than
        `version` out of the loss (their episode, reward and fresher tokens stay)."""
        oldest = version - self.cfg.max_staleness
        for traj in (t for g in batch for t in g.trajectories):
            stale = [
                i
                for i, (m, v) in enumerate(zip(traj.loss_mask, traj.versions, strict=True))
                if m and v < oldest
            ]
            for i in stale:
                traj.loss_mask[i] = 0
            self._tokens_lost["stale"] += len(stale)

    async def get_batch(self, n: int, version: int) -> tuple[list[Group], float]:
        """Wait until n fresh groups are ready; return the n oldest (by ticket) and seconds waited."""
        t0 = time.perf_counter()
        async with self._cond:
            self._handed_out = []  # this call's batch, until the next call (see snapshot)

            def ready() -> bool:
                if self.cfg.stale_tokens == StaleTokens.drop_group:
                    self._drop_stale(version)
                return self.closed or self.failure is not None or len(self._groups) >= n

            await self._cond.wait_for(ready)
            if self.failure is not None:
                raise RuntimeError(self.failure)
            if self.closed:  # a stopping run: never hand a batch to a caller that stopped waiting
                raise RuntimeError("replay buffer closed before a full batch was ready")
            self._groups.sort(key=lambda g: g.ticket)
            batch, self._groups = self._groups[:n], self._groups[n:]
            if self.cfg.stale_tokens == StaleTokens.mask:
                self._mask_stale(batch, version)
            self._handed_out = batch
            self._zero_variance_since_batch = 0
            # Dropping stale groups refunded tickets: let workers start replacements.
            self._cond.notify_all()
        return batch, time.perf_counter() - t0

    async def hand_out(self, n: int, version: int) -> tuple[Batch, float]:
        """`get_batch` for the driver: the batch by reference (each group `ray.put` from here, so it
        goes from this actor to the trainer ranks without passing through the driver) with its
        tickets, task ids, token counts and rollout metrics at `version` (slime/core/types.py Batch).
        Outside Ray the groups themselves stand in for the references."""
        groups, waited = await self.get_batch(n, version)
        refs: list[Any] = list(groups)
        with contextlib.suppress(ImportError):
            import ray

            if ray.is_initialized():
                refs = [ray.put(g) for g in groups]
        batch = Batch.of(groups, batch_metrics(groups, version))
        batch.groups = refs
        return batch, waited

    def stats(self) -> dict[str, Any]:
        """Counters since the previous call (dropped by reason, failures) plus gauges."""
        out: dict[str, Any] = {
            "buffer/size": len(self._groups),
            "buffer/issued": self.issued,
            "episode/failed": self._failed_episodes,
            "episode/count": self._episodes,
        }
        for reason in ("stale", "zero_variance", "failed", "overflow"):
            out[f"buffer/dropped_{reason}"] = self._dropped.get(reason, 0)
        out["buffer/kept_zero_variance"] = self._kept_zero_variance
        out["episode/failure_reasons"] = dict(self._failure_reasons)
        out["rollout/tokens_lost"] = sum(self._tokens_lost.values())
        for reason in ("stale", "failed", "zero_variance", "overflow"):
            out[f"rollout/tokens_lost/{reason}"] = self._tokens_lost.get(reason, 0)
        self._kept_zero_variance = 0
        self._tokens_lost.clear()
        self._dropped.clear()
        self._failed_episodes = 0
        self._episodes = 0
        self._failure_reasons.clear()
        return out

    # -- resume ---------------------------------------------------------------------------------------
    def snapshot(self, with_last_batch: bool = False) -> dict[str, Any]:
        """Everything a resumed run needs to continue the ticket sequence exactly: the counters, the
        accepted groups not yet trained, and the tickets still in flight (to be generated again).
        `with_last_batch`: the caller abandoned its latest get_batch (a stop), so the batch that call
        took, if any, was never trained and is kept too."""
        untrained = [*self._handed_out, *self._groups] if with_last_batch else self._groups
        return {
            "version": self.version,
            "issued": self.issued,
            "refunded": self.refunded,
            "reissue": sorted([*self._reissue, *self._outstanding]),
            "groups": [g.to_dict() for g in untrained],
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `snapshot()`'s state (call before any worker acquires)."""
        if self.issued or self._groups:
            raise RuntimeError("ReplayBuffer.restore() must run before the buffer is used")
        self.version = int(state["version"])
        self.issued = int(state["issued"])
        self.refunded = int(state["refunded"])
        self._reissue = sorted(int(t) for t in state["reissue"])
        self._groups = [Group.from_dict(d) for d in state["groups"]]

    def shutdown(self) -> None:
        if self._record is not None:
            self._record.close()
            self._record = None


def load_recorded_groups(path: str) -> list[Group]:
    """Read a groups.jsonl written by the buffer (for replaying rollouts into the trainer alone)."""
    groups = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                groups.append(Group.from_dict(json.loads(line)))
    if not groups:
        raise ValueError(f"buffer.replay_path={path!r} holds no groups")
    return groups
