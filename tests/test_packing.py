"""Packed forwards (trainer/packing.py, trainer/forward.py): no padding, the same numbers.

- The layout by hand: packed ids, positions, sequence bounds, kept columns, and the maps back.
- Segment attention equals attention with an explicit per-sequence causal mask (GQA, with and
  without a cached prefix).
- On the tiny random Llama and the tiny Qwen3-MoE (fp32), rows of very different lengths: packed
  and padded forwards give the same per-token logprobs, micro-step loss and every parameter's
  gradient, with and without the shared prefix; MoE routing replay and router statistics too.
- No leak: changing one sequence's tokens leaves the other sequences' logprobs as they were, and
  the start-up probe catches a model whose attention ignores the packing.
- The trainer step (DeepSpeed, one rank): packed and padded give the same loss and gradient norm.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import make_group, make_trajectory

from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
from trainer.packing import balance_tokens, pack, segment_attention

MODEL_CFG = ModelConfig(name="tiny", source="random", dtype="float32")


# --------------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------------


def test_pack_layout_by_hand() -> None:
    ids = torch.arange(1, 31).view(3, 10)  # row r holds 10r+1 .. 10r+10
    pk = pack(ids, torch.tensor([4, 10, 7]), first=0, start=2)
    assert pk.input_ids.tolist() == [[1, 2, 3, 4, *range(11, 21), *range(21, 28)]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, *range(10), *range(7)]]
    assert pk.cu_seqlens.tolist() == [0, 4, 14, 21]
    # Kept positions start..n-2 of each row: row 0: 2; row 1: 2..8; row 2: 2..5.
    assert pk.keep.tolist() == [2, *range(6, 13), *range(16, 20)]
    assert pk.keep_rows.tolist() == [0] + [1] * 7 + [2] * 4
    assert pk.keep_cols.tolist() == [0, *range(7), *range(4)]
    assert pk.rows_shape == (3, 7)

    # Round trips: [B, T] -> packed -> [B, T] (zeros where no row keeps a column), [B, L] tokens.
    cols = torch.arange(21, dtype=torch.float32).view(3, 7)
    back = pk.to_rows(pk.kept(cols))
    kept = torch.zeros(3, 7, dtype=torch.bool)
    kept[0, :1], kept[1, :7], kept[2, :4] = True, True, True
    assert torch.equal(back, torch.where(kept, cols, 0.0))
    assert torch.equal(pk.tokens(ids), pk.input_ids)
    into = torch.zeros_like(ids)
    pk.put_tokens(pk.tokens(ids), into)
    real = torch.arange(10) < torch.tensor([4, 10, 7])[:, None]
    assert torch.equal(into, torch.where(real, ids, 0))


def test_pack_after_a_shared_prefix() -> None:
    ids = torch.arange(1, 31).view(3, 10)
    pk = pack(ids, torch.tensor([4, 10, 7]), first=3, start=3)
    assert pk.input_ids.tolist() == [[4, *range(14, 21), *range(24, 28)]]
    assert pk.position_ids.tolist() == [[3, *range(3, 10), *range(3, 7)]]
    assert pk.cu_seqlens.tolist() == [0, 1, 8, 12]
    assert pk.keep.tolist() == [*range(1, 7), *range(8, 11)]  # row 0 (4 tokens) keeps nothing
    with pytest.raises(ValueError, match="before the packed"):
        pack(ids, torch.tensor([4, 10, 7]), first=3, start=2)


def test_prefix_tree_layout_by_hand() -> None:
    """Rows sharing a system prompt, two of them a question too, one reply the prefix of another's,
    one row a duplicate: every token the rows share is packed once, above what continues it."""
    rows = [
        [1, 2, 3, 4],  # system [1, 2], question [3], reply [4]
        [1, 2, 3, 5, 6],  # the same question, reply [5, 6]
        [1, 2, 7],  # another question
        [1, 2, 3, 4],  # row 0 again
        [1, 2, 3, 5, 6, 8],  # row 1 continued
    ]
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.tensor([r + [0] * (6 - len(r)) for r in rows])
    pk = pack(ids, lengths, start=1, share=True)
    # Depth first, rows in order: [1, 2] | [3] | [4] | [5, 6] | [8] | [7]
    assert pk.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 8, 7]]
    assert pk.position_ids.tolist() == [[0, 1, 2, 3, 3, 4, 5, 2]]
    assert pk.cu_seqlens.tolist() == [0, 2, 3, 4, 6, 7, 8]
    context = [None if c is None else c.tolist() for c in pk.context]
    assert context == [None, [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2, 4, 5], [0, 1]]
    assert pk.shared_tokens == int(lengths.sum()) - 8
    assert pk.index.tolist() == [
        [0, 1, 2, 3, -1, -1],
        [0, 1, 2, 4, 5, -1],
        [0, 1, 7, -1, -1, -1],
        [0, 1, 2, 3, -1, -1],
        [0, 1, 2, 4, 5, 6],
    ]
    # Kept positions 1..n-2 of every row, shared ones once per row.
    assert pk.keep.tolist() == [1, 2, 1, 2, 4, 1, 1, 2, 1, 2, 4, 5]
    assert pk.keep_rows.tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 4, 4, 4, 4]
    # Pairs: [1, 2] 3; [3] 1 + 2; [4] 1 + 3; [5, 6] 3 + 2 x 3; [8] 1 + 5; [7] 1 + 2.
    assert pk.attention_pairs == 3 + 3 + 4 + 9 + 6 + 3
    # Values of the packed tokens go back to every place they stand for.
    into = torch.zeros_like(ids)
    pk.put_tokens(pk.tokens(ids), into)
    assert torch.equal(into, torch.where(pk.index >= 0, ids, 0))
    # Without sharing: each row its own segment, as in the flat layout.
    flat = pack(ids, lengths, start=1)
    assert flat.cu_seqlens.tolist() == [0, 4, 9, 12, 16, 22] and flat.shared_tokens == 0
    assert all(c is None for c in flat.context)


def test_to_rows_carries_the_gradient() -> None:
    pk = pack(torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3]), first=0, start=0)
    values = torch.randn(1, len(pk.keep), 3, requires_grad=True)
    weights = torch.randn(2, 4, 3)
    (pk.to_rows(values) * weights).sum().backward()
    assert torch.equal(values.grad[0], weights[pk.keep_rows, pk.keep_cols])


def test_balance_tokens_keeps_families_together() -> None:
    # Families 0 and 2 share a 10-token prompt, item 1 is alone; 2 bins of at most 3 items. Costs:
    # family 1: 30; family 0: 10 + 3 + 2 + 1 = 16; family 2: 10 + 4 + 2 = 16 (a tie, broken by the
    # index of each family's longest item: 3 before 4). Item 1 onto bin 0, family 0 onto bin 1
    # (now full), family 2 onto bin 0.
    lengths = [12, 30, 11, 13, 14, 12]
    assert balance_tokens(lengths, 2, [0, 1, 0, 0, 2, 2], shared=[10, 0, 10]) == [[1, 4, 5], [0, 2, 3]]
    # A family larger than a bin splits, the rest going on to the next lightest bin.
    assert balance_tokens([5] * 5, 2, [0] * 5, shared=[4]) == [[0, 1, 2], [3, 4]]
    # One family per item: the plain assignment.
    assert balance_tokens([5, 100, 3], 2, [0, 1, 2], shared=[0, 0, 0]) == balance_tokens([5, 100, 3], 2)


def test_micro_batches_keep_a_prompt_together_when_sharing() -> None:
    from trainer.batching import flatten_groups, make_micro_batches

    replies = {1: (3, 30, 5, 9), 2: (40, 2, 2, 2)}
    groups = [
        make_group([make_trajectory([g] * 20, [7] * n) for n in replies[g]], task_id=str(g)) for g in (1, 2)
    ]
    refs = flatten_groups(groups)
    plain = make_micro_batches(refs, 2, pad_id=0, by_tokens=True)
    shared = make_micro_batches(refs, 2, pad_id=0, by_tokens=True, share=True)
    assert sorted(sorted(mb.seq_index.tolist()) for mb in shared) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(mb.shared_prefix == 19 for mb in shared)  # the prompt up to the first kept column
    assert any(mb.shared_prefix == 0 for mb in plain)  # balanced by tokens, the groups mixed


def test_balance_tokens_by_hand() -> None:
    # Longest first onto the lightest bin, at most ceil(6 / 2) = 3 items per bin.
    assert balance_tokens([5, 100, 3, 50, 50, 8], 2) == [[1, 2, 5], [0, 3, 4]]
    # Capacity binds: 4 short items cannot all join the bin without the long one.
    assert balance_tokens([100, 1, 1, 1], 2) == [[0, 3], [1, 2]]
    assert balance_tokens([7], 3) == [[0], [], []]
    with pytest.raises(ValueError):
        balance_tokens([1], 0)


def test_micro_batches_by_tokens_balance_the_tokens() -> None:
    from trainer.batching import flatten_groups, make_micro_batches

    lengths = [300, 20, 20, 20, 280, 20, 30, 10]
    trajs = [make_trajectory([5] * 4, [7] * (n - 4)) for n in lengths]
    refs = flatten_groups([make_group(trajs)])
    by_count = make_micro_batches(refs, 2, pad_id=0)
    by_tokens = make_micro_batches(refs, 2, pad_id=0, by_tokens=True)
    assert sorted(mb.num_tokens for mb in by_count) == [70, 630]  # sorted by length, then halved
    assert sorted(mb.num_tokens for mb in by_tokens) == [350, 350]
    assert sorted(int(i) for mb in by_tokens for i in mb.seq_index) == list(range(8))


# --------------------------------------------------------------------------------------------------
# Segment attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 5])
def test_segment_attention_equals_a_masked_attention(prefix: int) -> None:
    """sdpa per sequence == one attention over the pack with the block-diagonal causal mask (plus
    the prefix columns), grouped-query heads included."""
    gen = torch.Generator().manual_seed(0)
    lens = [3, 9, 1, 6]
    n = sum(lens)
    q = torch.randn(1, 4, n, 8, generator=gen)
    k = torch.randn(1, 2, prefix + n, 8, generator=gen)
    v = torch.randn(1, 2, prefix + n, 8, generator=gen)
    cu = torch.tensor([0, 3, 12, 13, 19])
    module = torch.nn.Module()
    out, _ = segment_attention(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu)  # [1, N, Hq, D]

    seg = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))
    pos = torch.arange(n)
    inner = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])  # [N, N]
    mask = torch.cat([torch.ones(n, prefix, dtype=torch.bool), inner], dim=1)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ kk.transpose(-1, -2)) * 0.3
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vv  # [1, Hq, N, D]
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Packed == padded on tiny models
# --------------------------------------------------------------------------------------------------


def _model(model_dir: str):
    from trainer.build import load_causal_lm
    from trainer.packing import use_segment_attention

    torch.manual_seed(0)
    model = load_causal_lm(model_dir, MODEL_CFG)
    assert use_segment_attention(model)
    return model


def _micro_batch(shared: int, replies: list[int], seed: int = 0, routes_of=None):
    """One micro-batch of rows sharing `shared` leading tokens, then a 3-token question of their own
    and replies of `replies` tokens (loss on the replies). With `routes_of` (an MoE model), every
    row carries that model's own routes."""
    from trainer.batching import flatten_groups, make_micro_batches

    rng = random.Random(seed)
    system = [rng.randrange(100, 4000) for _ in range(shared)]
    trajs = []
    for i, n in enumerate(replies):
        prompt = system + [rng.randrange(100, 4000) for _ in range(3)]
        reply = [rng.randrange(100, 4000) for _ in range(n)]
        t = make_trajectory(prompt, reply, reward=float(i % 2), task_id=str(i))
        if routes_of is not None:
            from test_moe_trainer import own_routes

            t.routed_experts = own_routes(routes_of, t.token_ids)
        trajs.append(t)
    return make_micro_batches(flatten_groups([make_group(trajs)]), 1, pad_id=0)[0]


