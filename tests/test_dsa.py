"""GLM-5's own architecture (`glm_moe_dsa`): DeepSeek sparse attention with indexer replay.

- The coding of key selections (slime/core/keysets.py, `IndexerKeys`): round trips, overlay, padding,
  JSON, and what it costs.
- The transformers engine on `model=glm5_dsa_tiny` in fp32: the keys every indexer kept and the MoE
  routes it returns equal what the trainer's own indexers and routers compute for the same sequences
  (batched, left-padded prompts of several lengths), also across weight pushes during generation
  (`keep` and `abort` modes); the last token has none.
- The trainer's indexer hooks (trainer/indexer.py): replaying the indexer's own selections leaves the
  logits unchanged (shared-prefix path included); replaying other keys makes the attention use exactly
  those, and the model still gets gradients.
- The DeepSpeed trainer on samples of the engine in bf16 (this CPU has AVX512-BF16): without replay the
  trainer's indexers keep other keys than the engine's on some (token, layer) pairs; indexer replay makes
  the used mismatch 0 and lowers `mismatch/logprob_abs`; routing and indexer replay together on the same
  model make both used mismatches 0 and the logprob mismatch lowest.
- Bad input fails at validation with the key named; `+experiment=glm5_dsa_tiny` validates.
- Through the real loop (`slow`): `+experiment=glm5_dsa_tiny` learns `target`, logs `dsa/` and `moe/`
  every step with both used mismatches 0, and its `hf/` export loads in transformers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import first_and_best_window

from slime.core import keysets
from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
from slime.core.types import Group, IndexerKeys, SamplingParams, Task, Trajectory

MODEL_CFG = ModelConfig(name="glm5-dsa-tiny", source="random", dtype="float32")
TOPK = 16  # glm5_dsa_tiny's index_topk
LAYERS = [0, 1, 2]  # every layer runs its own indexer
TEXT = [
    "Write a few words about the sea, in lowercase letters only.",
    "Tell me about trees and the wind in the autumn, briefly and in small letters.",
    "Name some animals that live in cold places; lowercase words only please.",
    "What is music? Answer with simple words written in lowercase.",
]


@pytest.fixture(scope="module", autouse=True)
def _process_group(in_process_trainer) -> None:
    """In-process trainer ranks share one process group, released after the module (tests/conftest.py)."""


@pytest.fixture(scope="session")
def dsa_dir(cache_dir: str) -> str:
    from conftest import load_model_config

    from slime.core.model import resolve_model

    return resolve_model(load_model_config("glm5_dsa_tiny"), cache_dir)


def _hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def _prompts(tokenizer) -> list[list[int]]:
    """Chat prompts of different lengths (30-45 tokens: the indexer is selective from token 16 on)."""
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        for t in TEXT
    ]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def _random_sets(positions: np.ndarray, layers: int, k: int, rng) -> np.ndarray:
    return np.stack([[rng.choice(t + 1, k, replace=False) for _ in range(layers)] for t in positions])


# --------------------------------------------------------------------------------------------------
# The coding
# --------------------------------------------------------------------------------------------------


def test_varints_and_key_set_coding_round_trip():
    values = np.array([0, 1, 127, 128, 300, 16383, 16384, 2**40])
    assert (keysets.varint_decode(keysets.varint_encode(values).tobytes()) == values).all()
    assert keysets.varint_encode(np.array([300])).tobytes() == bytes([0xAC, 0x02])  # 300 = 0b10_0101100
    # By hand, topk 4, one layer. t=4 keeps {0,1,2,4}: distances back {4,3,2,0}; the reference (the
    # dense row t=3 keeps 0..3) is {4,3,2,1} from t=4: added {0}, removed {1}, 2*1 < 4 -> a diff row:
    # header 2*1+1 = 3, then 0, then 1. t=5 keeps {0,1,4,5}: distances {0,1,4,5}; reference {0,1,2,4}
    # from t=5 is {5,4,3,1}: added {0}, removed {3} -> 3, 0, 3. t=7 (t=6 not coded: no reference) keeps
    # {0,1,2,7}: distances {0,5,6,7} -> a gaps row: header 0, then 0, 5-0-1, 6-5-1, 7-6-1 = 0, 4, 0, 0.
    hand = np.array([[[0, 1, 2, 4]], [[0, 1, 4, 5]], [[0, 1, 2, 7]]])
    data = keysets.encode(hand, np.array([4, 5, 7]), 4)
    assert data == bytes([3, 0, 1, 3, 0, 3, 0, 0, 4, 0, 0])
    assert (keysets.decode(data, np.array([4, 5, 7]), 1, 4) == hand).all()
    rng = np.random.default_rng(0)
    k, layers = 16, 3
    for positions in (np.arange(k, 60), np.array([16, 17, 18, 30, 31, 40])):  # with gaps: no reference
        sel = _random_sets(positions, layers, k, rng)
        data = keysets.encode(sel, positions, k)
        assert (keysets.decode(data, positions, layers, k) == np.sort(sel, axis=-1)).all()
    # Consecutive queries that keep almost the same keys (a sliding window) cost a few bytes a row.
    positions = np.arange(k, 200)
    window = np.stack([[np.arange(t - k + 1, t + 1)] * layers for t in positions])
    data = keysets.encode(window, positions, k)
    assert (keysets.decode(data, positions, layers, k) == window).all()
    assert len(data) == 3 * window.shape[0] * layers  # header, one added, one removed
    random_rows = keysets.encode(_random_sets(positions, layers, k, rng), positions, k)
    assert len(random_rows) <= (k + 1) * window.shape[0] * layers * 1.05  # about a byte per key
    with pytest.raises(ValueError):
        keysets.decode(data[:-1], positions, layers, k)


def test_indexer_keys_overlay_padding_and_json():
    rng = np.random.default_rng(1)
    length = 40
    dense = np.full((length, 3, TOPK), -1)
    dense[TOPK:] = np.sort(_random_sets(np.arange(TOPK, length), 3, TOPK, rng), axis=-1)
    valid = np.ones(length, dtype=bool)
    valid[-1] = False  # the last token: sampled, never computed
    keys = IndexerKeys.from_dense(dense, valid, TOPK, LAYERS)
    back = keys.dense()
    assert (back[keys.selective] == dense[keys.selective]).all() and (back[:TOPK] == -1).all()
    assert keys.selective.sum() == length - TOPK - 1 and (back[-1] == -1).all()
    assert keys.nbytes == len(keys.data) + 5 and len(keys.data) < 1.1 * (TOPK + 1) * 3 * (length - TOPK - 1)
    # What an engine recorded: a selective row with a key outside 0..t is not kept (never replayed).
    broken = dense.copy()
    broken[20, 1, 0] = 21  # a later position
    broken[30, 2, 5] = -1  # a missing key
    got, bad = IndexerKeys.from_engine(broken, valid, TOPK, LAYERS)
    assert (
        bad == 2 and not got.valid[20] and not got.valid[30] and got.valid[21] and got.selective.sum() == 21
    )
    # Padding adds rows without selections; cutting re-codes the rest.
    assert keys.padded(50).padded(length) == keys and len(keys.padded(30)) == 30
    assert (keys.padded(30).dense() == back[:30]).all()
    # A later computation (the next turn's prefill) overlays: its rows win, others stay.
    newer_dense = dense.copy()
    newer_dense[20] = np.sort(_random_sets(np.array([20]), 3, TOPK, rng)[0], axis=-1)
    newer_valid = np.zeros(length + 5, dtype=bool)
    newer_valid[:length] = True
    newer = IndexerKeys.from_dense(
        np.concatenate([newer_dense, np.full((5, 3, TOPK), -1)]), newer_valid, TOPK, LAYERS
    )
    merged = IndexerKeys.merge(keys, newer)
    assert len(merged) == length + 5 and merged.valid[:length].all() and not merged.valid[length:].any()
    assert (merged.dense()[20] == newer_dense[20]).all() and (merged.dense()[25] == dense[25]).all()
    assert IndexerKeys.merge(None, keys) is keys and IndexerKeys.merge(keys, None) is keys
    with pytest.raises(ValueError, match="cannot merge"):
        keys.overlay(IndexerKeys.empty(3, [0], TOPK))
    # JSON (the buffer's records) and the trajectory carrying them.
    traj = Trajectory(
        "t", list(range(length)), [0] * length, [0.0] * length, [-1] * length, 10, indexer_keys=keys
    )
    again = Trajectory.from_dict(json.loads(json.dumps(traj.to_dict())))
    assert again.indexer_keys == keys
    with pytest.raises(ValueError, match="indexer_keys"):
        Trajectory("t", [1, 2], [0, 0], [0.0, 0.0], [-1, -1], 1, indexer_keys=keys)


# --------------------------------------------------------------------------------------------------
# The transformers engine: what it captures equals what the trainer computes (fp32)
# --------------------------------------------------------------------------------------------------


def _traj(prompt: list[int], out, task: str = "t") -> Trajectory:
    n = len(out.token_ids)
    return Trajectory(
        task_id=task,
        token_ids=list(prompt) + list(out.token_ids),
        loss_mask=[0] * len(prompt) + [1] * n,
        behavior_logprobs=[0.0] * len(prompt) + list(out.logprobs),
        versions=[-1] * len(prompt) + list(out.versions),
        prompt_len=len(prompt),
        routed_experts=out.routed_experts,
        indexer_keys=out.indexer_keys,
    )


def _trainer_view(model, trajs: list[Trajectory], share_prefix: bool = True) -> dict[str, float]:
    """The trainer's own indexers and routers on these trajectories, compared with theirs (no replay)."""
    from trainer.batching import flatten_groups, make_micro_batches
    from trainer.forward import Forward
    from trainer.indexer import Indexing
    from trainer.process import Collectives
    from trainer.routing import Routing

    indexing, routing = Indexing.install(model, "none"), Routing.install(model, "none")
    try:
        group = Group(task=Task(id="t", prompt="p"), trajectories=trajs)
        for mb in make_micro_batches(flatten_groups([group]), 1, pad_id=0, trim=False):
            with torch.no_grad():
                Forward(share_prefix=share_prefix).logits(model, mb, routing, measure=True, indexing=indexing)
        return {**indexing.reduce_metrics(Collectives()), **routing.reduce_metrics(Collectives())}
    finally:
        indexing.remove()
        routing.remove()


