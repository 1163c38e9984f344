"""trainer.batching: padding, shifting, micro-batches and data-parallel shards (pure, no model)."""

from __future__ import annotations

import pytest
import torch

from slime.types import Group, Task, Trajectory
from trainer.batching import (
    collate,
    flatten_groups,
    group_rewards,
    make_micro_batches,
    minibatch_split,
    num_micro_batches,
    shard_groups,
    split_even,
)

PAD = 0


def traj(prompt: list[int], response: list[int], reward: float = 0.0, version: int = 3) -> Trajectory:
    n_p, n_r = len(prompt), len(response)
    return Trajectory(
        task_id="t",
        token_ids=prompt + response,
        loss_mask=[0] * n_p + [1] * n_r,
        behavior_logprobs=[0.0] * n_p + [-0.5 - 0.1 * i for i in range(n_r)],
        versions=[-1] * n_p + [version] * n_r,
        prompt_len=n_p,
        reward=reward,
    )


def group(*trajs: Trajectory, gid: str = "g") -> Group:
    return Group(task=Task(id=gid, prompt="p"), trajectories=list(trajs))


def test_collate_pads_right_and_shifts_per_token_tensors() -> None:
    a = traj([5, 6], [7, 8, 9], reward=1.0)  # length 5
    b = traj([5], [7], reward=-1.0)  # length 2
    refs = flatten_groups([group(a), group(b)])
    mb = collate(refs, PAD)
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 7, PAD, PAD, PAD]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Column t describes token t+1: a's generated tokens are at positions 2..4 -> columns 1..3.
    assert mb.loss_mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    assert mb.behavior_logprobs[0].tolist() == pytest.approx([0.0, -0.5, -0.6, -0.7])
    assert mb.behavior_logprobs[1].tolist() == pytest.approx([-0.5, 0.0, 0.0, 0.0])
    assert mb.versions.tolist() == [[-1, 3, 3, 3], [3, -1, -1, -1]]
    assert mb.rewards.tolist() == [1.0, -1.0]
    assert mb.group_index.tolist() == [0, 1]
    assert mb.seq_index.tolist() == [0, 1]
    assert mb.lengths.tolist() == [5, 2]
    assert mb.num_tokens == 7 and mb.num_loss_tokens == 4
    assert mb.loss_mask.dtype == torch.float32 and mb.input_ids.dtype == torch.int64


def test_collate_truncates_to_max_len() -> None:
    refs = flatten_groups([group(traj([1, 2], [3, 4, 5, 6]))])
    mb = collate(refs, PAD, max_len=4)
    assert mb.input_ids.tolist() == [[1, 2, 3, 4]]
    assert mb.loss_mask.tolist() == [[0, 1, 1]]


def test_flatten_rejects_too_short_trajectory() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        flatten_groups([group(traj([], [1]))])


def test_flatten_keeps_group_order_and_indices() -> None:
    groups = [group(traj([1], [2]), traj([1], [3])), group(traj([4], [5]))]
    refs = flatten_groups(groups)
    assert [(r.group, r.index) for r in refs] == [(0, 0), (0, 1), (1, 2)]
    assert group_rewards(groups) == [[0.0, 0.0], [0.0]]


def test_split_even_sizes() -> None:
    assert [len(c) for c in split_even(list(range(7)), 3)] == [3, 2, 2]
    assert [len(c) for c in split_even(list(range(2)), 4)] == [1, 1, 0, 0]
    with pytest.raises(ValueError):
        split_even([], 0)


def test_micro_batches_sorted_exact_count_and_dummies() -> None:
    lengths = [9, 3, 6, 4]
    refs = flatten_groups([group(*(traj([1], [2] * (n - 1)) for n in lengths))])
    mbs = make_micro_batches(refs, 2, PAD)
    assert len(mbs) == 2
    # Sorted by length: the short pair together, the long pair together (little padding).
    assert [mb.lengths.tolist() for mb in mbs] == [[3, 4], [6, 9]]
    assert [mb.input_ids.shape[1] for mb in mbs] == [4, 9]
    covered = sorted(i for mb in mbs for i in mb.seq_index.tolist())
    assert covered == [0, 1, 2, 3]
    # More micro-batches than sequences: the extra ones are dummies with no loss tokens.
    mbs = make_micro_batches(refs[:1], 3, PAD)
    assert [mb.dummy for mb in mbs] == [False, True, True]
    assert all(mb.num_loss_tokens == 0 and mb.num_tokens == 0 for mb in mbs[1:])
    with pytest.raises(ValueError):
        make_micro_batches([], 1, PAD)