def _grads(model, forward, mb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logprobs [B, T] and every parameter's gradient of a weighted sum of the loss columns."""
    model.zero_grad()
    lp = forward.logprobs(model, mb)
    weights = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp) * mb.loss_mask
    (lp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), grads


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_packed_matches_padded(name: str, share: bool, tiny_dense_dir: str, tiny_moe_dir: str) -> None:
    from trainer.forward import Forward
    from trainer.objective import Scored, micro_step_loss
    from trainer.step_metrics import StepMetrics

    model = _model(tiny_dense_dir if name == "dense" else tiny_moe_dir)
    mb = _micro_batch(shared=12, replies=[1, 4, 60, 130, 7])
    assert mb.shared_prefix >= 12 and mb.input_ids.shape[1] > 140
    forwards = {p: Forward(share_prefix=share, pack=p) for p in (True, False)}
    (lp_pack, g_pack), (lp_pad, g_pad) = (_grads(model, forwards[p], mb) for p in (True, False))
    assert forwards[True].packed_forwards == 1 and forwards[False].packed_forwards == 0
    assert forwards[True].shared_prefix_forwards == int(share)
    real = mb.loss_mask > 0
    torch.testing.assert_close(lp_pack[real], lp_pad[real], rtol=0, atol=2e-6)
    assert set(g_pack) == set(g_pad) and any(g.abs().sum() > 0 for g in g_pad.values())
    for n in g_pad:
        # Summation order only (float32): within 1e-5 of the tensor's largest entry.
        assert (g_pack[n] - g_pad[n]).abs().max() <= 1e-5 * g_pad[n].abs().max() + 1e-9, n

    # The micro-step loss (policy loss, entropy bonus) from packed logits equals the padded one.
    algo = AlgorithmConfig(name="grpo", entropy_coef=0.01)
    losses = []
    for p in (True, False):
        w = Scored(mb=mb, adv=torch.linspace(-1, 1, mb.loss_mask.numel()).view_as(mb.loss_mask))
        logits, layout = forwards[p].kept_logits(model, mb)
        total, _ = micro_step_loss(logits, w, algo, 1.0, 0.0, 1.0, StepMetrics(), layout)
        losses.append(float(total.detach()))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_prefix_tree_matches_padded(name: str, tiny_dense_dir: str, tiny_moe_dir: str) -> None:
    """Two groups under one system prompt, a reply repeated and a reply that is the start of another:
    the prefix-tree forward (each shared token once) gives the padded forward's logprobs and
    gradients, with fewer tokens through the model."""
    from trainer.batching import flatten_groups, make_micro_batches
    from trainer.forward import Forward

    model = _model(tiny_dense_dir if name == "dense" else tiny_moe_dir)
    rng = random.Random(3)
    system = [rng.randrange(100, 4000) for _ in range(9)]
    groups = []
    for g in range(2):
        prompt = system + [rng.randrange(100, 4000) for _ in range(4 + g)]
        replies = [[rng.randrange(100, 4000) for _ in range(n)] for n in (6, 25, 3)]
        replies += [replies[0], replies[1] + [rng.randrange(100, 4000) for _ in range(5)]]
        trajs = [
            make_trajectory(prompt, r, reward=float(i % 2), task_id=str(g)) for i, r in enumerate(replies)
        ]
        groups.append(make_group(trajs, task_id=str(g)))
    mb = make_micro_batches(flatten_groups(groups), 1, pad_id=0)[0]
    tree, padded = Forward(share_prefix=True, pack=True), Forward(share_prefix=False, pack=False)
    (lp_tree, g_tree), (lp_pad, g_pad) = _grads(model, tree, mb), _grads(model, padded, mb)
    assert tree.packed_forwards == 1 and tree.shared_prefix_forwards == 1
    real = mb.loss_mask > 0
    torch.testing.assert_close(lp_tree[real], lp_pad[real], rtol=0, atol=2e-6)
    assert set(g_tree) == set(g_pad)
    for n in g_pad:
        assert (g_tree[n] - g_pad[n]).abs().max() <= 1e-5 * g_pad[n].abs().max() + 1e-9, n
    # Shared: the system prompt once, each group's question once, the repeated replies once.
    pk = pack(mb.input_ids, mb.lengths, mb.start, share=True)
    # 10 rows: the system prompt saves 9 x 9; questions 4 x 4 and 5 x 4; replies (6 + 25) x 2.
    assert pk.shared_tokens == 9 * 9 + 4 * 4 + 5 * 4 + 2 * (6 + 25)


