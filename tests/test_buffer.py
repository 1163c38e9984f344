"""Replay buffer: admission control, staleness bound, drops and recording (pure asyncio)."""

from __future__ import annotations

import asyncio
import json

import pytest

from slime.buffer import ReplayBuffer, load_recorded_groups
from slime.config import BufferConfig
from slime.types import Group, Status, Task, Trajectory


def _traj(version: int, reward: float = 1.0, status: Status = Status.COMPLETED) -> Trajectory:
    return Trajectory(
        task_id="t",
        token_ids=[1, 2, 3, 4],
        loss_mask=[0, 0, 1, 1],
        behavior_logprobs=[0.0, 0.0, -0.5, -0.7],
        versions=[-1, -1, version, version],
        prompt_len=2,
        reward=reward,
        status=status,
        start_version=version,
    )


def _group(ticket: int, version: int, rewards=(0.0, 1.0)) -> Group:
    return Group(
        task=Task(id=f"task{ticket}", prompt="p"),
        trajectories=[_traj(version, r) for r in rewards],
        ticket=ticket,
        start_version=version,
    )


async def _try_acquire(buf: ReplayBuffer) -> tuple[int, int] | None:
    try:
        return await asyncio.wait_for(buf.acquire(), timeout=0.05)
    except TimeoutError:
        return None


async def test_admission_window_sync_and_async():
    for staleness in (0, 1, 2):
        buf = ReplayBuffer(BufferConfig(max_staleness=staleness, record=False), batch_groups=2)
        tickets = []
        while (t := await _try_acquire(buf)) is not None:
            tickets.append(t)
        assert len(tickets) == (staleness + 1) * 2
        await buf.set_version(1)
        assert await _try_acquire(buf) == ((staleness + 1) * 2, 1)


async def test_staleness_bound_drops_and_refunds():
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False), batch_groups=1)
    await buf.put(_group(0, version=0))
    await buf.put(_group(1, version=2))
    batch, _ = await buf.get_batch(1, version=2)  # version-0 group is 2 versions old: dropped
    assert [g.ticket for g in batch] == [1]
    stats = buf.stats()
    assert stats["buffer/dropped_stale"] == 1
    assert buf.refunded == 1  # a replacement may be admitted


async def test_get_batch_waits_and_orders_by_ticket():
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False), batch_groups=2)
    getter = asyncio.create_task(buf.get_batch(2, version=0))
    await buf.put(_group(1, 0))
    await asyncio.sleep(0)
    assert not getter.done()
    await buf.put(_group(0, 0))
    batch, wait_s = await asyncio.wait_for(getter, 1)
    assert [g.ticket for g in batch] == [0, 1] and wait_s >= 0


async def test_failed_and_zero_variance_groups():
    buf = ReplayBuffer(
        BufferConfig(max_staleness=0, record=False), batch_groups=1, drop_zero_variance=True, min_group_size=2
    )
    g = _group(0, 0, rewards=(1.0, 0.0, 0.0))
    g.trajectories[2].status = Status.FAILED
    g.trajectories[2].info["error"] = "env raised ValueError"
    assert await buf.put(g)
    assert len(g.trajectories) == 2  # the failed episode never reaches the trainer
    assert not await buf.put(_group(1, 0, rewards=(1.0, 1.0)))
    s = buf.stats()
    assert s["episode/failed"] == 1 and s["buffer/dropped_zero_variance"] == 1
    assert s["episode/failure_reasons"] == {"env raised ValueError": 1}


async def test_close_releases_waiters():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1)
    assert await buf.acquire() == (0, 0)
    waiter = asyncio.create_task(buf.acquire())
    await buf.close()
    assert await asyncio.wait_for(waiter, 1) is None
    with pytest.raises(RuntimeError, match="closed"):
        await buf.get_batch(1, 0)


async def test_record_and_replay(tmp_path):
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=True), batch_groups=1, record_dir=str(tmp_path))
    await buf.put(_group(0, 0))
    await buf.put(_group(1, 0))
    buf.shutdown()
    lines = (tmp_path / "groups.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["ticket"] == 0
    groups = load_recorded_groups(str(tmp_path / "groups.jsonl"))
    assert groups[1].trajectories[0].versions == [-1, -1, 0, 0]
    assert groups[0].trajectories[0].status is Status.COMPLETED


async def test_env_that_always_fails_ends_the_run_with_its_reason():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1, min_group_size=2)
    for i in range(8):
        g = _group(i, 0)
        for t in g.trajectories:
            t.status = Status.FAILED
            t.info["error"] = "env construction raised TypeError: unknown env.kwargs: letters"
        assert not await buf.put(g)
    with pytest.raises(RuntimeError, match="unknown env.kwargs"):
        await asyncio.wait_for(buf.get_batch(1, 0), 1)
