"""Advantage estimators against hand-computed values (trainer/advantages.py)."""

from __future__ import annotations

import pytest
import torch

from slime.core.config import AlgorithmConfig
from trainer.advantages import (
    Moments,
    broadcast_to_tokens,
    gae,
    overlong_shaping,
    sequence_advantages,
    whiten,
)

# Three groups of four: a 50/50 group, a single success worth 3, and a group without signal.
REWARDS = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0]])


def _cfg(**kw: object) -> AlgorithmConfig:
    return AlgorithmConfig(name="grpo", **kw)  # type: ignore[arg-type]


def _close(actual: torch.Tensor, expected: list, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_grpo_std_normalised() -> None:
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    # group 2: mean 0.75, deviations (-0.75 x3, 2.25), unbiased var 6.75 / 3 = 2.25, std 1.5
    # group 3: no variation -> 0 (not nan)
    adv = sequence_advantages(REWARDS, _cfg(advantage="grpo", normalize_adv_std=True))
    _close(
        adv,
        [
            [0.8660254, -0.8660254, 0.8660254, -0.8660254],
            [-0.5, -0.5, -0.5, 1.5],
            [0.0, 0.0, 0.0, 0.0],
        ],
    )


@pytest.mark.parametrize("cfg", [_cfg(advantage="grpo", normalize_adv_std=False), _cfg(advantage="dr_grpo")])
def test_mean_centred_only(cfg: AlgorithmConfig) -> None:
    adv = sequence_advantages(REWARDS, cfg)
    _close(adv, [[0.5, -0.5, 0.5, -0.5], [-0.75, -0.75, -0.75, 2.25], [0.0, 0.0, 0.0, 0.0]])


def test_dr_grpo_ignores_std_flag() -> None:
    adv = sequence_advantages(REWARDS, _cfg(advantage="dr_grpo", normalize_adv_std=True))
    _close(adv[1], [-0.75, -0.75, -0.75, 2.25])


def test_rloo_leave_one_out() -> None:
    # r_i - mean(others): group 2, the success: 3 - 0 = 3; a failure: 0 - (0 + 0 + 3) / 3 = -1.
    adv = sequence_advantages(REWARDS, _cfg(advantage="rloo"))
    _close(adv, [[2 / 3, -2 / 3, 2 / 3, -2 / 3], [-1.0, -1.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])


def test_reinforce_pp_batch_std() -> None:
    # Centred values: (+-0.5 x4), (-0.75 x3, 2.25), (0 x4); batch mean 0, sum of squares
    # 4 * 0.25 + 3 * 0.5625 + 5.0625 = 7.75, unbiased var 7.75 / 11, std 0.8393722.
    adv = sequence_advantages(REWARDS, _cfg(advantage="reinforce_pp"))
    a, b, c = 0.5956834, 0.8935251, 2.6805753  # 0.5, 0.75, 2.25 divided by 0.8393722
    _close(adv, [[a, -a, a, -a], [-b, -b, -b, c], [0.0, 0.0, 0.0, 0.0]])


def test_small_groups() -> None:
    # Two per group: mean 0.5, unbiased std sqrt(0.5) = 0.7071068 -> +-0.5 / 0.7071068 = +-0.7071068.
    adv = sequence_advantages(torch.tensor([[0.0, 1.0]]), _cfg(advantage="grpo", normalize_adv_std=True))
    _close(adv, [[-0.7071068, 0.7071068]])
    # One per group: no baseline, no variance -> 0 (not nan), for the group and the batch statistics.
    single = torch.tensor([[3.0], [5.0]])
    _close(sequence_advantages(single, _cfg(advantage="grpo")), [[0.0], [0.0]])
    _close(sequence_advantages(single[:1], _cfg(advantage="reinforce_pp")), [[0.0]])
    with pytest.raises(ValueError, match="rloo needs at least 2 trajectories per group"):
        sequence_advantages(single, _cfg(advantage="rloo"))
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        sequence_advantages(single, _cfg(advantage="ppo"))


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_a_group_of_equal_rewards_gets_exactly_zero(estimator: str) -> None:
    """0.1 or 0.9 seven times has a float32 mean an ulp off the value; GRPO's division by (std ~ 1 ulp
    + eps) turned that into a systematic advantage of about +-0.06 for every trajectory of a group that
    carries no signal. Exactly 0 now, for every estimator, next to a group with signal (which the
    trainer then trains alone)."""
    rewards = torch.tensor([[0.1] * 7, [0.9] * 7, [0.0, 1.0, 0.5, 0.2, 0.3, 0.4, 0.6]])
    assert (rewards[:2] - rewards[:2].mean(dim=1, keepdim=True)).ne(0).all()  # the rounding guarded against
    adv = sequence_advantages(rewards, _cfg(advantage=estimator, normalize_adv_std=True))
    assert adv[:2].eq(0).all(), adv
    assert adv[2].ne(0).all()


def test_gae_advantage_is_not_sequence_level() -> None:
    with pytest.raises(ValueError, match="gae"):
        sequence_advantages(REWARDS, _cfg(advantage="gae"))
    with pytest.raises(ValueError):
        sequence_advantages(REWARDS[0], _cfg())


def test_overlong_shaping() -> None:
    # max_len 10, buffer 4: ramp from 6 (0) to 10 (-p), -p beyond.
    lengths = torch.tensor([5, 6, 7, 9, 10, 12])
    _close(overlong_shaping(lengths, 10, 4, 1.0), [0.0, 0.0, -0.25, -0.75, -1.0, -1.0])
    _close(overlong_shaping(lengths, 10, 4, 2.0), [0.0, 0.0, -0.5, -1.5, -2.0, -2.0])
    # buffer 0: only beyond the limit.
    _close(overlong_shaping(torch.tensor([10, 11]), 10, 0, 1.0), [0.0, -1.0])


# Row 0: generated, generated, ENV token, generated, padding. Row 1: three generated tokens, padding.
GAE_MASK = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
GAE_REWARDS = torch.tensor([[0.0, 0.0, 5.0, 1.0, 7.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
GAE_VALUES = torch.tensor([[0.5, 0.2, 9.0, 0.4, 3.0], [0.1, 0.2, 0.3, 0.0, 0.0]])


def test_gae_hand_unrolled_with_env_token() -> None:
    # Row 0, gamma 0.9, lambda 0.8 (gamma * lambda = 0.72); actions at t = 0, 1, 3; t = 2 is skipped:
    #   t=3: delta = 1 + 0.9 * 0 - 0.4 = 0.6                    A = 0.6
    #   t=1: delta = 0 + 0.9 * V[3] - 0.2 = 0.36 - 0.2 = 0.16   A = 0.16 + 0.72 * 0.6 = 0.592
    #   t=0: delta = 0 + 0.9 * V[1] - 0.5 = -0.32               A = -0.32 + 0.72 * 0.592 = 0.10624
    #   returns = A + V = 0.60624, 0.792, -, 1.0
    # The env token's reward 5 and value 9 and the padding's 7 and 3 are ignored.
    adv, ret = gae(GAE_REWARDS[:1], GAE_VALUES[:1], GAE_MASK[:1], gamma=0.9, lam=0.8)
    _close(adv, [[0.10624, 0.592, 0.0, 0.6, 0.0]])
    _close(ret, [[0.60624, 0.792, 0.0, 1.0, 0.0]])


def test_gae_monte_carlo_limit() -> None:
    # gamma = lambda = 1: A_t = (sum of future rewards) - V_t = 1 - V_t; returns = 1.
    adv, ret = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, gamma=1.0, lam=1.0)
    _close(adv[1], [0.9, 0.8, 0.7, 0.0, 0.0])
    _close(ret[1], [1.0, 1.0, 1.0, 0.0, 0.0])
    _close(adv[0], [0.5, 0.8, 0.0, 0.6, 0.0])  # row 0: reward 1 at t=3 only


def test_gae_ignores_masked_values() -> None:
    noisy_r, noisy_v = GAE_REWARDS.clone(), GAE_VALUES.clone()
    noisy_r[GAE_MASK == 0] = float("nan")
    noisy_v[GAE_MASK == 0] = float("inf")
    a0, r0 = gae(GAE_REWARDS, GAE_VALUES, GAE_MASK, 0.9, 0.8)
    a1, r1 = gae(noisy_r, noisy_v, GAE_MASK, 0.9, 0.8)
    torch.testing.assert_close(a0, a1)
    torch.testing.assert_close(r0, r1)


def test_broadcast_to_tokens() -> None:
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    _close(broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask), [[2.0, 0.0, 2.0], [0.0, -1.0, 0.0]])
    # Low precision goes to float32, float64 stays.
    assert broadcast_to_tokens(torch.tensor([2.0, -1.0]).bfloat16(), mask).dtype == torch.float32
    assert broadcast_to_tokens(torch.tensor([2.0, -1.0]).double(), mask).dtype == torch.float64
    with pytest.raises(ValueError, match=r"seq_adv must be \[B\]=2, got \(3,\)"):
        broadcast_to_tokens(torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"seq_adv must be \[B\]=2, got \(2, 1\)"):
        broadcast_to_tokens(torch.zeros(2, 1), mask)


def test_whiten() -> None:
    # Masked entries 1, 3, 5: mean 3, unbiased var (4 + 0 + 4) / 2 = 4, std 2; padding (100) ignored.
    x = torch.tensor([[1.0, 3.0], [5.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    _close(whiten(x, mask), [[-1.0, 0.0], [1.0, 0.0]])
    # Scale only: (x - 3) / 2 + 3.
    _close(whiten(x, mask, shift_mean=False), [[2.0, 3.0], [4.0, 0.0]])
    # float64 stays float64.
    assert whiten(x.double(), mask).dtype == torch.float64


def test_whiten_small_counts() -> None:
    # Two entries 2, 6: mean 4, unbiased var 8 (n - 1 = 1), so +-2 / sqrt(8) = +-0.7071068.
    _close(whiten(torch.tensor([[2.0, 6.0]]), torch.ones(1, 2)), [[-0.7071068, 0.7071068]])
    # One entry: variance 0, so it maps to 0 (not inf); scale-only keeps the value itself.
    one, ones = torch.tensor([[4.0, 9.0]]), torch.tensor([[1.0, 0.0]])
    _close(whiten(one, ones), [[0.0, 0.0]])
    _close(whiten(one, ones, shift_mean=False), [[4.0, 0.0]])
    # Nothing masked in: all zeros.
    _close(whiten(one, torch.zeros(1, 2), shift_mean=False), [[0.0, 0.0]])


def test_whiten_with_given_moments() -> None:
    # The statistics of another batch (2, 4, 6: mean 4, var 4) are used instead of x's own.
    moments = Moments.of(torch.tensor([[2.0, 4.0, 6.0, 50.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert (moments.count, moments.total, moments.total_sq) == (3.0, 12.0, 56.0)
    assert (moments.mean, moments.var) == (4.0, 4.0)
    _close(whiten(torch.tensor([[8.0, 0.0]]), torch.ones(1, 2), moments=moments), [[2.0, -2.0]])
    _close(whiten(torch.tensor([[8.0]]), torch.ones(1, 1), shift_mean=False, moments=moments), [[6.0]])


def test_moments_add_up_and_handle_small_counts() -> None:
    a = Moments(count=2.0, total=3.0, total_sq=5.0)  # entries 1, 2
    b = Moments(count=1.0, total=3.0, total_sq=9.0)  # entry 3
    both = a + b
    assert (both.count, both.total, both.total_sq) == (3.0, 6.0, 14.0)
    assert (both.mean, both.var) == (2.0, 1.0)  # (14 - 3 * 4) / 2
    assert (b.mean, b.var) == (3.0, 0.0)  # one entry: no variance
    assert (Moments().mean, Moments().var) == (0.0, 0.0)
    # Rounding can make sum_sq - n * mean^2 slightly negative for constant data: clamped to 0.
    assert Moments(count=3.0, total=3.0, total_sq=2.9999999).var == 0.0


def test_algorithm_yaml_files_map_onto_the_schema() -> None:
    # configs/algorithm/*.yaml: a one-line paper comment, `name` = file name, only AlgorithmConfig keys
    # with valid choices (a structured merge rejects unknown keys and wrong types).
    from pathlib import Path

    from omegaconf import OmegaConf

    from slime.core.config import CHOICES

    folder = Path(__file__).resolve().parents[1] / "configs" / "algorithm"
    files = sorted(folder.glob("*.yaml"))
    assert {f.stem for f in files} >= {"grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"}
    for path in files:
        assert path.read_text().startswith("# "), path
        node = OmegaConf.merge(OmegaConf.structured(AlgorithmConfig), OmegaConf.load(path))
        cfg = OmegaConf.to_object(node)
        assert isinstance(cfg, AlgorithmConfig) and cfg.name == path.stem
        for key, allowed in CHOICES.items():
            if key.startswith("algorithm."):
                value = cfg
                for part in key.split(".")[1:]:  # nested sections too (algorithm.staleness.level)
                    value = getattr(value, part)
                assert value in allowed, (path.name, key)
