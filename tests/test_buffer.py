"""Replay buffer: admission control, staleness bound, drops and recording (pure asyncio)."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import make_group, make_trajectory

from slime.buffer import ReplayBuffer, load_recorded_groups
from slime.core.config import BufferConfig
from slime.core.types import Group, Status, Trajectory


def _traj(version: int, reward: float = 1.0, status: Status = Status.COMPLETED) -> Trajectory:
    return make_trajectory(
        [1, 2], [3, 4], reward=reward, version=version, status=status, logprobs=[-0.5, -0.7]
    )


def _group(ticket: int, version: int, rewards=(0.0, 1.0)) -> Group:
    return make_group(
        [_traj(version, r) for r in rewards], task_id=f"task{ticket}", ticket=ticket, version=version
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


DROP = "drop_group"  # the policy before partial rollouts: a late group is dropped whole


async def test_staleness_bound_drops_and_refunds():
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False, stale_tokens=DROP), batch_groups=1)
    await buf.put(_group(0, version=0))
    await buf.put(_group(1, version=2))
    batch, _ = await buf.get_batch(1, version=2)  # version-0 group is 2 versions old: dropped
    assert [g.ticket for g in batch] == [1]
    stats = buf.stats()
    assert stats["buffer/dropped_stale"] == 1
    assert stats["rollout/tokens_lost/stale"] == 4  # two episodes of two generated tokens
    assert buf.refunded == 1  # a replacement may be admitted


async def test_get_batch_waits_and_orders_by_ticket():
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False), batch_groups=2)
    getter = asyncio.create_task(buf.get_batch(2, version=0))
    await buf.put(_group(1, 0))
    await asyncio.sleep(0.05)
    assert not getter.done()
    await buf.put(_group(0, 0))
    batch, wait_s = await asyncio.wait_for(getter, 1)
    assert [g.ticket for g in batch] == [0, 1]
    assert wait_s >= 0.05  # it waited for the second group
    await buf.put(_group(2, 0))
    batch, wait_s = await asyncio.wait_for(buf.get_batch(1, version=0), 1)
    assert [g.ticket for g in batch] == [2] and wait_s < 0.05  # ready at once


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


async def test_a_group_exactly_at_the_staleness_bound_is_kept_one_past_it_dropped():
    # max_staleness 1, one group per batch: the admission window is (version + 2) tickets.
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False, stale_tokens=DROP), batch_groups=1)
    assert [await _try_acquire(buf) for _ in range(3)] == [(0, 0), (1, 0), None]
    for ticket in range(3):
        await buf.put(_group(ticket, version=ticket))
    # Trained at version 1, the version-0 group is exactly max_staleness old: kept.
    batch, _ = await asyncio.wait_for(buf.get_batch(1, version=1), 1)
    assert [g.ticket for g in batch] == [0]
    assert buf.stats()["buffer/dropped_stale"] == 0 and buf.refunded == 0
    # Trained at version 3, the version-1 group is one past the bound: dropped; version 2 is kept.
    batch, _ = await asyncio.wait_for(buf.get_batch(1, version=3), 1)
    assert [g.ticket for g in batch] == [2]
    assert buf.stats()["buffer/dropped_stale"] == 1 and buf.refunded == 1
    # The refunded ticket reopens the window by exactly one (the engines still serve version 0).
    assert await _try_acquire(buf) == (2, 0)
    assert await _try_acquire(buf) is None


def _lost_group(ticket: int) -> Group:
    """A group of two whose second episode failed: below min_group_size=2, so it is dropped."""
    g = _group(ticket, 0)
    g.trajectories[1].status = Status.FAILED
    return g


async def test_a_refunded_ticket_is_issued_again_to_a_waiting_worker():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1, min_group_size=2)
    assert await _try_acquire(buf) == (0, 0)
    waiter = asyncio.create_task(buf.acquire())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # window (0 + 0 + 1) * 1 = 1 is full
    assert await buf.put(_lost_group(0)) is False
    assert await asyncio.wait_for(waiter, 1) == (1, 0)  # the refund woke it
    assert await _try_acquire(buf) is None  # exactly one ticket came back
    assert await buf.put(_lost_group(1)) is False
    assert buf.refunded == 2
    assert await _try_acquire(buf) == (2, 0)
    assert buf.stats()["buffer/dropped_failed"] == 2


async def test_a_dead_workers_waiting_acquire_takes_no_ticket_after_its_restart():
    """A worker killed while its acquire() waits (a synchronous run between versions): Ray still runs
    that call in the buffer. Once the worker is requeued under its next incarnation, the old call
    returns None when the window opens, and the ticket goes to the restarted worker (CI hung once:
    the dead call took tickets 8-11 and nobody ever generated them)."""
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1)
    assert await _try_acquire(buf) == (0, 0)
    await buf.put(_group(0, version=0))
    dead = asyncio.create_task(buf.acquire(worker=0, incarnation=0))
    await asyncio.sleep(0.01)
    assert not dead.done()  # window (0 + 0 + 1) * 1 = 1 is full
    assert await buf.requeue(worker=0, incarnation=1) == []  # nothing was in flight
    assert await asyncio.wait_for(dead, 1) is None  # retired: it stops waiting, takes nothing
    await buf.set_version(1)
    assert await asyncio.wait_for(buf.acquire(worker=0, incarnation=1), 1) == (1, 1)
    assert await buf.acquire(worker=0, incarnation=0) is None  # a late call of the old one, too
    assert buf.issued == 2


async def test_a_stale_drop_while_the_trainer_waits_wakes_blocked_workers():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False, stale_tokens=DROP), batch_groups=1)
    assert await _try_acquire(buf) == (0, 0)
    waiter = asyncio.create_task(buf.acquire())
    await buf.put(_group(0, version=0))
    # The trainer is at version 1: the version-0 group is stale, the batch cannot form yet.
    getter = asyncio.create_task(buf.get_batch(1, version=1))
    await asyncio.sleep(0.01)
    assert buf.refunded == 1 and not getter.done()
    try:
        assert await asyncio.wait_for(waiter, 0.2) == (1, 0)
    finally:
        getter.cancel()
        waiter.cancel()


async def test_overflow_drops_the_oldest_group():
    buf = ReplayBuffer(BufferConfig(max_staleness=5, record=False, max_groups=2), batch_groups=1)
    for ticket in (0, 1, 2):
        assert await buf.put(_group(ticket, 0)) is True
    stats = buf.stats()
    assert (stats["buffer/size"], stats["buffer/dropped_overflow"], buf.refunded) == (2, 1, 1)
    batch, _ = await asyncio.wait_for(buf.get_batch(2, 0), 1)
    assert [g.ticket for g in batch] == [1, 2]


async def test_get_batch_takes_the_oldest_tickets_and_keeps_the_rest():
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False), batch_groups=2)
    for ticket in (3, 1, 2):
        await buf.put(_group(ticket, 0))
    batch, _ = await asyncio.wait_for(buf.get_batch(2, 0), 1)
    assert [g.ticket for g in batch] == [1, 2]
    batch, _ = await asyncio.wait_for(buf.get_batch(1, 0), 1)
    assert [g.ticket for g in batch] == [3]


async def test_stats_count_since_the_previous_call():
    buf = ReplayBuffer(
        BufferConfig(max_staleness=0, record=False), batch_groups=2, drop_zero_variance=True, min_group_size=1
    )
    await buf.acquire()
    g = _group(0, 0, rewards=(0.0, 1.0, 1.0))
    g.trajectories[0].status = Status.FAILED  # no "error" in info
    assert await buf.put(g) is False  # what is left (1.0, 1.0) has no variance
    assert await buf.put(_group(1, 0)) is True
    assert buf.stats() == {
        "buffer/size": 1,
        "buffer/issued": 1,
        "episode/failed": 1,
        "episode/count": 5,
        "buffer/dropped_stale": 0,
        "buffer/dropped_zero_variance": 1,
        "buffer/dropped_failed": 0,
        "buffer/dropped_overflow": 0,
        "buffer/kept_zero_variance": 0,
        "episode/failure_reasons": {"unknown": 1},
        # 2 tokens of the failed episode, 2 + 2 of the two left in the dropped group
        "rollout/tokens_lost": 6,
        "rollout/tokens_lost/stale": 0,
        "rollout/tokens_lost/failed": 2,
        "rollout/tokens_lost/zero_variance": 4,
        "rollout/tokens_lost/overflow": 0,
    }
    again = buf.stats()
    assert (again["episode/failed"], again["episode/count"], again["buffer/dropped_zero_variance"]) == (
        0,
        0,
        0,
    )
    assert again["episode/failure_reasons"] == {} and again["buffer/size"] == 1


async def test_failures_in_a_row_end_the_run_at_four_batches_and_a_success_resets_the_count():
    # batch_groups 3: the limit is max(8, 4 * 3) = 12 failed groups in a row.
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=3, min_group_size=2)
    for ticket in range(11):
        await buf.put(_lost_group(ticket))
    assert buf.failure is None
    assert await buf.put(_group(11, 0)) is True  # a group that made it: the count starts again
    for ticket in range(12, 23):
        await buf.put(_lost_group(ticket))
    assert buf.failure is None
    await buf.put(_lost_group(23))
    assert buf.failure == (
        "12 groups in a row lost their episodes to env failures "
        "(check env.name / env.kwargs / the environment code): unknown (x23)"
    )
    with pytest.raises(RuntimeError, match="12 groups in a row"):
        await asyncio.wait_for(buf.get_batch(3, 0), 1)


async def test_closed_buffer_admits_nobody_and_cannot_fill_a_batch():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=2)
    await buf.put(_group(0, 0))
    getter = asyncio.create_task(buf.get_batch(2, 0))
    await asyncio.sleep(0.01)
    await buf.close()
    with pytest.raises(RuntimeError, match="replay buffer closed before a full batch was ready"):
        await asyncio.wait_for(getter, 1)
    assert await asyncio.wait_for(buf.acquire(), 1) is None


def test_recording_needs_both_a_dir_and_the_flag(tmp_path):
    ReplayBuffer(BufferConfig(record=False), batch_groups=1, record_dir=str(tmp_path / "off")).shutdown()
    ReplayBuffer(BufferConfig(record=True), batch_groups=1, record_dir=None).shutdown()
    assert not (tmp_path / "off").exists()


async def test_only_accepted_groups_are_recorded(tmp_path):
    buf = ReplayBuffer(
        BufferConfig(max_staleness=0, record=True), batch_groups=1, record_dir=str(tmp_path), min_group_size=2
    )
    await buf.put(_lost_group(0))
    await buf.put(_group(1, 0))
    buf.shutdown()
    buf.shutdown()  # idempotent
    assert [json.loads(line)["ticket"] for line in (tmp_path / "groups.jsonl").read_text().splitlines()] == [
        1
    ]


def test_load_recorded_groups_skips_blank_lines_and_rejects_an_empty_file(tmp_path):
    path = tmp_path / "groups.jsonl"
    path.write_text("\n" + json.dumps(_group(4, 1).to_dict()) + "\n\n")
    (group,) = load_recorded_groups(str(path))
    assert (group.ticket, group.start_version, group.rewards) == (4, 1, [0.0, 1.0])
    path.write_text("\n \n")
    with pytest.raises(ValueError, match=r"buffer.replay_path='.*groups.jsonl' holds no groups"):
        load_recorded_groups(str(path))


async def test_defaults_keep_flat_and_small_groups():
    # Without dynamic sampling a group whose rewards are equal is trained on, and one trajectory
    # is enough for a group.
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1)
    assert await buf.put(_group(0, 0, rewards=(1.0, 1.0))) is True
    assert await buf.put(_group(1, 0, rewards=(1.0,))) is True


async def test_tickets_belong_to_worker_0_by_default():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1)
    assert await buf.acquire() == (0, 0)
    assert await buf.requeue(worker=0) == [0]


async def test_failure_message_lists_the_three_commonest_reasons_cut_to_80_characters():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1, min_group_size=2)
    long_reason = "x" * 100
    reasons = [long_reason] * 3 + ["b"] * 2 + ["c"] * 2 + ["d"]
    for ticket, reason in enumerate(reasons):
        g = _lost_group(ticket)
        g.trajectories[1].info["error"] = reason
        await buf.put(g)
    assert buf.failure == (
        "8 groups in a row lost their episodes to env failures "
        f"(check env.name / env.kwargs / the environment code): {'x' * 80} (x3); b (x2); c (x2)"
    )


async def test_exact_messages_of_a_closed_buffer_a_gen_cap_and_a_late_restore():
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=1)
    await buf.close()
    with pytest.raises(RuntimeError) as e:
        await asyncio.wait_for(buf.get_batch(1, 0), 1)
    assert str(e.value) == "replay buffer closed before a full batch was ready"
    capped = ReplayBuffer(
        BufferConfig(max_staleness=0, record=False, max_gen_batches=1),
        batch_groups=1,
        drop_zero_variance=True,
    )
    for ticket in range(2):
        await capped.put(_group(ticket, 0, rewards=(1.0, 1.0)))
    assert capped.failure == (
        "dynamic sampling dropped 1 groups in a row whose rewards were all equal (1 batches' worth, "
        "buffer.max_gen_batches) without filling a batch: the task is too hard or too easy for the "
        "policy. Set algorithm.dynamic_sampling=false, buffer.on_gen_cap=train, or a larger "
        "buffer.max_gen_batches"
    )
    await capped.acquire()
    with pytest.raises(RuntimeError) as e:
        capped.restore(ReplayBuffer(BufferConfig(), batch_groups=1).snapshot())
    assert str(e.value) == "ReplayBuffer.restore() must run before the buffer is used"


async def test_kept_zero_variance_counts_since_the_previous_stats():
    cfg = BufferConfig(max_staleness=0, record=False, max_gen_batches=1, on_gen_cap="train")
    buf = ReplayBuffer(cfg, batch_groups=1, drop_zero_variance=True)
    assert [await buf.put(_group(t, 0, rewards=(1.0, 1.0))) for t in range(3)] == [False, True, True]
    assert buf.stats()["buffer/kept_zero_variance"] == 2
    assert buf.stats()["buffer/kept_zero_variance"] == 0


def _spanning(ticket: int, versions: list[int]) -> Group:
    """One episode whose generated tokens (one per entry) were sampled at `versions`: an episode that
    ran through weight pushes."""
    t = make_trajectory([1, 2], list(range(3, 3 + len(versions))), reward=1.0, version=versions[0])
    t.versions[2:] = versions
    fresh = make_trajectory([1, 2], [3], reward=0.0, version=versions[-1])  # a sibling that ended quickly
    return make_group([t, fresh], task_id=f"task{ticket}", ticket=ticket)


async def test_partial_rollouts_keep_the_late_group_and_its_stale_tokens():
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False, stale_tokens="keep"), batch_groups=1)
    await buf.put(_spanning(0, [0, 0, 2, 3]))  # began at version 0, finished at 3
    batch, _ = await asyncio.wait_for(buf.get_batch(1, version=3), 1)
    assert [g.ticket for g in batch] == [0]
    assert batch[0].trajectories[0].loss_mask == [0, 0, 1, 1, 1, 1]  # every token trained
    stats = buf.stats()
    assert stats["buffer/dropped_stale"] == 0 and stats["rollout/tokens_lost"] == 0 and buf.refunded == 0


async def test_partial_rollouts_mask_exactly_the_tokens_past_the_bound():
    buf = ReplayBuffer(BufferConfig(max_staleness=1, record=False, stale_tokens="mask"), batch_groups=1)
    await buf.put(_spanning(0, [0, 1, 2, 3]))
    batch, _ = await asyncio.wait_for(buf.get_batch(1, version=3), 1)
    # Trained at 3 with bound 1: versions 2 and 3 stay, 1 is one past the bound, 0 two past.
    assert batch[0].trajectories[0].loss_mask == [0, 0, 0, 0, 1, 1]
    assert batch[0].rewards == [1.0, 0.0]  # the group and its reward are kept
    stats = buf.stats()
    assert stats["rollout/tokens_lost/stale"] == 2 and stats["rollout/tokens_lost"] == 2
    assert stats["buffer/dropped_stale"] == 0 and buf.refunded == 0


async def test_a_new_ticket_goes_to_the_least_loaded_waiting_worker():
    """Worker 0 holds two groups in flight (a slow engine), worker 1 one: when the window opens,
    worker 1's waiting call gets the ticket first, whichever of them asked first."""
    buf = ReplayBuffer(BufferConfig(max_staleness=0, record=False), batch_groups=3)
    assert [await buf.acquire(0), await buf.acquire(0), await buf.acquire(1)] == [(0, 0), (1, 0), (2, 0)]
    slow = asyncio.create_task(buf.acquire(0))  # waits first
    await asyncio.sleep(0.01)
    fast = asyncio.create_task(buf.acquire(1))
    await asyncio.sleep(0.01)
    await buf.set_version(1)  # three more tickets
    assert await asyncio.wait_for(fast, 1) == (3, 1)
    assert await asyncio.wait_for(slow, 1) == (4, 1)  # then loads are equal (3 and 2 -> 2 and 2)
