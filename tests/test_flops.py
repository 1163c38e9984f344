"""Model FLOPs and MFU (trainer/flops.py): counts by hand, the peak probe, `perf/mfu` of a step."""

from __future__ import annotations

import random
import time

import pytest
import torch
from conftest import make_group, make_trajectory

from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
from trainer import packing
from trainer.flops import ModelFlops, forward_flops, measure_peak_flops, model_flops, packed_flops

MODEL_CFG = ModelConfig(name="tiny", source="random", dtype="float32")


def test_model_flops_of_the_tiny_models(tiny_dense_dir: str, tiny_moe_dir: str) -> None:
    from trainer.build import load_causal_lm

    # tiny_dense: hidden 64, 2 layers, 2 heads x 32, 1 KV head, MLP 128, vocab 49152, tied head.
    # Per layer: q 64x64 + k 32x64 + v 32x64 + o 64x64 = 12288, MLP 3 x 64 x 128 = 24576, 2 norms
    # of 64: 36992; 2 layers + final norm 64 = 74048. Head 49152 x 64.
    dense = model_flops(load_causal_lm(tiny_dense_dir, MODEL_CFG))
    assert dense == ModelFlops(body_params=74048, head_params=3145728, layers=2, attn_width=64)
    # tiny_moe (Qwen3-MoE): attention 12288 + q/k norms 2 x 32; 8 experts (gate_up 128x64, down
    # 64x64 each = 12288), top 2 -> 2 x 12288 = 24576 active; router 8x64; 2 norms of 64:
    # 37568 per layer; 2 layers + final norm = 75200. Untied head 49152 x 64.
    moe = model_flops(load_causal_lm(tiny_moe_dir, MODEL_CFG))
    assert moe == ModelFlops(body_params=75200, head_params=3145728, layers=2, attn_width=64)


def test_forward_flops_by_hand() -> None:
    m = ModelFlops(body_params=10, head_params=100, layers=2, attn_width=4)
    # Rows of 3 and 5 tokens, logits from position 1: body 8 tokens, logits 1 + 3, causal pairs
    # 6 + 15: 2*10*8 + 2*100*4 + 4*2*4*21.
    assert forward_flops(m, [3, 5], start=1, prefix=0) == 160 + 800 + 672
    # A shared prefix of 2 runs once: body 8 - 2; logits 0 + 2 plus the prefix forward's one;
    # pairs: prefix 3, then (6 - 3) + (15 - 3) for the rows' own queries.
    assert forward_flops(m, [3, 5], start=2, prefix=2) == 2 * 10 * 6 + 2 * 100 * 3 + 4 * 2 * 4 * 18
    # Packed as a prefix tree, the same rows sharing their first 2 tokens: body 2 + 1 + 3 = 6 tokens,
    # logits of the kept positions (1 of row 0, 1..3 of row 1: 4, position 1 shared but kept per
    # row), pairs 3 (the shared node) + (1 + 2) + (6 + 3 x 2).
    rows = torch.tensor([[7, 8, 9, 0, 0], [7, 8, 4, 5, 6]])
    pk = packing.pack(rows, torch.tensor([3, 5]), start=1, share=True)
    assert pk.input_ids.shape[1] == 6 and pk.attention_pairs == 3 + 3 + 12
    assert packed_flops(m, pk) == 2 * 10 * 6 + 2 * 100 * 4 + 4 * 2 * 4 * 18
    # Per trained token: 6 x (10 + 100) + 12 x 2 x 4 x (9 + 1) / 2.
    assert m.train_flops_per_token(9) == 660 + 480


def test_peak_probe_is_short_and_plausible() -> None:
    t0 = time.perf_counter()
    peak = measure_peak_flops(torch.float32, torch.device("cpu"), budget_s=0.2)
    assert time.perf_counter() - t0 < 5.0  # a few 1024^3 matmuls, even on a busy machine
    # One 1024 x 1024 matmul timed here cannot beat the probe's best by much.
    a = torch.randn(1024, 1024)
    t0 = time.perf_counter()
    torch.mm(a, a)
    once = 2 * 1024**3 / (time.perf_counter() - t0)
    assert 1e8 < peak < 1e15 and once < 1.5 * peak


@pytest.mark.parametrize("pack", [True, False])
def test_step_mfu_counts_every_forward(pack: bool, tiny_dense_dir: str, in_process_trainer) -> None:
    """`perf/mfu` = the FLOPs of the step's forwards (training 3x, proximal and reference 1x each,
    real tokens only, the shared prefix once) / (step seconds x measured peak)."""
    from trainer.batching import flatten_groups
    from trainer.rank import TrainerRank, TrainerSpec

    tcfg = TrainerConfig(steps=1, lr=0.0, micro_batch_size=3, dtype="float32", threads_per_rank=1, pack=pack)
    # Two minibatches: proximal logprobs are scored first; kl_coef > 0: a reference forward too.
    algo = AlgorithmConfig(name="grpo", kl_coef=0.1, num_minibatches=2)
    w = TrainerRank(TrainerSpec(tiny_dense_dir, MODEL_CFG, tcfg, algo, seed=0))
    w.setup()
    rng = random.Random(1)
    prompt = [rng.randrange(100, 4000) for _ in range(9)]
    trajs = [make_trajectory(prompt, [rng.randrange(100, 4000) for _ in range(n)]) for n in (3, 40, 8, 17)]
    groups = [make_group(trajs)]
    try:
        metrics = w.train_step(groups, version=0)
        assert w.forward.pack == pack
        # The same plan again (same step counter: lr 0, the minibatch shuffle is seeded by the step).
        w.step -= 1
        plan, _ = w._plan_micro_batches(flatten_groups(groups), set())
        expected = 0.0
        for mb in (w_.mb for mini in plan for w_ in mini):
            if mb.dummy:
                continue
            if pack and mb.input_ids.shape[0] >= 2:  # a prefix tree: the whole prompt once
                once = packed_flops(
                    w.model_flops, pk := packing.pack(mb.input_ids, mb.lengths, mb.start, share=True)
                )
                assert pk.shared_tokens >= mb.shared_prefix * (mb.input_ids.shape[0] - 1)
            else:
                p = mb.shared_prefix if mb.input_ids.shape[0] >= 2 else 0
                once = forward_flops(w.model_flops, mb.lengths.tolist(), mb.start, p)
            expected += (3 + 1 + 1) * once
        assert w.forward.flops_done == pytest.approx(expected, rel=1e-12)
        mfu = expected / (metrics["time/train_s"] * w.peak_flops)
        assert metrics["perf/mfu"] == pytest.approx(mfu, rel=1e-9) and 0 < metrics["perf/mfu"] < 1
    finally:
        w.close()
