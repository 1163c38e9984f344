"""trainer.objective without DeepSpeed: normalisers, advantages and the micro-step loss, against
hand-computed values and against computing the whole batch at once."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_group, make_trajectory

from slime.core.config import AlgorithmConfig
from slime.core.types import Group, Trajectory
from trainer import objective as obj
from trainer.advantages import Moments, sequence_advantages, whiten
from trainer.batching import flatten_groups, make_micro_batches
from trainer.process import Collectives
from trainer.step_metrics import StepMetrics

PAD = 0
VOCAB = 8


def traj(prompt: list[int], response: list[int], reward: float = 0.0) -> Trajectory:
    """The shared builder with behaviour logprobs of -2 on every response token (hand values below)."""
    return make_trajectory(prompt, response, reward=reward, logprobs=[-2.0] * len(response))


def group(*trajs: Trajectory) -> Group:
    return make_group(trajs)


def algo(**kw) -> AlgorithmConfig:
    base = dict(name="grpo", advantage="grpo", loss_agg="token_mean", off_policy="tis")
    base.update(kw)
    return AlgorithmConfig(**base)


def plan_of(groups: list[Group], micro: list[int]) -> obj.Plan:
    """One minibatch cut into micro-batches of the given sizes (in order, no sorting)."""
    refs = flatten_groups(groups)
    plan, start = [], 0
    for size in micro:
        (mb,) = make_micro_batches(refs[start : start + size], 1, PAD, sort_by_length=False)
        plan.append(obj.Scored(mb=mb))
        start += size
    return [plan]


class TwoRanks(Collectives):
    """Rank `rank` of two, the other rank's contributions given up front (sums / gathered objects)."""

    def __init__(self, rank: int, other_sums: list[float] | None = None, other_obj: object = None) -> None:
        super().__init__(rank=rank, world_size=2)
        self.other_sums, self.other_obj = other_sums, other_obj

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        assert op == "sum" and self.other_sums is not None and len(self.other_sums) == len(values)
        return [a + b for a, b in zip(values, self.other_sums, strict=True)]

    def all_gather_object(self, obj: object) -> list[object]:
        return [obj, self.other_obj] if self.rank == 0 else [self.other_obj, obj]


class Recorder(Collectives):
    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        self.sent = list(values)
        return list(values)


# --------------------------------------------------------------------------------------------------
# Units and normalisers
# --------------------------------------------------------------------------------------------------


def test_units_count_loss_tokens_or_nonempty_sequences() -> None:
    groups = [group(traj([1, 2], [3, 4]), traj([1], [5])), group(traj([1, 2], [6, 7, 3]))]
    (mb,) = make_micro_batches(flatten_groups(groups), 1, PAD)
    assert obj.units(mb, "token_mean") == 6.0
    assert obj.units(mb, "seq_mean") == obj.units(mb, "seq_sum_norm") == 3.0
    (dummy,) = make_micro_batches([], 1, PAD, filler=flatten_groups(groups)[0])
    assert obj.units(dummy, "token_mean") == obj.units(dummy, "seq_mean") == 0.0


def test_normaliser_weights_by_hand() -> None:
    # Micro-batch 0: sequences with 2 and 1 loss tokens; micro-batch 1: one with 3.
    plan = plan_of([group(traj([1, 2], [3, 4]), traj([1], [5]), traj([1, 2], [6, 7, 3]))], [2, 1])
    (mini,) = plan
    for w in mini:
        w.adv = w.mb.loss_mask.clone()
    for agg, expected in (("token_mean", [3 / 6, 3 / 6]), ("seq_mean", [2 / 3, 1 / 3])):
        counts = obj.StepCounts.of(plan, agg).all_reduce(Collectives())
        norms = obj.normalisers(counts, plan, max_response_len=0, comm=Collectives())
        assert [norms.policy_weight(0, w.mb, agg) for w in mini] == pytest.approx(expected)
        assert [norms.value_weight(0, w.mb) for w in mini] == pytest.approx([3 / 6, 3 / 6])
    # seq_sum_norm's constant: max_response_len when given, else the widest predicted length (4).
    assert obj.normalisers(counts, plan, 7, Collectives()).loss_norm == 7.0
    assert obj.normalisers(counts, plan, 0, Collectives()).loss_norm == 4.0


