"""The MoE trainer: routing replay, router losses and metrics, expert parallelism, bad input.

- Routing hooks on plain transformers models (Qwen3-MoE `tiny_moe`, GLM-5-shaped `glm5_tiny`): without
  routes the forward is untouched; replaying the router's own routes changes nothing; replaying other
  routes makes the experts run exactly those ids, with gate weights recomputed from the router's scores
  (the router still gets a gradient).
- The DeepSpeed trainer (one rank, in-process): `routing_replay=rollout` uses the trajectories' routes
  (`moe/routing_mismatch_used` 0) and logs the router's own disagreement; `routing_replay=old` makes the
  later minibatches use the routes of the old-policy pass; aux/z losses move the router when their
  coefficient is > 0.
- Expert parallelism (DeepSpeed AutoEP, two Ray ranks, gloo): on the same batch the loss and gradient
  norm at expert_parallel_size 2 equal size 1 (tolerances below), each rank holds half the expert
  parameters, and the exported weights equal the size-1 export under ordinary transformers names.
- Bad input fails at validation with the key named.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
from slime.core.types import Group, RoutedExperts, Task, Trajectory

MODEL_CFG = ModelConfig(name="tiny-moe", source="random", dtype="float32")
WORDS = [" the", " cat", " sat", " on", " a", " mat", " and", " then", " ran", " far", " away", " home"]


@pytest.fixture(scope="module", autouse=True)
def _process_group(in_process_trainer) -> None:
    """In-process workers share one process group, released after the module (tests/conftest.py)."""


@pytest.fixture(scope="session")
def glm5_tiny_dir(cache_dir: str) -> str:
    from conftest import load_model_config

    from slime.core.model import resolve_model

    return resolve_model(load_model_config("glm5_tiny"), cache_dir)


def trainer_cfg(**kw) -> TrainerConfig:
    base = dict(steps=1, lr=1e-3, micro_batch_size=4, dtype="float32", zero_stage=1, threads_per_rank=1)
    base.update(kw)
    return TrainerConfig(**base)


def algo_cfg(**kw) -> AlgorithmConfig:
    base = dict(name="grpo", advantage="grpo", loss_agg="token_mean", off_policy="tis")
    base.update(kw)
    return AlgorithmConfig(**base)


def _hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return model


def own_routes(model, ids: list[int]) -> RoutedExperts:
    """The routes the model's own routers choose for `ids` (all tokens valid)."""
    from trainer.routing import find_router_sites

    sites = find_router_sites(model)
    got: dict[int, torch.Tensor] = {}
    hooks = [
        s.module.register_forward_hook(lambda _m, _i, out, j=j: got.__setitem__(j, out[2].detach()))
        for j, s in enumerate(sites)
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    ids_arr = torch.stack([got[j] for j in range(len(sites))], dim=1).numpy().astype(np.uint8)  # [T, M, K]
    return RoutedExperts(ids_arr, np.ones(len(ids), dtype=bool), [s.layer for s in sites])


def flip_routes(routes: RoutedExperts, num_experts: int, share: float, seed: int) -> RoutedExperts:
    """A copy with about `share` of the (token, layer) pairs given other (distinct) experts."""
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(routes)
    t, m, k = out.ids.shape
    for ti in range(t):
        for mi in range(m):
            if rng.random() < share:
                out.ids[ti, mi] = rng.permutation(num_experts)[:k]
    return out


def make_groups(
    tokenizer, model=None, num_groups: int = 2, n: int = 4, seed: int = 0, flip: float = 0.0
) -> list[Group]:
    """Groups of word-token responses; with `model`, each trajectory carries that model's own routes
    with a `flip` share of them replaced (the engine "disagreeing")."""
    import random

    rng = random.Random(seed)
    word_ids = [tokenizer.encode(w)[0] for w in WORDS]
    groups = []
    for g in range(num_groups):
        prompt = tokenizer.encode(f"Question {g + seed}: tell me a story.")
        trajs = []
        for i in range(n):
            response = [rng.choice(word_ids) for _ in range(rng.randrange(3, 9))]
            ids = prompt + response
            routes = None
            if model is not None:
                num_experts = int(getattr(model.config, "num_experts", 0) or model.config.n_routed_experts)
                routes = flip_routes(own_routes(model, ids), num_experts, flip, seed * 100 + g * 10 + i)
            trajs.append(
                Trajectory(
                    task_id=str(g),
                    token_ids=ids,
                    loss_mask=[0] * len(prompt) + [1] * len(response),
                    behavior_logprobs=[0.0] * len(prompt) + [-rng.uniform(2.0, 4.0) for _ in response],
                    versions=[-1] * len(prompt) + [0] * len(response),
                    prompt_len=len(prompt),
                    reward=float(rng.random()),
                    routed_experts=routes,
                )
            )
        groups.append(Group(task=Task(id=str(g), prompt="p"), trajectories=trajs))
    return groups


# --------------------------------------------------------------------------------------------------
# Routing hooks on plain transformers models
# --------------------------------------------------------------------------------------------------


def _micro_batch(groups: list[Group]):
    from trainer.batching import flatten_groups, make_micro_batches

    refs = flatten_groups(groups)
    return make_micro_batches(refs, 1, pad_id=0)[0]


def _experts_seen(model) -> tuple[dict[int, torch.Tensor], list]:
    """Forward pre-hooks recording the top-k ids each MoE layer's experts receive."""
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            hooks.append(
                experts.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[1].detach()))
            )
    return seen, hooks


