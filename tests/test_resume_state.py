"""The buffer's ticket accounting across a worker's death and a resumed run (pure asyncio, no Ray)."""

from __future__ import annotations

import asyncio

from conftest import make_group, make_trajectory

from slime.buffer import ReplayBuffer
from slime.core.config import BufferConfig


def _group(ticket: int, version: int = 0):
    trajs = [make_trajectory([1], [2], reward=r, version=version) for r in (0.0, 1.0)]
    return make_group(trajs, task_id=f"task{ticket}", ticket=ticket, version=version)


def _buffer() -> ReplayBuffer:
    return ReplayBuffer(BufferConfig(max_staleness=1, record=False), batch_groups=2)


async def _acquire(buf: ReplayBuffer, worker: int = 0) -> int | None:
    try:
        admitted = await asyncio.wait_for(buf.acquire(worker), timeout=0.05)
    except TimeoutError:
        return None
    return None if admitted is None else admitted[0]


async def test_a_dead_workers_tickets_are_issued_again_before_new_ones():
    buf = _buffer()
    assert [await _acquire(buf, worker=w) for w in (0, 1, 0, 1)] == [0, 1, 2, 3]
    assert await _acquire(buf) is None  # window (0 + 1 + 1) * 2 = 4 is full
    await buf.put(_group(1))
    assert await buf.requeue(worker=0) == [0, 2]
    assert await buf.requeue(worker=0) == []  # nothing twice
    # The lost tickets come back under their own numbers, then the window stays closed.
    assert [await _acquire(buf, worker=1) for _ in range(3)] == [0, 2, None]
    assert buf.issued == 4


async def test_snapshot_and_restore_continue_the_ticket_sequence_exactly():
    buf = _buffer()
    for _ in range(4):
        await _acquire(buf)
    await buf.put(_group(0))
    await buf.put(_group(1))
    batch, _ = await buf.get_batch(2, 0)
    assert [g.ticket for g in batch] == [0, 1]
    await buf.set_version(1)
    await buf.put(_group(3))  # accepted, not trained: must survive the resume
    assert await _acquire(buf) == 4  # window now (1 + 1 + 1) * 2 = 6
    state = buf.snapshot()
    assert state["reissue"] == [2, 4] and state["issued"] == 5 and state["version"] == 1

    resumed = _buffer()
    resumed.restore(state)
    # In-flight tickets 2 and 4 are generated again, then the sequence continues at 5, bounded by
    # the same window as before the kill (no burst of version x batch tickets).
    assert [await _acquire(resumed) for _ in range(4)] == [2, 4, 5, None]
    await resumed.put(_group(2, version=1))
    batch, _ = await resumed.get_batch(2, 1)
    assert [g.ticket for g in batch] == [2, 3]
    assert batch[1].trajectories[0].token_ids == [1, 2]


async def test_restore_refuses_a_used_buffer():
    buf = _buffer()
    await _acquire(buf)
    try:
        buf.restore(_buffer().snapshot())
    except RuntimeError as e:
        assert "before the buffer is used" in str(e)
    else:
        raise AssertionError("restore on a used buffer must fail")


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np
    import torch

    from trainer.export import load_rng_state, save_rng_state

    assert load_rng_state(str(tmp_path), rank=0) is False  # a checkpoint without them
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_rng_state(str(tmp_path), rank=0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    assert load_rng_state(str(tmp_path), rank=0) is True
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


async def test_a_batch_taken_by_an_abandoned_get_batch_is_kept_in_the_snapshot():
    """A stop interrupts the controller's get_batch; the buffer's call may still complete and take the
    groups. They were never trained, so the snapshot must keep them (the resumed run hung without)."""
    buf = _buffer()
    for _ in range(2):
        await _acquire(buf)
    waiting = asyncio.ensure_future(buf.get_batch(2, 0))
    await buf.put(_group(0))
    await buf.put(_group(1))
    await waiting  # the controller stopped listening, but the buffer handed the batch out
    assert buf.snapshot()["groups"] == []
    kept = buf.snapshot(with_last_batch=True)["groups"]
    assert [g["ticket"] for g in kept] == [0, 1]


async def test_a_closed_buffer_hands_out_no_batch():
    buf = _buffer()
    for _ in range(2):
        await _acquire(buf)
    await buf.put(_group(0))
    await buf.put(_group(1))
    await buf.close()
    try:
        await buf.get_batch(2, 0)
    except RuntimeError as e:
        assert "closed" in str(e)
    else:
        raise AssertionError("a closed buffer must not hand out a batch")
    assert [g["ticket"] for g in buf.snapshot()["groups"]] == [0, 1]