def test_step_counts_sum_field_by_field_across_ranks() -> None:
    """The counts of two ranks travel in one collective; each field comes back as its own sum."""
    mine = obj.StepCounts(
        units=[1.0, 2.0], loss_tokens=[3.0, 4.0], adv=Moments(5.0, 6.0, 7.0), tokens=8.0, sequences=9.0
    )
    other = obj.StepCounts(
        units=[10.0, 20.0],
        loss_tokens=[30.0, 40.0],
        adv=Moments(50.0, 60.0, 70.0),
        tokens=80.0,
        sequences=90.0,
        skipped_sequences=3.0,
        skipped_tokens=12.0,
    )
    rec = Recorder()
    other.all_reduce(rec)
    total = mine.all_reduce(TwoRanks(0, other_sums=rec.sent))
    assert total == obj.StepCounts(
        units=[11.0, 22.0],
        loss_tokens=[33.0, 44.0],
        adv=Moments(55.0, 66.0, 77.0),
        tokens=88.0,
        sequences=99.0,
        skipped_sequences=3.0,
        skipped_tokens=12.0,
    )


def test_skipped_sequences_count_as_units_loss_tokens_and_zero_advantages_by_hand() -> None:
    """A minibatch trained on one sequence (2 loss tokens, advantage 1) with two left out: one with 3
    loss tokens (2 once cut to 4 tokens), one with none (an empty reply counts no sequence unit)."""
    trained = [group(traj([1, 2], [3, 4]))]
    plan = plan_of(trained, [1])
    plan[0][0].adv = plan[0][0].mb.loss_mask.clone()
    left_out = flatten_groups([group(traj([1, 2], [5, 6, 7]), traj([1, 2, 3], []))])
    for agg, units, max_len in (("token_mean", 5.0, None), ("seq_mean", 2.0, None), ("token_mean", 4.0, 4)):
        counts = obj.StepCounts.of(plan, agg, [left_out], max_len)
        assert counts.units == [units], (agg, max_len)
        assert counts.loss_tokens == [units if agg == "token_mean" else 5.0]
        assert counts.adv == Moments(count=counts.loss_tokens[0], total=2.0, total_sq=2.0)
        assert (counts.sequences, counts.skipped_sequences) == (3.0, 2.0)
        assert counts.tokens == 4.0 and counts.skipped_tokens == (8.0 if max_len is None else 7.0)


# --------------------------------------------------------------------------------------------------
# The micro-step loss
# --------------------------------------------------------------------------------------------------


def bigram_logits(table: torch.Tensor, w: obj.Scored) -> torch.Tensor:
    """A differentiable stand-in for the model: logits [B, T, V] of column t = table[token start+t]."""
    mb = w.mb
    return table[mb.input_ids[:, mb.start : -1]]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "seq_sum_norm"])
def test_weighted_micro_steps_give_the_whole_batch_loss_and_gradient(agg: str) -> None:
    torch.manual_seed(0)
    table = torch.randn(VOCAB, VOCAB)
    groups = [
        group(traj([1, 2], [3, 4, 5], reward=1.0), traj([1, 2], [6], reward=0.0)),
        group(traj([3], [2, 2, 7, 1], reward=0.5), traj([3], [4, 4], reward=2.0)),
    ]
    a = algo(loss_agg=agg)
    results = []
    for micro in ([4], [1, 3], [2, 1, 1]):
        plan = plan_of(groups, micro)
        rewards = obj.shaped_rewards(flatten_groups(groups), plan, a, 0)
        seq_adv = obj.global_sequence_advantages(
            [len(g.trajectories) for g in groups], rewards, a, Collectives()
        )
        obj.assign_sequence_advantages(plan, seq_adv)
        counts = obj.StepCounts.of(plan, agg).all_reduce(Collectives())
        norms = obj.normalisers(counts, plan, max_response_len=6, comm=Collectives())
        leaf = table.clone().requires_grad_(True)
        step_loss = torch.zeros(())
        for w in plan[0]:
            weight = norms.policy_weight(0, w.mb, agg)
            total, _ = obj.micro_step_loss(
                bigram_logits(leaf, w), w, a, 1.0, norms.loss_norm, weight, StepMetrics()
            )
            step_loss = step_loss + weight * total
        step_loss.backward()
        results.append((float(step_loss.detach()), leaf.grad.clone()))
    for value, grad in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-5, atol=1e-7)
    assert results[0][1].abs().sum() > 0