def test_num_micro_batches() -> None:
    assert num_micro_batches(0, 4) == 1
    assert num_micro_batches(8, 4) == 2
    assert num_micro_batches(9, 4) == 3


def test_shard_groups_equal_counts_balanced_tokens() -> None:
    sizes = [100, 90, 10, 5, 50, 40, 30, 20]
    groups = [group(traj([1], [2] * (n - 1)), gid=str(i)) for i, n in enumerate(sizes)]
    shards = shard_groups(groups, 2)
    assert sorted(i for s in shards for i in s) == list(range(8))
    assert [len(s) for s in shards] == [4, 4]
    loads = [sum(sizes[i] for i in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= 10
    assert shards == shard_groups(groups, 2)  # deterministic
    # Uneven counts: the first ranks get one more.
    assert [len(s) for s in shard_groups(groups[:5], 2)] == [3, 2]
    assert shard_groups(groups, 1) == [list(range(8))]


def test_minibatch_split_shuffles_deterministically() -> None:
    refs = flatten_groups([group(*(traj([1], [2]) for _ in range(6)))])
    plain = minibatch_split(refs, 2)
    assert [[r.index for r in m] for m in plain] == [[0, 1, 2], [3, 4, 5]]
    a = minibatch_split(refs, 2, torch.Generator().manual_seed(1))
    b = minibatch_split(refs, 2, torch.Generator().manual_seed(1))
    assert [[r.index for r in m] for m in a] == [[r.index for r in m] for m in b]
    assert sorted(r.index for m in a for r in m) == list(range(6))


def test_trim_leading_drops_prompt_columns_in_every_row() -> None:
    a = traj([5, 6, 7], [8, 9])  # first loss column: 2
    b = traj([5, 6, 7, 1], [8])  # first loss column: 3
    refs = flatten_groups([group(a, b)])
    full = collate(refs, PAD)
    (mb,) = make_micro_batches(refs, 1, PAD, sort_by_length=False)
    assert mb.start == 2 and mb.logits_to_keep == full.input_ids.shape[1] - 2
    assert torch.equal(mb.loss_mask, full.loss_mask[:, 2:])
    assert torch.equal(mb.behavior_logprobs, full.behavior_logprobs[:, 2:])
    assert torch.equal(mb.versions, full.versions[:, 2:])
    assert torch.equal(mb.targets, full.input_ids[:, 3:])
    assert mb.targets.shape == mb.loss_mask.shape
    assert mb.num_loss_tokens == full.num_loss_tokens
    # A dummy keeps one column; untrimmed when asked.
    (dummy,) = make_micro_batches([], 1, PAD, filler=refs[0])
    assert dummy.loss_mask.shape[1] == 1 and dummy.targets.shape == dummy.loss_mask.shape
    (untrimmed,) = make_micro_batches(refs, 1, PAD, trim=False)
    assert untrimmed.start == 0 and untrimmed.loss_mask.shape == full.loss_mask.shape


def test_shared_prefix_is_common_real_and_before_the_kept_columns() -> None:
    a = traj([5, 6, 7, 4], [8, 9])
    b = traj([5, 6, 7, 4], [8, 3, 2])  # same prompt, same first generated token
    c = traj([5, 6, 1], [8])
    (ab,) = make_micro_batches(flatten_groups([group(a, b)]), 1, PAD)
    # 5 tokens in common, capped at start = 3: every kept prediction column (positions >= start)
    # must lie after the shared part.
    assert ab.start == 3 and ab.shared_prefix == 3
    (abc,) = make_micro_batches(flatten_groups([group(a, b, c)]), 1, PAD)
    assert abc.shared_prefix == 2
    # Padding is never shared: a row that ends inside the others' common part stops it.
    d = traj([5, 6], [7])
    e = traj([5, 6], [7, 8, 9])
    (de,) = make_micro_batches(flatten_groups([group(d, e)]), 1, PAD)
    assert de.start == 1 and de.shared_prefix == 1
    short = traj([5], [7])
    (s_e,) = make_micro_batches(flatten_groups([group(short, traj([5, 6, 7], [9]))]), 1, PAD)
    assert s_e.start == 0 and s_e.shared_prefix == 0
    # One row: nothing to share.
    (single,) = make_micro_batches(flatten_groups([group(a)]), 1, PAD)
    assert single.shared_prefix == 0