@pytest.mark.parametrize("mode", ["rollout", "old"])
def test_packed_moe_routing_matches_padded(mode: str, tiny_moe_dir: str) -> None:
    """Routing replay and router statistics see the same tokens packed as padded: replaying the
    engine's routes (here the router's own, one row's flipped) and recording the old-policy routes."""
    from test_moe_trainer import flip_routes

    from trainer.forward import Forward
    from trainer.process import Collectives
    from trainer.routing import Routing

    model = _model(tiny_moe_dir)
    mb = _micro_batch(shared=6, replies=[2, 40, 9], routes_of=model)
    flipped = flip_routes(_routes(mb, 1), 8, 1.0, seed=1)  # the engine disagreed on row 1
    mb.routes[1, : flipped.ids.shape[0]] = torch.from_numpy(flipped.ids.astype("int64"))
    mbs = {p: copy.deepcopy(mb) for p in (True, False)}
    routing = Routing.install(model, mode)
    try:
        stats, lps = {}, {}
        for p, mb in mbs.items():
            forward = Forward(share_prefix=True, pack=p)
            with torch.no_grad():
                lps[p] = forward.logprobs(model, mb, routing, measure=True)  # measured (old: records)
                if mode == "old":
                    lps[p] = forward.logprobs(model, mb, routing)  # replays the recorded routes
            stats[p] = routing.reduce_metrics(Collectives())
    finally:
        routing.remove()
    real = mbs[True].loss_mask > 0
    torch.testing.assert_close(lps[True][real], lps[False][real], rtol=0, atol=2e-6)
    assert stats[True].keys() == stats[False].keys() and "moe/routing_mismatch" in stats[True]
    for k in stats[False]:
        assert stats[True][k] == pytest.approx(stats[False][k], rel=1e-5, abs=1e-7), k
    if mode == "rollout":
        assert stats[True]["moe/routing_mismatch_used"] == 0.0 and stats[True]["moe/routing_mismatch"] > 0
    else:
        on = mbs[False].attention_mask.bool()
        assert torch.equal(mbs[True].old_routes[on], mbs[False].old_routes[on])


