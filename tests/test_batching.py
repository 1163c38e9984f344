"""trainer.batching: padding, shifting, micro-batches and data-parallel shards (pure, no model)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_group, make_trajectory

from slime.core.types import Group, Trajectory
from trainer.batching import (
    collate,
    flatten_groups,
    make_micro_batches,
    minibatch_split,
    num_micro_batches,
    shard_groups,
    split_even,
)

PAD = 0


def traj(prompt: list[int], response: list[int], reward: float = 0.0, version: int = 3) -> Trajectory:
    return make_trajectory(prompt, response, reward=reward, version=version)


def group(*trajs: Trajectory, gid: str = "g") -> Group:
    return make_group(trajs, task_id=gid)


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
    assert [(r.traj.token_ids, r.index) for r in refs] == [([1, 2], 0), ([1, 3], 1), ([4, 5], 2)]


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
    # Largest first onto the lighter rank (ties: the lower rank): 100 -> r0, 90 -> r1, 50 -> r1,
    # 40 -> r0, 30 -> r0 (tie at 140), 20 -> r1, 10 -> r1 (now full), 5 -> r0: loads 175 and 170.
    assert shard_groups(groups, 2) == [[0, 3, 5, 6], [1, 2, 4, 7]]
    # Uneven counts: the first ranks get one more. 100 -> r0, 90 -> r1, 50 -> r1 (full at 2), 10 and
    # 5 -> r0 whatever the loads.
    assert shard_groups(groups[:5], 2) == [[0, 2, 3], [1, 4]]
    assert shard_groups(groups, 1) == [list(range(8))]
    # Equal sizes: groups in index order, round the ranks.
    equal = [group(traj([1], [2]), gid=str(i)) for i in range(4)]
    assert shard_groups(equal, 3) == [[0, 3], [1], [2]]
    assert shard_groups([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size must be > 0"):
        shard_groups(groups, 0)


def test_minibatch_split_shuffles_deterministically() -> None:
    refs = flatten_groups([group(*(traj([1], [2]) for _ in range(6)))])
    plain = minibatch_split(refs, 2)
    assert [[r.index for r in m] for m in plain] == [[0, 1, 2], [3, 4, 5]]
    a = minibatch_split(refs, 2, torch.Generator().manual_seed(1))
    b = minibatch_split(refs, 2, torch.Generator().manual_seed(1))
    shuffled = [[r.index for r in m] for m in a]
    assert shuffled == [[r.index for r in m] for m in b]
    assert shuffled != [[0, 1, 2], [3, 4, 5]]  # the seed really shuffles
    assert [len(m) for m in shuffled] == [3, 3]
    assert sorted(i for m in shuffled for i in m) == list(range(6))
    # The caller's list is not reordered.
    assert [r.index for r in refs] == list(range(6))


def test_trim_leading_drops_prompt_columns_in_every_row() -> None:
    a = traj([5, 6, 7], [8, 9])  # first loss column: 2
    b = traj([5, 6, 7, 1], [8])  # first loss column: 3
    refs = flatten_groups([group(a, b)])
    full = collate(refs, PAD)
    (mb,) = make_micro_batches(refs, 1, PAD, sort_by_length=False)
    assert mb.start == 2 and mb.logits_to_keep == full.input_ids.shape[1] - 2
    assert torch.equal(mb.loss_mask, full.loss_mask[:, 2:])
    assert torch.equal(mb.behavior_logprobs, full.behavior_logprobs[:, 2:])
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


def test_collate_dtypes_and_empty_input() -> None:
    mb = collate(flatten_groups([group(traj([5, 6], [7]))]), PAD)
    dtypes = (mb.attention_mask, mb.behavior_logprobs, mb.seq_index, mb.lengths)
    assert [t.dtype for t in dtypes] == [torch.int64, torch.float32, torch.int64, torch.int64]
    with pytest.raises(ValueError) as e:
        collate([], PAD)
    assert str(e.value) == "collate needs at least one sequence"
    assert (mb.routes, mb.routes_valid, mb.route_layers) == (None, None, ())  # no routes anywhere


def test_split_even_keeps_order() -> None:
    assert split_even(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    with pytest.raises(ValueError, match="parts must be > 0, got 0"):
        split_even([1], 0)


def test_num_micro_batches_rejects_zero_size() -> None:
    assert num_micro_batches(3, 1) == 3
    with pytest.raises(ValueError, match="micro_batch_size must be > 0, got 0"):
        num_micro_batches(3, 0)


def test_make_micro_batches_unsorted_truncated_and_errors() -> None:
    lengths = [9, 3, 6, 4]
    refs = flatten_groups([group(*(traj([1], [2] * (n - 1)) for n in lengths))])
    mbs = make_micro_batches(refs, 2, PAD, sort_by_length=False, trim=False)
    assert [mb.lengths.tolist() for mb in mbs] == [[9, 3], [6, 4]]  # input order kept
    mbs = make_micro_batches(refs, 2, PAD, max_len=5, trim=False)
    assert [mb.lengths.tolist() for mb in mbs] == [[3, 4], [5, 5]]  # 6 and 9 cut to max_len
    with pytest.raises(ValueError, match="no sequences and no filler for a dummy micro-batch"):
        make_micro_batches([], 1, PAD)


def test_shard_groups_capacity_binds() -> None:
    # 3 groups on 2 ranks: capacities 2 and 1. 10 -> r0, 9 -> r1 (now full), 8 -> r0 although r1
    # is lighter.
    groups = [group(traj([1], [2] * (n - 1)), gid=str(i)) for i, n in enumerate([10, 9, 8])]
    assert shard_groups(groups, 2) == [[0, 2], [1]]
    # 5 groups on 3 ranks: capacities 2, 2, 1. 10, 9, 8 one each; 7 -> r1 (r2, the lightest, is
    # full); 6 -> r0.
    groups = [group(traj([1], [2] * (n - 1)), gid=str(i)) for i, n in enumerate([10, 9, 8, 7, 6])]
    assert shard_groups(groups, 3) == [[0, 4], [1, 3], [2]]


def test_shared_prefix_stops_at_the_first_difference() -> None:
    # Rows differ at position 1 although every row is real there; trimming starts at 2.
    a = traj([5, 6, 7], [8])
    b = traj([5, 9, 7], [8])
    (mb,) = make_micro_batches(flatten_groups([group(a, b)]), 1, PAD)
    assert (mb.start, mb.shared_prefix) == (2, 1)
    # Identical rows share everything up to `start`.
    (same,) = make_micro_batches(flatten_groups([group(a, traj([5, 6, 7], [8]))]), 1, PAD)
    assert (same.start, same.shared_prefix) == (2, 2)


def test_collate_routes_pad_and_mark_rows_without_routes_invalid() -> None:
    import numpy as np

    from slime.core.types import RoutedExperts

    # Two MoE layers (decoder layers 1 and 3), top-2; token 2 of `a` has no routes (valid False).
    ids = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2)
    a = traj([5, 6], [7])
    a.routed_experts = RoutedExperts(ids, np.array([True, True, False]), [1, 3])
    b = traj([5], [7, 8, 9])  # no routes: all invalid
    mb = collate(flatten_groups([group(a, b)]), PAD)
    assert mb.route_layers == (1, 3)
    assert mb.routes.dtype == torch.int64 and mb.routes.shape == (2, 4, 2, 2)
    assert mb.routes[0, :3].tolist() == ids.tolist() and (mb.routes[0, 3] == 0).all()
    assert (mb.routes[1] == 0).all()
    assert mb.routes_valid.tolist() == [[True, True, False, False], [False, False, False, False]]
    # Routes of different shapes cannot share a batch.
    b.routed_experts = RoutedExperts(np.zeros((4, 1, 2), dtype=np.uint8), np.ones(4, dtype=bool), [1])
    with pytest.raises(ValueError) as e:
        collate(flatten_groups([group(a, b)]), PAD)
    assert str(e.value) == (
        "trajectories of one batch carry routes of different shapes: layers [1] top-2 vs layers [1, 3] top-2"
    )
    b.routed_experts = RoutedExperts(np.zeros((4, 2, 1), dtype=np.uint8), np.ones(4, dtype=bool), [1, 3])
    with pytest.raises(ValueError, match=r"layers \[1, 3\] top-1 vs layers \[1, 3\] top-2$"):
        collate(flatten_groups([group(a, b)]), PAD)
