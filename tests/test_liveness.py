"""Runs that cannot make progress end with a reason; checkpoints publish atomically (no Ray)."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from conftest import make_group, make_trajectory

from slime.buffer import ReplayBuffer
from slime.core.checkpoint import STATE_FILE, latest_checkpoint
from slime.core.checkpoint import prune as prune_checkpoints
from slime.core.config import BufferConfig
from slime.train import resolve_resume


def _flat_group(ticket: int, reward: float = 1.0):
    trajs = [make_trajectory([1, 2], [3, 4], reward=reward) for _ in range(2)]
    return make_group(trajs, task_id=f"task{ticket}", ticket=ticket)


def _dapo_buffer(cap: int, on_cap: str, batch_groups: int = 2) -> ReplayBuffer:
    cfg = BufferConfig(max_staleness=4, record=False, max_gen_batches=cap, on_gen_cap=on_cap)
    return ReplayBuffer(cfg, batch_groups=batch_groups, drop_zero_variance=True)


async def test_dynamic_sampling_stops_at_the_generation_cap_with_its_reason():
    buf = _dapo_buffer(cap=3, on_cap="stop")
    # 3 batches' worth (3 * 2 groups) are refunded; the next one ends the run.
    for ticket in range(6):
        assert await buf.put(_flat_group(ticket)) is False
        assert buf.failure is None
    assert buf.refunded == 6
    assert await buf.put(_flat_group(6)) is False
    assert "buffer.max_gen_batches" in buf.failure and "6 groups in a row" in buf.failure
    with pytest.raises(RuntimeError, match="dynamic sampling dropped"):
        await asyncio.wait_for(buf.get_batch(2, 0), timeout=1)


async def test_dynamic_sampling_trains_on_what_there_is_past_the_cap():
    buf = _dapo_buffer(cap=1, on_cap="train")
    assert [await buf.put(_flat_group(t)) for t in range(4)] == [False, False, True, True]
    batch, _ = await asyncio.wait_for(buf.get_batch(2, 0), timeout=1)
    assert [g.ticket for g in batch] == [2, 3]
    stats = buf.stats()
    assert stats["buffer/dropped_zero_variance"] == 2 and stats["buffer/kept_zero_variance"] == 2
    # A batch left: the count starts again, so the next flat groups are dropped again.
    assert await buf.put(_flat_group(4)) is False


async def test_a_varied_group_resets_nothing_but_a_batch_does():
    buf = _dapo_buffer(cap=1, on_cap="stop", batch_groups=1)
    assert await buf.put(_flat_group(0)) is False
    varied = make_group(
        [make_trajectory([1], [2], reward=0.0), make_trajectory([1], [2], reward=1.0)], ticket=1
    )
    assert await buf.put(varied) is True
    await asyncio.wait_for(buf.get_batch(1, 0), timeout=1)
    assert await buf.put(_flat_group(2)) is False
    assert buf.failure is None  # one drop since the batch left, cap is 1 batch of 1: not yet past it


def test_dynamic_sampling_without_a_cap_never_fails():
    async def go() -> ReplayBuffer:
        buf = _dapo_buffer(cap=0, on_cap="stop")
        for t in range(50):
            await buf.put(_flat_group(t))
        return buf

    assert asyncio.run(go()).failure is None


def _fake_checkpoint(root, step: int, complete: bool = True) -> str:
    path = os.path.join(root, f"step_{step:06d}")
    os.makedirs(path)
    if complete:
        with open(os.path.join(path, STATE_FILE), "w") as f:
            json.dump({"step": step, "version": step}, f)
    return path


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _fake_checkpoint(tmp_path, step)
    os.makedirs(tmp_path / "step_000005.partial")
    prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_000003", "step_000004", "step_000005.partial"]
    prune_checkpoints(str(tmp_path), keep=0)  # 0 keeps all
    assert len(os.listdir(tmp_path)) == 3


def test_resume_auto_takes_the_latest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume("auto", str(tmp_path)) == ""  # nothing yet: the same command starts fresh
    os.makedirs(root)
    _fake_checkpoint(root, 2)
    _fake_checkpoint(root, 3, complete=False)  # torn: no completion marker
    assert resolve_resume("auto", str(tmp_path)) == str(root / "step_000002")
    assert latest_checkpoint(str(root)) == str(root / "step_000002")
    assert resolve_resume(str(root), str(tmp_path)) == str(root / "step_000002")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume(str(root / "step_000003"), str(tmp_path))