async def test_transformers_engine_captures_what_the_trainer_computes(dsa_dir, tokenizer):
    from rollout.engines.hf import TransformersEngine
    from slime.core.types import WeightManifest

    eng = TransformersEngine(
        dsa_dir, dtype="float32", num_threads=1, max_batch_size=8, capture_routes=True, capture_indexer=True
    )
    await eng.start()
    try:
        ps = _prompts(tokenizer)
        assert len({len(p) for p in ps}) > 1  # left padding in the batch
        outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=20)) for p in ps])
        trajs = [_traj(p, o) for p, o in zip(ps, outs, strict=True)]
        for t in trajs:
            k, r = t.indexer_keys, t.routed_experts
            assert k.layers == LAYERS and k.topk == TOPK and r.layers == [1, 2]
            assert k.valid[:-1].all() and not k.valid[-1] and (r.valid == k.valid).all()
            assert k.selective.sum() == len(t.token_ids) - TOPK - 1
        # Weight pushes during generation (the model's own weights, so the selections must not move):
        # keep mode goes on over the cache, abort mode resumes from a new prefill that overlays.
        own = [str(Path(dsa_dir) / "model.safetensors")]
        for version, mode in ((1, "keep"), (2, "abort")):
            task = asyncio.create_task(eng.generate(ps[0], SamplingParams(max_tokens=24), request_id=mode))
            await asyncio.sleep(0)
            assert await eng.wait_generated(mode, 3) >= 3
            await eng.update_weights(WeightManifest(version, "files", 0, 0, files=own), mode=mode)
            out = await task
            assert out.versions[0] == version - 1 and out.versions[-1] == version, out.versions
            t = _traj(ps[0], out)
            assert t.indexer_keys.valid[:-1].all() and not t.indexer_keys.valid[-1]
            trajs.append(t)
        model = _hf(dsa_dir)
        for share in (True, False):
            got = _trainer_view(model, trajs, share_prefix=share)
            pairs = sum(3 * (len(t.token_ids) - TOPK - 1) for t in trajs)
            assert got["dsa/index_pairs"] == pairs, got
            print(f"fp32 engine vs trainer (share_prefix={share}): {got}")
            # Near-ties could flip a pair; fp32 on the same weights agreed on every pair here.
            assert got["dsa/index_mismatch"] <= 0.005 and got["moe/routing_mismatch"] <= 0.005, got
            assert got["dsa/selective_share"] > 0.3
    finally:
        await eng.shutdown()