def _routes(mb, row: int):
    from slime.core.types import RoutedExperts

    n = int(mb.lengths[row])
    ids = mb.routes[row, :n].numpy().astype("uint8")
    return RoutedExperts(ids, mb.routes_valid[row, :n].numpy(), list(mb.route_layers))


# --------------------------------------------------------------------------------------------------
# No leak across packed sequences
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_packed_sequences_do_not_see_each_other(
    name: str, share: bool, tiny_dense_dir: str, tiny_moe_dir: str
) -> None:
    from trainer.forward import Forward

    model = _model(tiny_dense_dir if name == "dense" else tiny_moe_dir)
    forward = Forward(share_prefix=share, pack=True)
    mb = _micro_batch(shared=8, replies=[20, 5, 33])
    changed = _micro_batch(shared=8, replies=[20, 5, 33])
    n = int(mb.lengths[1])
    gen = torch.Generator().manual_seed(1)
    changed.input_ids[1, mb.shared_prefix : n] = torch.randint(
        100, 4000, (n - mb.shared_prefix,), generator=gen
    )
    with torch.no_grad():
        before, after = forward.logprobs(model, mb), forward.logprobs(model, changed)
    assert forward.packed_forwards == 2
    real = mb.loss_mask > 0
    others = real.clone()
    others[1] = False
    assert (before - after)[others].abs().max() < 1e-6
    assert (before - after)[1][real[1]].abs().max() > 1e-2  # the changed sequence did change


