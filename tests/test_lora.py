"""LoRA (`model.lora.*`, trainer/lora.py) through the real parts: peft adapters trained by DeepSpeed
(ZeRO 0-3), merged weights pushed to the session's float32 vLLM engine, the adapters-off KL reference,
the checkpoint's peft adapter, and two steps of the real loop.

The key test (`test_pushed_adapter_reaches_the_engine`) guards the field's most reported LoRA failure,
an adapter that never reaches the engine: after one step and a push, the engine's logprobs equal the
trainer's within the tolerance of test_trainer.py and differ from the base model's by far more.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import (
    algo_cfg,
    make_groups,
    new_worker,
    publish_files,
    restore_weights,
    safetensors_dir,
    tiny_model_cfg,
    token_logprobs,
    trainer_cfg,
)

from slime import api
from slime.core.config import LoraConfig, ModelConfig
from slime.core.validation import validate

LORA = LoraConfig(r=8, alpha=16.0)
LORA_MODEL = tiny_model_cfg(lora=LORA)
TOL = 1e-3  # engine vs trainer logprobs, float32 (test_trainer.py's engine check)
PROMPT = "Once upon a time there was a cat"


@pytest.fixture(scope="module", autouse=True)
def _process_group(in_process_trainer) -> None:
    """In-process workers share one process group, released after the module (tests/conftest.py)."""


def lora_worker(model_dir: str, model_cfg: ModelConfig = LORA_MODEL, **trainer_kw):
    algo = trainer_kw.pop("algo", algo_cfg())
    return new_worker(model_dir, trainer_cfg(**trainer_kw), algo, model_cfg)


def adapter_names(module: torch.nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def optimizer_state_numel(policy) -> int:
    """Elements of AdamW state (exp_avg + exp_avg_sq) held by the torch optimizer under DeepSpeed's
    wrappers (ZeRO 1-3 keep it for their flat fp32 partitions)."""
    opt = policy.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return sum(
        t.numel() for state in opt.state.values() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq")
    )


def max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.lora.r=-1"], "model.lora.r must be >= 0"),
        (["model.lora.r=8", "model.lora.alpha=0"], "model.lora.alpha must be > 0"),
        (["model.lora.r=8", "model.lora.dropout=0.05"], "model.lora.dropout must be 0"),
        (["model.lora.r=8", "model.lora.target_modules=[]"], "model.lora.target_modules must list"),
        (["model.lora.r=8", "model.lora.target_modules=[all-linear,q_proj]"], "drop the other names"),
        (["model.lora.r=8", "model=tiny_moe"], "set model.lora.r=0"),
    ],
)
def test_config_rejects(overrides, message, tmp_path) -> None:
    cfg = api.compose_config(["+experiment=tiny", *overrides], str(tmp_path))
    with pytest.raises(ValueError, match=message):
        validate(cfg)


@pytest.mark.parametrize(
    "overrides",
    [
        *([f"trainer.zero_stage={stage}"] for stage in (0, 1, 2, 3)),
        ["trainer.share_prefix=false", "trainer.gradient_checkpointing=true"],
        ["algorithm=ppo"],
        ["algorithm.kl_coef=0.05"],
        ["model.lora.target_modules=[all-linear]"],
    ],
)
def test_config_accepts(overrides, tmp_path) -> None:
    validate(api.compose_config(["+experiment=tiny", "model.lora.r=8", *overrides], str(tmp_path)))


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (["no_such_proj"], "model.lora.target_modules"),
        (["embed_tokens"], "plain nn.Linear"),
        (["lm_head"], "outside the decoder"),
    ],
)
def test_wrap_rejects_what_the_merge_cannot_fold(targets, message, tiny_dense_dir: str) -> None:
    from trainer.build import load_causal_lm
    from trainer.lora import wrap

    model = load_causal_lm(tiny_dense_dir, LORA_MODEL)
    with pytest.raises(ValueError, match=message):
        wrap(model, LoraConfig(r=4, target_modules=targets))


def test_wrap_rejects_moe_experts_at_start_up(tiny_moe_dir: str) -> None:
    """A model whose experts are only known once loaded (a hub id) fails in the trainer's setup."""
    from trainer.build import load_causal_lm
    from trainer.lora import wrap

    model = load_causal_lm(tiny_moe_dir, LORA_MODEL)
    with pytest.raises(ValueError, match="dense models only"):
        wrap(model, LORA)