def test_micro_step_loss_on_policy_by_hand() -> None:
    """On-policy, token_mean, advantage 1 everywhere: the loss is -1 (ratio 1, IS weight 1), and
    without proximal logprobs the forward's own logprobs become them."""
    (g,) = [group(traj([1], [2, 3]), traj([1], [4]))]
    plan = plan_of([g], [2])
    (w,) = plan[0]
    logits = torch.zeros(2, w.mb.loss_mask.shape[1], VOCAB)  # uniform: every logprob is -log 8
    w.mb.behavior_logprobs = torch.where(w.mb.loss_mask > 0, -math.log(VOCAB), 0.0)
    w.adv = w.mb.loss_mask.clone()
    m = StepMetrics()
    total, policy = obj.micro_step_loss(logits, w, algo(), 1.0, 0.0, 1.0, m)
    assert float(policy) == pytest.approx(-1.0) and float(total) == pytest.approx(-1.0)
    assert torch.allclose(w.prox[w.mb.loss_mask > 0], torch.full((3,), -math.log(VOCAB)))
    metrics = m.reduce(Collectives())
    assert metrics["mismatch/logprob_abs"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["entropy"] == pytest.approx(math.log(VOCAB))
    assert metrics["is_ratio/mean"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# Rewards and advantages
# --------------------------------------------------------------------------------------------------


def test_kl_reward_mode_subtracts_the_summed_kl_from_rewards() -> None:
    g = group(traj([1], [2, 3], reward=1.0), traj([1], [4], reward=0.0))
    refs = flatten_groups([g])
    plan = plan_of([g], [2])
    (w,) = plan[0]
    mask = w.mb.loss_mask  # row 0: 2 loss tokens, row 1: 1
    w.prox = torch.where(mask > 0, -1.0, 0.0)
    w.ref = torch.where(mask > 0, -1.5, 0.0)  # k1 = prox - ref = 0.5 per token
    kl_reward = algo(kl_coef=0.1, kl_mode="reward", kl_estimator="k1")
    assert obj.shaped_rewards(refs, plan, kl_reward, 0).tolist() == pytest.approx([1.0 - 0.1, 0.0 - 0.05])
    kl_loss = algo(kl_coef=0.1, kl_mode="loss", kl_estimator="k1")
    assert obj.shaped_rewards(refs, plan, kl_loss, 0).tolist() == [1.0, 0.0]


def test_gae_whitening_spans_micro_batches_by_hand() -> None:
    """gamma = lam = 1 and zero values: every token's advantage is its sequence's reward; rewards
    1 (2 tokens), 0 and 2 (1 token each) have mean 1 and unbiased variance 2/3 over the 4 tokens,
    although the last sequence sits in another micro-batch."""
    g = group(traj([1], [2, 3], reward=1.0), traj([1], [4], reward=0.0), traj([1], [5], reward=2.0))
    plan = plan_of([g], [2, 1])
    for w in plan[0]:
        w.old_values = torch.zeros_like(w.mb.loss_mask)
    a = algo(name="ppo", advantage="gae", gamma=1.0, lam=1.0, normalize_adv_std=True)
    rewards = obj.shaped_rewards(flatten_groups([g]), plan, a, 0)
    obj.assign_gae_advantages(plan, rewards, a, Collectives())
    s = 1 / math.sqrt(2 / 3 + 1e-8)
    first, second = plan[0]
    assert first.adv[first.mb.loss_mask > 0].tolist() == pytest.approx([0.0, 0.0, -s])
    assert second.adv[second.mb.loss_mask > 0].tolist() == pytest.approx([s])
    assert first.returns[first.mb.loss_mask > 0].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_whiten_with_the_batch_moments_equals_whitening_the_batch() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 5)
    mask = (torch.rand(3, 5) > 0.3).float()
    whole = whiten(x, mask)
    pieces = [
        whiten(x[:1], mask[:1], moments=Moments.of(x, mask)),
        whiten(x[1:], mask[1:], moments=Moments.of(x, mask)),
    ]
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-5, atol=1e-6)
    assert Moments.of(x[:1], mask[:1]) + Moments.of(x[1:], mask[1:]) == pytest.approx(Moments.of(x, mask))