@pytest.mark.parametrize("name", ["tiny_moe", "glm5_tiny"])
def test_replay_routes_the_experts_and_keeps_the_router_gradient(
    name, tiny_moe_dir, glm5_tiny_dir, tokenizer
):
    from trainer.forward import Forward
    from trainer.routing import Routing, gate_weights, router_scores, same_sets

    model = _hf(tiny_moe_dir if name == "tiny_moe" else glm5_tiny_dir)
    if name == "glm5_tiny":
        # Non-zero correction biases, so selection (biased) and weights (unbiased) differ as in GLM-5.
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(256, generator=gen) * 0.02)
    groups = make_groups(tokenizer, model, num_groups=1, n=3, flip=0.0)
    mb = _micro_batch(groups)
    forward = Forward(share_prefix=True)
    with torch.no_grad():
        plain = forward.logits(model, mb)  # no hooks yet
    routing = Routing.install(model, "rollout")
    assert routing is not None and routing.layers == ([0, 1] if name == "tiny_moe" else [1, 2])
    with torch.no_grad():
        own = forward.logits(model, mb, routing, measure=True)
    # Replaying the router's own routes (shared-prefix path included) leaves the forward as it was.
    assert forward.shared_prefix_forwards == 2
    torch.testing.assert_close(own, plain, rtol=0, atol=1e-6)
    stats = routing.reduce_metrics(_one_rank())
    assert stats["moe/routing_mismatch"] == 0.0 and stats["moe/routing_mismatch_used"] == 0.0

    # Other routes: the experts run exactly them, gate weights from the router's own scores.
    flipped = make_groups(tokenizer, model, num_groups=1, n=3, flip=1.0, seed=0)
    mb2 = _micro_batch(flipped)
    forward = Forward(share_prefix=False)
    seen, hooks = _experts_seen(model)
    weights: dict[int, tuple] = {}
    wh = [
        s.module.register_forward_hook(lambda _m, _i, out, j=j: weights.__setitem__(j, out))
        for j, s in enumerate(routing.sites)
    ]
    try:
        logits = forward.logits(model, mb2, routing, measure=True)
    finally:
        for h in hooks + wh:
            h.remove()
    real = mb2.attention_mask.reshape(-1) != 0
    for j, site in enumerate(routing.sites):
        want = mb2.routes[:, :, j].reshape(-1, site.top_k)[real]
        got = seen[site.layer].reshape(-1, site.top_k)[real]
        assert bool(same_sets(got, want).all()), site.layer
        # (The hook registered after ours saw our output: weights of the replayed experts.)
        logits_j, w_j, ids_j = weights[j]
        expect = gate_weights(router_scores(logits_j, site.score), ids_j.long(), site.norm, site.scale)
        torch.testing.assert_close(w_j.float(), expect, rtol=1e-6, atol=1e-6)
    assert (logits - plain[: logits.shape[0]]).abs().max() > 1e-3  # other experts, other logits
    stats = routing.reduce_metrics(_one_rank())
    assert stats["moe/routing_mismatch"] > 0.9 and stats["moe/routing_mismatch_used"] == 0.0
    logits.float().logsumexp(-1).mean().backward()
    for site in routing.sites:
        gate_w = model.model.layers[site.layer].mlp.gate.weight
        assert gate_w.grad is not None and gate_w.grad.abs().sum() > 0
    routing.remove()


def _one_rank():
    from trainer.process import Collectives

    return Collectives()