def test_probe_catches_attention_that_ignores_the_packing(tiny_dense_dir: str) -> None:
    from trainer.forward import packing_leak

    model = _model(tiny_dense_dir)
    assert packing_leak(model) is None
    model.set_attn_implementation("sdpa")  # attention over the whole packed row
    leak = packing_leak(model)
    assert leak is not None and "differ" in leak


# --------------------------------------------------------------------------------------------------
# The trainer step
# --------------------------------------------------------------------------------------------------


def test_packed_train_step_matches_padded(tiny_dense_dir: str, in_process_trainer) -> None:
    """One DeepSpeed rank (lr 0, so the weights stay): loss, gradient norm, entropy and the KL to
    the reference agree packed and padded, with and without the shared prefix; the packed path ran."""
    from trainer.rank import TrainerRank, TrainerSpec

    tcfg = TrainerConfig(steps=1, lr=0.0, micro_batch_size=3, dtype="float32", threads_per_rank=1)
    algo = AlgorithmConfig(name="grpo", kl_coef=0.1, entropy_coef=0.01)
    w = TrainerRank(TrainerSpec(tiny_dense_dir, MODEL_CFG, tcfg, algo, seed=0))
    info = w.setup()
    rng = random.Random(0)
    groups = []
    for g in range(2):
        prompt = [rng.randrange(100, 4000) for _ in range(10 + g)]
        trajs = [
            make_trajectory(
                prompt, [rng.randrange(100, 4000) for _ in range(n)], reward=rng.random(), task_id=str(g)
            )
            for n in (1, 70, 6, 25)
        ]
        groups.append(make_group(trajs, task_id=str(g)))
    try:
        assert info["pack"] is True and w.forward.pack
        runs = {}
        for p in (True, False):
            for share in (True, False):
                w.forward.pack, w.forward.share_prefix = p, share
                ran = w.forward.packed_forwards
                runs[p, share] = w.train_step(groups, version=0)
                assert (w.forward.packed_forwards > ran) == p
        base = runs[False, False]
        for key, r in runs.items():
            for metric in ("loss/policy", "grad_norm", "entropy", "kl"):
                assert r[metric] == pytest.approx(base[metric], rel=1e-4, abs=1e-7), (key, metric)
            assert (
                r["train/tokens"]
                == base["train/tokens"]
                == sum(len(t.token_ids) for g in groups for t in g.trajectories)
            )
    finally:
        w.close()