# --------------------------------------------------------------------------------------------------
# The merge, and what trains
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [LORA.target_modules, ["all-linear"]])
def test_merge_equals_peft_merge_and_unload(targets, tiny_dense_dir: str) -> None:
    """trainer.lora.merge gives peft's own merged weights under transformers' names, without
    touching the live parameters."""
    from trainer.build import load_causal_lm
    from trainer.lora import adapted_scales, merge, wrap

    base_names = set(load_causal_lm(tiny_dense_dir, LORA_MODEL).state_dict())
    model = wrap(
        load_causal_lm(tiny_dense_dir, LORA_MODEL), LoraConfig(r=4, alpha=12.0, target_modules=targets)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)  # B starts at zero: give the adapter a value to merge
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    scales = adapted_scales(model)
    assert len(scales) == 14 and set(scales.values()) == {3.0}  # 7 linears x 2 layers, alpha / r

    merged = merge(dict(model.state_dict()), scales, torch.float32)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(expected) == base_names
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)
    for layer in scales:  # the adapters were merged in, into new tensors
        assert not torch.equal(merged[f"{layer}.weight"], live[f"base_model.model.{layer}.base_layer.weight"])
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n]), f"{n} changed by the merge"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_only_adapters_train_and_the_exports_are_merged(
    stage: int, tiny_dense_dir: str, tokenizer, tmp_path
) -> None:
    """Per ZeRO stage: only adapter parameters require grad and hold optimizer state; the base weights
    do not move; the weight push and the checkpoint's hf/ export carry plain transformers names with
    exactly what peft's own `merge_and_unload` makes of the checkpoint's saved adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slime.core import checkpoint as ck
    from slime.core.transport_files import read_weights

    w = lora_worker(tiny_dense_dir, zero_stage=stage, lr=1e-2)
    try:
        module = w.policy.module
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        assert trainable == adapter_names(module) and len(trainable) == 28
        assert w.num_trainable == 16_384  # 2 layers x 8 x (in + out) summed over the 7 linears

        w.train_step(make_groups(tokenizer), version=0)
        assert optimizer_state_numel(w.policy) == 2 * w.num_trainable  # AdamW's two moments
        manifest = publish_files(w, 1, str(tmp_path / "weights"), 1)
        ckpt = w.save_checkpoint(str(tmp_path / "step_000001"), step=1, version=1)
    finally:
        w.close()

    pushed = dict(read_weights(manifest))
    exported = safetensors_dir(os.path.join(ckpt, ck.HF_DIR))
    initial = safetensors_dir(tiny_dense_dir)
    assert set(pushed) == set(exported) == set(initial)  # transformers names, no base_layer / lora_A
    peft_merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32),
        os.path.join(ckpt, ck.ADAPTER_DIR),
    ).merge_and_unload()
    expected = peft_merged.state_dict()
    adapted = {k for k in initial if any(f".{t}." in k for t in LORA.target_modules)}
    assert len(adapted) == 14
    for k in initial:
        torch.testing.assert_close(pushed[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)
        assert torch.equal(pushed[k], exported[k]), k
        # The step moved the adapted layers only (the base stays frozen under every stage).
        assert torch.equal(pushed[k], initial[k]) == (k not in adapted), k


def test_checkpoint_resumes_the_adapter_and_its_optimizer(tiny_dense_dir: str, tokenizer, tmp_path) -> None:
    """ZeRO-3: a LoRA checkpoint restores adapter and optimizer state; the next step after loading
    leaves the weights exactly where the run that never stopped left them."""
    w = lora_worker(tiny_dense_dir, zero_stage=3, lr=1e-2)
    try:
        w.train_step(make_groups(tokenizer), version=0)
        w.save_checkpoint(str(tmp_path / "step_000001"), step=1, version=1)
        w.train_step(make_groups(tokenizer, seed=2), version=1)
        continued = dict(w.full_named_tensors(torch.float32))
    finally:
        w.close()
    w2 = lora_worker(tiny_dense_dir, zero_stage=3, lr=1e-2)
    try:
        assert w2.load_checkpoint(str(tmp_path)) == (1, 1)
        w2.train_step(make_groups(tokenizer, seed=2), version=1)
        resumed = dict(w2.full_named_tensors(torch.float32))
    finally:
        w2.close()
    assert set(resumed) == set(continued)
    for k in continued:
        assert torch.equal(resumed[k], continued[k]), k


# --------------------------------------------------------------------------------------------------
# The key test: the engine serves what the trainer trained
# --------------------------------------------------------------------------------------------------


async def test_pushed_adapter_reaches_the_engine(tiny_dense_dir: str, tokenizer, tmp_path, engine) -> None:
    """One LoRA step (ZeRO-1, shared-prefix forward, KL to the adapters-off reference), a push to the
    session's vLLM engine: the engine's logprobs equal the trainer's within TOL and are more than 10 x
    TOL away from the base model's; the reference is exactly the base model."""
    from transformers import AutoModelForCausalLM

    from slime.core.types import SamplingParams

    base = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32).eval()
    prompt = tokenizer.encode(PROMPT)
    w = lora_worker(tiny_dense_dir, lr=5e-2, algo=algo_cfg(kl_coef=0.1))
    try:
        w.train_step(make_groups(tokenizer), version=0)
        assert w.forward.shared_prefix_forwards > 0
        manifest = publish_files(w, engine.version + 1, str(tmp_path / "weights"), 1)
        await engine.update_weights(manifest)
        try:
            out = await engine.generate(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=3))
            ids = prompt + out.token_ids
            trainer = token_logprobs(w.policy, ids, len(prompt))
            frozen = token_logprobs(base, ids, len(prompt))
            print(
                f"engine vs trainer {max_gap(out.logprobs, trainer):.2e}, base vs trainer {max_gap(frozen, trainer):.2e}"
            )
            assert max_gap(out.logprobs, trainer) < TOL
            assert max_gap(frozen, trainer) > 10 * TOL
            # The KL reference is the base model, computed by the policy with its adapters off.
            reference = token_logprobs(w.reference, ids, len(prompt))
            assert max_gap(reference, frozen) < 1e-5
            assert token_logprobs(w.policy, ids, len(prompt)) == trainer  # the adapters are back on
        finally:
            await restore_weights(engine, tiny_dense_dir)
        # Training continues on the unmerged adapter: a second step (after the reference pass
        # toggled the adapters off and on) moves the adapter again, and the KL term is now live.
        before = {n: p.detach().clone() for n, p in w.policy.module.named_parameters()}
        metrics = w.train_step(make_groups(tokenizer, seed=1), version=1)
        assert metrics["kl"] > 0
        after = dict(w.policy.module.named_parameters())
        moved = {n for n in before if not torch.equal(before[n], after[n])}
        assert moved == adapter_names(w.policy.module)
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# The other supported combinations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"zero_stage": 2, "gradient_checkpointing": True, "share_prefix": False},
        {"zero_stage": 3, "algo": algo_cfg(advantage="gae", name="ppo")},
        {"zero_stage": 1, "dtype": "bfloat16"},
    ],
    ids=["zero2-gradient-checkpointing", "zero3-ppo-critic", "bf16"],
)
def test_supported_combinations_train_the_adapters(kw, tiny_dense_dir: str, tokenizer) -> None:
    from slime.core.model import has_native_bf16

    if kw.get("dtype") == "bfloat16" and not has_native_bf16(cuda=False):
        pytest.skip("bf16 falls back to fp32 on this CPU")
    w = lora_worker(tiny_dense_dir, lr=1e-2, **kw)
    try:
        initial = dict(w.full_named_tensors(torch.float32))
        metrics = w.train_step(make_groups(tokenizer), version=0)
        assert metrics["grad_norm"] > 0
        if "algo" in kw:
            assert w.critic is not None and metrics["critic/grad_norm"] > 0  # the critic trains in full
        after = dict(w.full_named_tensors(torch.float32))
        moved = {k for k in after if not torch.equal(after[k], initial[k])}
        assert len(moved) == 14 and all(any(f".{t}." in k for t in LORA.target_modules) for k in moved)
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# The real loop
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_steps_of_the_real_loop_with_lora(tmp_path, ray_cluster) -> None:
    """`+experiment=tiny model.lora.r=8` through Ray, vLLM and DeepSpeed: two steps, and the last
    checkpoint's adapter, merged by peft, equals its hf/ export."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from slime.core import checkpoint as ck

    rows = api.run(["+experiment=tiny", "model.lora.r=8", "trainer.steps=2"], run_dir=str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["grad_norm"] > 0 for r in rows)
    ckpt = ck.latest_checkpoint(str(tmp_path / "checkpoints"))
    assert ckpt is not None
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, ck.HF_DIR), dtype=torch.float32)
    adapter = os.path.join(ckpt, ck.ADAPTER_DIR)
    base_dir = PeftConfig.from_pretrained(adapter).base_model_name_or_path  # the run's model dir
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    initial = {k: v.clone() for k, v in base.state_dict().items()}  # merge_and_unload merges in place
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    ours, theirs = hf.state_dict(), merged.state_dict()
    assert set(ours) == set(theirs)
    exported_dtype = safetensors_dir(os.path.join(ckpt, ck.HF_DIR))["model.norm.weight"].dtype  # model.dtype
    for k in ours:
        # Each side merges in fp32 and rounds to model.dtype once, but ours merged the bf16-trained
        # weights: with bf16 (where native) they may differ by one bf16 step (2^-9 for |w| < 0.5).
        bf16 = exported_dtype == torch.bfloat16
        expected = theirs[k].to(exported_dtype).float()
        torch.testing.assert_close(ours[k], expected, rtol=0, atol=2e-3 if bf16 else 1e-6, msg=k)
    moved = [k for k in ours if not torch.equal(theirs[k], initial[k])]
    assert len(moved) == 14, moved  # the adapted linears of both layers