def test_router_metrics_and_aux_loss_values(tiny_moe_dir):
    """Balanced routing: load max/mean 1, cv 0, aux loss = top_k; one hot expert: max/mean = E."""
    from trainer.routing import RouterSite, Routing

    site = RouterSite(
        0, "hf", torch.nn.Identity(), num_experts=4, top_k=2, score="softmax", norm=True, scale=1.0
    )
    routing = Routing([site], "none")
    from types import SimpleNamespace

    ids = torch.zeros((1, 8), dtype=torch.long)
    mb = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
    logits = torch.zeros(8, 4)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    with routing.call(mb, slice(None), slice(None), measure=True, want_loss=False):
        routing._on_router(0, (logits, torch.full((8, 2), 0.5), balanced))
    m = routing.reduce_metrics(_one_rank())
    assert m["moe/load_max_over_mean"] == pytest.approx(1.0) and m["moe/load_cv"] == pytest.approx(0.0)
    assert m["moe/aux_loss"] == pytest.approx(2.0)  # top_k at perfect balance
    assert m["moe/router_entropy"] == pytest.approx(np.log(4))
    assert m["moe/z_loss"] == pytest.approx(np.log(4) ** 2)
    assert "moe/routing_mismatch" not in m  # no engine routes: nothing to compare
    hot = torch.tensor([[0, 1]] * 8)
    with routing.call(mb, slice(None), slice(None), measure=True, want_loss=False):
        routing._on_router(0, (logits, torch.full((8, 2), 0.5), hot))
    m = routing.reduce_metrics(_one_rank())
    assert m["moe/layer0/load_max_over_mean"] == pytest.approx(2.0)  # two of four experts take all


# --------------------------------------------------------------------------------------------------
# The DeepSpeed trainer, one rank
# --------------------------------------------------------------------------------------------------


def new_worker(model_dir: str, tcfg: TrainerConfig, acfg: AlgorithmConfig):
    from trainer.rank import TrainerRank, TrainerSpec

    w = TrainerRank(TrainerSpec(model_dir, MODEL_CFG, tcfg, acfg, seed=0))
    w.setup()
    return w


MOE_KEYS = {
    "moe/load_max_over_mean",
    "moe/load_cv",
    "moe/router_entropy",
    "moe/aux_loss",
    "moe/z_loss",
    "moe/routing_mismatch",
    "moe/routing_mismatch_used",
    "moe/layer0/load_max_over_mean",
    "moe/layer1/routing_mismatch",
}


def test_rollout_replay_in_the_trainer_step(tiny_moe_dir, tokenizer):
    """routing_replay=rollout: the step's forwards use the trajectories' routes; the router's own
    disagreement is logged; without replay the trainer's experts disagree with the (flipped) routes and
    the logprob mismatch against logprobs computed under the replayed routes is larger."""
    model = _hf(tiny_moe_dir)
    groups = make_groups(tokenizer, model, flip=0.3, seed=1)
    # Behaviour logprobs = what a forward with exactly these routes gives (the engine's view).
    _behaviour_from_replayed_routes(model, groups)
    got = {}
    for mode in ("rollout", "none"):
        w = new_worker(tiny_moe_dir, trainer_cfg(lr=0.0), algo_cfg(routing_replay=mode))
        try:
            got[mode] = w.train_step(copy.deepcopy(groups), version=0)
        finally:
            w.close()
    on, off = got["rollout"], got["none"]
    assert MOE_KEYS <= set(on), sorted(set(on))
    assert on["moe/routing_mismatch_used"] == 0.0
    # About 30% of the pairs were flipped. Layer 0 sees the same input either way; later layers' own
    # choices depend on which experts ran below them, so only layer 0 must agree exactly.
    assert 0.15 < on["moe/routing_mismatch"] < 0.45 and 0.15 < off["moe/routing_mismatch"] < 0.45
    assert off["moe/layer0/routing_mismatch"] == on["moe/layer0/routing_mismatch"]
    assert off["moe/routing_mismatch_used"] == off["moe/routing_mismatch"]
    assert on["mismatch/logprob_abs"] < 1e-5 < off["mismatch/logprob_abs"], (on, off)


def _behaviour_from_replayed_routes(model, groups: list[Group]) -> None:
    """Set each trajectory's behaviour logprobs to a fp32 forward that uses its `routed_experts`."""
    from trainer.batching import flatten_groups, make_micro_batches
    from trainer.forward import Forward
    from trainer.routing import Routing

    routing = Routing.install(model, "rollout")
    forward = Forward(share_prefix=False)
    for ref in flatten_groups(groups):
        mb = make_micro_batches([ref], 1, pad_id=0, trim=False)[0]
        with torch.no_grad():
            lp = forward.logprobs(model, mb, routing)[0]  # [L-1]: logprob of token t+1
        t = ref.traj
        t.behavior_logprobs = [0.0] + [
            float(x) if m else 0.0 for x, m in zip(lp, t.loss_mask[1:], strict=True)
        ]
    routing.remove()