def test_sequence_advantages_use_the_global_batch() -> None:
    """REINFORCE++ divides by the std of the whole batch: rank 1's advantages are its slice of the
    batch computed at once, not of its own groups alone."""
    a = algo(advantage="reinforce_pp")
    rank0 = [[0.0, 1.0], [1.0, 1.0]]
    rank1 = [[0.0, 3.0], [2.0, 0.0]]
    got = obj.global_sequence_advantages(
        [2, 2], torch.tensor([0.0, 3.0, 2.0, 0.0]), a, TwoRanks(1, other_obj=rank0)
    )
    whole = sequence_advantages(torch.tensor(rank0 + rank1), a)
    torch.testing.assert_close(got, whole[2:].flatten())
    alone = sequence_advantages(torch.tensor(rank1), a).flatten()
    assert not torch.allclose(got, alone)


def _segment(reward: float, episode: str, segment: int) -> Trajectory:
    t = make_trajectory([1, 2], [3, 4], reward=reward)
    t.episode_id, t.segment = episode, segment
    return t


def test_an_episode_split_into_segments_counts_once_in_its_group_baseline() -> None:
    """Group of three episodes with rewards 1, 0, 0; the first was split into two segments by a
    context limit. GRPO (dr_grpo: no std) per episode: mean 1/3, advantages 2/3, -1/3, -1/3; both
    segments of the first get 2/3. Counting the segments as episodes would give mean 1/2 (+1/2, -1/2)."""
    group = make_group(
        [_segment(1.0, "a", 0), _segment(1.0, "a", 1), _segment(0.0, "b", 0), _segment(0.0, "c", 0)]
    )
    refs = flatten_groups([group])
    rewards = torch.tensor([t.reward for t in group.trajectories])
    adv = obj.sequence_advantages_of_episodes(
        [group], refs, rewards, algo(advantage="dr_grpo"), Collectives()
    )
    torch.testing.assert_close(adv, torch.tensor([2 / 3, 2 / 3, -1 / 3, -1 / 3]))


def test_episode_rewards_take_the_base_once_and_every_segments_shaping() -> None:
    # Episode 0: segments 0 and 1, base 1.0, overlong penalties -0.25 and -0.5; episode 1: one
    # sequence, base 0.0, no shaping. -> 1.0 - 0.25 - 0.5 = 0.25 and 0.0.
    shaped = torch.tensor([0.75, 0.5, 0.0])
    base = torch.tensor([1.0, 1.0, 0.0])
    got = obj.episode_rewards(shaped, base, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(got, torch.tensor([0.25, 0.0]))


def test_sequences_without_an_episode_id_are_episodes_of_their_own() -> None:
    groups = [
        make_group([make_trajectory([1], [2]), make_trajectory([1], [3])]),
        make_group([_segment(0.0, "x", 0)]),
    ]
    sizes, owner = obj.episodes_of(groups)
    assert sizes == [2, 1] and owner.tolist() == [0, 1, 2]