async def test_engine_refuses_captures_the_model_lacks(tiny_dense_dir):
    from rollout.engines.hf import TransformersEngine

    for what in ("capture_routes", "capture_indexer"):
        eng = TransformersEngine(tiny_dense_dir, dtype="float32", num_threads=1, **{what: True})
        with pytest.raises(ValueError, match=f"rollout.{what}=false"):
            await eng.start()
        await eng.shutdown()


# --------------------------------------------------------------------------------------------------
# The trainer's indexer hooks
# --------------------------------------------------------------------------------------------------


def _own_keys(model, ids: list[int]) -> IndexerKeys:
    """The keys the model's own indexers keep for `ids` (all tokens valid)."""
    from trainer.indexer import find_indexer_sites

    got: dict[int, torch.Tensor] = {}
    sites = find_indexer_sites(model)
    hooks = [
        s.module.register_forward_hook(lambda _m, _i, out, j=j: got.__setitem__(j, out[0]))
        for j, s in enumerate(sites)
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    dense = torch.stack([got[j] for j in range(len(sites))], dim=1).numpy()  # [T, L, K]
    return IndexerKeys.from_dense(dense, np.ones(len(ids), dtype=bool), TOPK, [s.layer for s in sites])


def _groups(tokenizer, model, n: int = 3, flip: float = 0.0, seed: int = 0) -> list[Group]:
    """One group of a shared prompt and word replies, carrying the model's own key selections with a
    `flip` share of the selective (token, layer) rows replaced by other valid key sets."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    prompt = _prompts(tokenizer)[1]
    words = [tokenizer.encode(w)[0] for w in (" the", " cat", " sat", " on", " a", " mat", " and", " ran")]
    trajs = []
    for _ in range(n):
        ids = prompt + [rng.choice(words) for _ in range(rng.randrange(6, 12))]
        keys = _own_keys(model, ids)
        dense = keys.dense()
        for t in np.flatnonzero(keys.selective):
            for m in range(dense.shape[1]):
                if nrng.random() < flip:
                    dense[t, m] = np.sort(nrng.choice(t + 1, TOPK, replace=False))
        keys = IndexerKeys.from_dense(dense, keys.valid, TOPK, keys.layers)
        trajs.append(
            Trajectory(
                task_id="t",
                token_ids=ids,
                loss_mask=[0] * len(prompt) + [1] * (len(ids) - len(prompt)),
                behavior_logprobs=[0.0] * len(prompt) + [-3.0] * (len(ids) - len(prompt)),
                versions=[-1] * len(prompt) + [0] * (len(ids) - len(prompt)),
                prompt_len=len(prompt),
                reward=rng.random(),
                indexer_keys=keys,
            )
        )
    return [Group(task=Task(id="t", prompt="p"), trajectories=trajs)]


def test_indexer_metrics_by_hand():
    """One layer, topk 16, one row of 20 real tokens: tokens 16..19 are selective (share 4/20 = 0.2).
    The engine recorded 16, 17, 19 (not 18); the indexer's own keys differ from the engine's at 17 and 19
    (mismatch 2/3); with replay the used keys are the engine's there (used mismatch 0) and the own ones
    at 18, which the engine did not record."""
    from types import SimpleNamespace

    from trainer.indexer import IndexerSite, Indexing
    from trainer.process import Collectives

    length = 20
    own = torch.arange(16).expand(1, length, 16).clone().to(torch.int32)  # keys 0..15 everywhere
    keys = torch.full((1, length, 1, 16), -1, dtype=torch.int32)
    valid = torch.zeros((1, length), dtype=torch.bool)
    for t in (16, 17, 19):
        keys[0, t, 0] = own[0, t]
        valid[0, t] = True
    keys[0, 17, 0, 0] = 17  # the engine kept 17 instead of 0
    keys[0, 19, 0, 3] = 18  # ... and 18 instead of 3
    ids = torch.zeros((1, length), dtype=torch.long)
    mb = SimpleNamespace(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        index_keys=keys,
        index_valid=valid,
        index_layers=(0,),
    )
    for mode, used_mismatch in (("none", 2 / 3), ("rollout", 0.0)):
        indexing = Indexing([IndexerSite(0, torch.nn.Identity(), 16)], mode)
        with indexing.call(mb, slice(None), slice(None), measure=True):
            used = indexing._on_indexer(0, own)
        m = indexing.reduce_metrics(Collectives())
        assert m["dsa/selective_share"] == pytest.approx(0.2) and m["dsa/index_pairs"] == 3
        assert m["dsa/index_mismatch"] == pytest.approx(2 / 3) and m[
            "dsa/layer0/index_mismatch"
        ] == pytest.approx(2 / 3)
        assert m["dsa/index_mismatch_used"] == pytest.approx(used_mismatch)
        if mode == "none":
            assert used is None  # the indexer's own output passes unchanged
        else:
            assert (used[0, 17] == keys[0, 17, 0]).all() and (used[0, 18] == own[0, 18]).all()
    # Without engine selections only the share is logged.
    indexing = Indexing([IndexerSite(0, torch.nn.Identity(), 16)], "none")
    with indexing.call(
        SimpleNamespace(input_ids=ids, attention_mask=mb.attention_mask),
        slice(None),
        slice(None),
        measure=True,
    ):
        indexing._on_indexer(0, own)
    assert indexing.reduce_metrics(Collectives()) == {"dsa/selective_share": pytest.approx(0.2)}


def test_replay_uses_exactly_the_given_keys_and_keeps_gradients(dsa_dir, tokenizer):
    from trainer.batching import flatten_groups, make_micro_batches
    from trainer.forward import Forward
    from trainer.indexer import Indexing, same_key_sets
    from trainer.process import Collectives

    model = _hf(dsa_dir)
    mb = make_micro_batches(flatten_groups(_groups(tokenizer, model)), 1, pad_id=0)[0]
    forward = Forward(share_prefix=True)
    with torch.no_grad():
        plain = forward.logits(model, mb)
    indexing = Indexing.install(model, "rollout")
    assert indexing is not None and indexing.layers == LAYERS and indexing.topk == TOPK
    with torch.no_grad():
        own = forward.logits(model, mb, measure=True, indexing=indexing)
    assert forward.shared_prefix_forwards == 2  # the prompt ran once, with its replayed selections
    torch.testing.assert_close(own, plain, rtol=0, atol=1e-6)
    stats = indexing.reduce_metrics(Collectives())
    assert stats["dsa/index_mismatch"] == 0.0 and stats["dsa/index_mismatch_used"] == 0.0

    # Other keys: the attention receives exactly them (a hook registered after ours sees its output).
    mb2 = make_micro_batches(flatten_groups(_groups(tokenizer, model, flip=1.0, seed=3)), 1, pad_id=0)[0]
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [
        s.module.register_forward_hook(lambda _m, _i, out, j=j: seen.setdefault(j, []).append(out.clone()))
        for j, s in enumerate(indexing.sites)
    ]
    try:
        logits = Forward(share_prefix=False).logits(model, mb2, measure=True, indexing=indexing)
    finally:
        for h in hooks:
            h.remove()
    have = mb2.index_valid
    for j in range(len(LAYERS)):
        used = seen[j][0]  # [B, L, K], the one full forward
        assert bool(same_key_sets(used.long()[have], mb2.index_keys[:, :, j].long()[have]).all())
    stats = indexing.reduce_metrics(Collectives())
    assert stats["dsa/index_mismatch"] > 0.9 and stats["dsa/index_mismatch_used"] == 0.0, stats
    with torch.no_grad():
        plain2 = Forward(share_prefix=False).logits(model, mb2)  # outside a call: the indexers' own keys
    assert (logits - plain2).abs().max() > 1e-3  # other keys, other logits
    logits.float().logsumexp(-1).mean().backward()
    for layer in LAYERS:
        attn = model.model.layers[layer].self_attn
        assert attn.q_b_proj.weight.grad is not None and attn.q_b_proj.weight.grad.abs().sum() > 0
        # The indexer itself runs under no_grad in transformers (DSA trains it with its own loss).
        assert attn.indexer.wq_b.weight.grad is None
    indexing.remove()


# --------------------------------------------------------------------------------------------------
# The DeepSpeed trainer on the engine's bf16 samples: indexer replay, routing replay, both
# --------------------------------------------------------------------------------------------------


def _trainer_cfg(**kw) -> TrainerConfig:
    base = dict(steps=1, lr=0.0, micro_batch_size=8, dtype="bfloat16", zero_stage=1, threads_per_rank=1)
    base.update(kw)
    return TrainerConfig(**base)


def _algo(**kw) -> AlgorithmConfig:
    return AlgorithmConfig(name="grpo", advantage="grpo", loss_agg="token_mean", off_policy="tis", **kw)


async def _engine_groups(dsa_dir: str, tokenizer, dtype: str, n: int = 4) -> list[Group]:
    from rollout.engines.hf import TransformersEngine

    eng = TransformersEngine(
        dsa_dir, dtype=dtype, num_threads=1, max_batch_size=16, capture_routes=True, capture_indexer=True
    )
    await eng.start()
    try:
        ps = _prompts(tokenizer)
        outs = await asyncio.gather(
            *[eng.generate(p, SamplingParams(max_tokens=16, seed=None)) for p in ps for _ in range(n)]
        )
    finally:
        await eng.shutdown()
    rng = random.Random(0)
    groups = []
    for g, p in enumerate(ps):
        trajs = [_traj(p, o, task=str(g)) for o in outs[g * n : (g + 1) * n]]
        for t in trajs:
            t.reward = rng.random()
        groups.append(Group(task=Task(id=str(g), prompt="p"), trajectories=trajs))
    return groups


async def test_indexer_and_routing_replay_in_bf16(dsa_dir, tokenizer):
    """Engine and trainer in bf16 on identical weights: the trainer's indexers keep other keys than
    the engine's on some pairs; indexer replay uses the engine's (used mismatch 0) and lowers the
    logprob mismatch; with routing replay too, both used mismatches are 0 and it is lowest."""
    from slime.core.model import has_native_bf16
    from trainer.rank import TrainerRank, TrainerSpec

    if not has_native_bf16():
        pytest.skip("this CPU has no native bf16: the engine's reduced precision would be emulated")
    groups = await _engine_groups(dsa_dir, tokenizer, "bfloat16")
    got = {}
    for name, algo in (
        ("none", _algo()),
        ("indexer", _algo(indexer_replay="rollout")),
        ("both", _algo(indexer_replay="rollout", routing_replay="rollout")),
    ):
        w = TrainerRank(TrainerSpec(dsa_dir, MODEL_CFG, _trainer_cfg(), algo, seed=0))
        w.setup()
        try:
            got[name] = w.train_step(copy.deepcopy(groups), version=0)
        finally:
            w.close()
    keys = (
        "dsa/index_mismatch",
        "dsa/index_mismatch_used",
        "dsa/layer0/index_mismatch",
        "dsa/layer1/index_mismatch",
        "dsa/layer2/index_mismatch",
        "moe/routing_mismatch_used",
        "mismatch/logprob_abs",
    )
    print("bf16 engine vs trainer:", {n: {k: round(m[k], 5) for k in keys} for n, m in got.items()})
    none, indexer, both = got["none"], got["indexer"], got["both"]
    assert none["dsa/index_mismatch_used"] == none["dsa/index_mismatch"] > 0
    assert indexer["dsa/index_mismatch_used"] == 0.0 and both["dsa/index_mismatch_used"] == 0.0
    assert both["moe/routing_mismatch_used"] == 0.0 and indexer["moe/routing_mismatch_used"] > 0
    assert both["mismatch/logprob_abs"] < indexer["mismatch/logprob_abs"] < none["mismatch/logprob_abs"]
    assert all(m["dsa/index_pairs"] > 0 and "dsa/layer0/index_mismatch" in m for m in got.values())


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the key, before Ray starts
# --------------------------------------------------------------------------------------------------


def _compose(overrides: list[str], base: str = "+experiment=glm5_dsa_tiny"):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from slime.core.config import register_configs
    from slime.train import to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="slime.configs", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=[base, *overrides])
    OmegaConf.update(dcfg, "run_dir", "/tmp/slime-test-run", force_add=True)
    return to_config(dcfg)


@pytest.mark.parametrize(
    ("overrides", "base", "key", "needle"),
    [
        (
            ["algorithm.indexer_replay=rollout"],
            "+experiment=glm5_tiny",
            "algorithm.indexer_replay",
            "dense attention",
        ),
        (
            ["algorithm.indexer_replay=rollout"],
            "+experiment=tiny",
            "algorithm.indexer_replay",
            "dense attention",
        ),
        (
            ["rollout.engine=vllm"],
            "+experiment=glm5_dsa_tiny",
            "algorithm.indexer_replay",
            "rollout.engine=vllm on CPU",
        ),
        (
            ["rollout.capture_indexer=false"],
            "+experiment=glm5_dsa_tiny",
            "algorithm.indexer_replay",
            "capture_indexer",
        ),
        (
            [
                "trainer.gradient_checkpointing=true",
                "trainer.share_prefix=false",
                "algorithm.routing_replay=none",
            ],
            "+experiment=glm5_dsa_tiny",
            "algorithm.indexer_replay",
            "gradient_checkpointing",
        ),
        (
            ["rollout.engine=vllm", "algorithm.indexer_replay=none", "algorithm.routing_replay=none"],
            "+experiment=glm5_dsa_tiny",
            "rollout.engine",
            "Sparse Attention is not supported on CPU",
        ),
    ],
)
def test_bad_dsa_settings_fail_before_ray(overrides, base, key, needle):
    from slime.core.validation import validate

    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        validate(_compose(overrides, base))
    assert needle in str(info.value), str(info.value)


def test_glm5_dsa_tiny_validates():
    from slime.core.validation import validate

    cfg = _compose([])
    validate(cfg)
    assert cfg.model.name == "glm5-dsa-tiny" and cfg.rollout.engine == "transformers"
    assert cfg.algorithm.indexer_replay == "rollout" and cfg.algorithm.routing_replay == "rollout"
    # vLLM on GPUs runs the architecture (not run here): the config passes.
    validate(_compose(["rollout.engine=vllm", "rollout.gpus_per_worker=1"]))


# --------------------------------------------------------------------------------------------------
# Through the real loop
# --------------------------------------------------------------------------------------------------

# Synchronous (max_staleness 0): at lr 0.2 the asynchronous tiny run took off late (float32: first step
# above 0.9 at 6-9 in four seeds, one CI run at 10) or collapsed to reward 0 (bf16, once in seven);
# synchronous, five runs (three bf16, two float32) were above 0.88 by step 4-6 and stayed there.
DSA_STEPS = 20


@pytest.mark.slow
def test_glm5_dsa_tiny_learns_with_indexer_and_routing_replay(tmp_path, ray_cluster):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from slime import api

    run_dir = tmp_path / "dsa"
    overrides = ["+experiment=glm5_dsa_tiny", f"trainer.steps={DSA_STEPS}", "buffer.max_staleness=0"]
    rows = api.run(overrides, run_dir=str(run_dir))
    assert [r["step"] for r in rows] == list(range(DSA_STEPS))
    scores = [r["reward/mean"] for r in rows]
    first, best = first_and_best_window(scores)
    print(f"glm5_dsa_tiny reward: {first:.3f} -> best {best:.3f}: {[round(s, 3) for s in scores]}")
    print("dsa/index_mismatch per step:", [round(r["dsa/index_mismatch"], 3) for r in rows])
    assert best > first + 0.15, scores
    for r in rows:
        assert r["dsa/index_mismatch_used"] == 0.0 and r["moe/routing_mismatch_used"] == 0.0
        assert r["dsa/index_pairs"] > 0 and 0.0 <= r["dsa/index_mismatch"] <= 1.0
    hf = run_dir / "checkpoints" / f"step_{DSA_STEPS:06d}" / "hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert type(model).__name__ == "GlmMoeDsaForCausalLM"
    names = set()
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            names |= set(sf.keys())
    # The transformers names (the ones the engine and vLLM load): MLA, the indexer, per-expert weights.
    assert {
        "model.layers.1.self_attn.indexer.wq_b.weight",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
    } <= names
    assert "model.layers.1.mlp.experts.255.down_proj.weight" in names, sorted(names)[:10]