def test_old_replay_reuses_the_first_pass_routes(tiny_moe_dir, tokenizer):
    """routing_replay=old with two minibatches: every training forward's experts are the routes the
    old-policy pass chose, also after the first update (lr large enough that the routers' own choice
    then differs)."""
    from trainer.routing import same_sets

    acfg = algo_cfg(routing_replay="old", num_minibatches=2)
    w = new_worker(tiny_moe_dir, trainer_cfg(lr=0.5, micro_batch_size=2), acfg)
    try:
        routing = w.routing
        seen, hooks = _experts_seen(w.policy.module)
        calls = []  # (measure, replay [N, K] or None, valid, own [N, K], experts seen [N, K]) per router call
        real_on_router = routing._on_router

        def on_router(i, out):
            call = routing._call
            new = real_on_router(i, out)
            replay = None if call.replay is None else call.replay[:, i].clone()
            calls.append((call.measure, replay, call.replay_valid, out[2].clone(), i))
            return new

        routing._on_router = on_router
        # The experts' pre-hook runs after the router's forward hook: pair them up afterwards.
        experts_seen = []
        for layer in routing.layers:
            experts = w.policy.module.model.layers[layer].mlp.experts
            hooks.append(
                experts.register_forward_pre_hook(lambda _m, args: experts_seen.append(args[1].clone()))
            )
        metrics = w.train_step(make_groups(tokenizer), version=0)
        for h in hooks:
            h.remove()
        assert len(calls) == len(experts_seen)
        replayed = differs = 0
        for (measure, replay, valid, own, _), used in zip(calls, experts_seen, strict=True):
            if measure:
                assert replay is None  # the old-policy pass routes by itself
                continue
            assert replay is not None
            assert bool(same_sets(used[valid], replay[valid]).all())
            replayed += 1
            differs += int((~same_sets(own[valid], replay[valid])).any())
        assert replayed > 0 and differs > 0, (replayed, differs)  # after the update the router would differ
        assert "moe/aux_loss" in metrics and "moe/routing_mismatch" not in metrics  # no engine routes
    finally:
        w.close()


def test_aux_loss_coefficient_moves_the_router(tiny_moe_dir, tokenizer):
    """With lr 0 nothing moves; the router's gradient norm grows with trainer.moe.aux_loss_coef."""
    norms = {}
    for coef in (0.0, 10.0):
        w = new_worker(tiny_moe_dir, trainer_cfg(lr=1e-3, grad_clip=0.0), algo_cfg())
        w.cfg.moe.aux_loss_coef = coef
        w.router_coefs = (coef, 0.0)
        w.routing.loss_graph = coef > 0
        try:
            norms[coef] = w.train_step(make_groups(tokenizer), version=0)["grad_norm"]
        finally:
            w.close()
    assert norms[10.0] > norms[0.0] * 1.05, norms


def test_router_coefficients_default_to_the_model_config(tiny_moe_dir):
    from trainer.routing import model_router_coefs

    config = _hf(tiny_moe_dir).config
    assert model_router_coefs(config, -1.0, -1.0) == (pytest.approx(config.router_aux_loss_coef), 0.0)
    assert model_router_coefs(config, 0.0, 0.5) == (0.0, 0.5)


# --------------------------------------------------------------------------------------------------
# Expert parallelism: two Ray ranks, AutoEP size 2 vs size 1
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
async def test_expert_parallel_matches_one_rank(stage, tiny_moe_dir, tokenizer, ray_cluster, tmp_path):
    """expert_parallel_size=2 on two ranks takes the same step as one rank without expert parallelism:
    same loss (rel 1e-4) and gradient norm (rel 1e-3), each rank holding half the expert parameters, and
    the exported weights equal the one-rank export (abs 2e-4 after one AdamW step at lr 1e-3)."""
    from slime.core.config import MoeConfig
    from slime.core.transport_files import read_weights
    from trainer.actors import TrainerRanks
    from trainer.rank import TrainerSpec

    acfg = algo_cfg(loss_agg="token_mean")
    batch = make_groups(tokenizer, num_groups=2, n=4, seed=7)
    # The load-balancing loss is a product of per-micro-batch means: it depends on how the batch is cut
    # into micro-batches, which differs between one and two ranks, so it is off for the comparison.
    no_aux = MoeConfig(aux_loss_coef=0.0, z_loss_coef=0.0)
    one = new_worker(tiny_moe_dir, trainer_cfg(zero_stage=stage, micro_batch_size=2, moe=no_aux), acfg)
    try:
        ref = one.train_step(copy.deepcopy(batch), version=0)
        ref_weights = {k: v.clone() for k, v in one.full_named_tensors(torch.float32)}
    finally:
        one.close()
    tcfg = trainer_cfg(zero_stage=stage, micro_batch_size=2, num_ranks=2, expert_parallel_size=2, moe=no_aux)
    ranks = TrainerRanks(TrainerSpec(tiny_moe_dir, MODEL_CFG, tcfg, acfg, 0))
    try:
        info = await ranks.setup()
        assert all(i["expert_parallel_size"] == 2 for i in info)
        shards = await ranks._all("expert_shards")
        assert all(local * 2 == total and total > 0 for local, total in shards), shards
        got = await ranks.train_step(copy.deepcopy(batch), version=0)
        print(
            f"EP2 vs EP1: loss {got['loss/policy']:.6f} vs {ref['loss/policy']:.6f}, "
            f"grad_norm {got['grad_norm']:.6f} vs {ref['grad_norm']:.6f}"
        )
        assert got["loss/policy"] == pytest.approx(ref["loss/policy"], rel=1e-4, abs=1e-6)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-3)
        assert got["moe/load_cv"] == pytest.approx(ref["moe/load_cv"], rel=1e-4)
        await ranks.open_weights("files", str(tmp_path / "w"), 4, "gloo", 60)
        manifest = await ranks.publish_weights(1)
        exported = dict(read_weights(manifest))
        assert set(exported) == set(ref_weights)
        for k, v in exported.items():
            torch.testing.assert_close(v, ref_weights[k], rtol=0, atol=2e-4, msg=k)
    finally:
        ranks.shutdown()


# --------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the key, before Ray starts
# --------------------------------------------------------------------------------------------------


def _compose(overrides: list[str], base: str = "+experiment=tiny"):
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


EP2 = ["model=tiny_moe", "trainer.expert_parallel_size=2", "trainer.num_ranks=2"]


@pytest.mark.parametrize(
    ("overrides", "key", "needle"),
    [
        (
            ["model=tiny_moe", "trainer.expert_parallel_size=2"],
            "trainer.expert_parallel_size",
            "num_ranks (1)",
        ),
        (
            [
                "model=tiny_moe",
                "trainer.expert_parallel_size=3",
                "trainer.num_ranks=3",
                "trainer.batch_groups=3",
            ],
            "trainer.expert_parallel_size",
            "number of experts (8)",
        ),
        (
            ["model=tiny_dense", "trainer.expert_parallel_size=2", "trainer.num_ranks=2"],
            "trainer.expert_parallel_size",
            "is dense",
        ),
        ([*EP2, "trainer.zero_stage=3"], "trainer.expert_parallel_size", "zero_stage 1 or 2"),
        ([*EP2, "trainer.zero_stage=0"], "trainer.expert_parallel_size", "zero_stage 1 or 2"),
        (["model=tiny_dense", "algorithm.routing_replay=rollout"], "algorithm.routing_replay", "is dense"),
        (["model=tiny_dense", "algorithm.routing_replay=old"], "algorithm.routing_replay", "is dense"),
        (
            ["model=tiny_moe", "algorithm.routing_replay=rollout", "rollout.capture_routes=false"],
            "algorithm.routing_replay",
            "rollout.capture_routes=true",
        ),
        (
            [
                "model=tiny_moe",
                "model.architecture=MixtralForCausalLM",
                "algorithm.routing_replay=rollout",
                "rollout.engine=transformers",
            ],
            "algorithm.routing_replay",
            "rollout.engine=transformers captures them for model types",
        ),
        (
            [
                "model=tiny_moe",
                "algorithm.routing_replay=old",
                "trainer.gradient_checkpointing=true",
                "trainer.share_prefix=false",
            ],
            "algorithm.routing_replay",
            "gradient_checkpointing",
        ),
    ],
)
def test_bad_moe_settings_fail_before_ray(overrides, key, needle):
    from slime.core.validation import validate

    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        validate(_compose(overrides))
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("overrides", [EP2, [*EP2, "trainer.zero_stage=2"]])
def test_good_moe_settings_validate(overrides):
    from slime.core.validation import validate

    validate(_compose(overrides))
    # The transformers engine captures the routes of the router kinds the trainer replays.
    validate(_compose(["model=tiny_moe", "algorithm.routing_replay=rollout", "rollout.engine=transformers"]))
    glm = _compose(["trainer.expert_parallel_size=2", "trainer.num_ranks=2"], base="+experiment=glm5_tiny")
    validate(glm)
    assert glm.model.name == "glm5-tiny" and glm.algorithm.routing_replay == "rollout"
