"""benchmarks/vs_trl.py: both frameworks get the identical workload (settings, prompt tokens, reward
through each side's own path), and a tiny run of the whole benchmark prints its table (slow)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json

import pytest

from benchmarks import vs_trl
from envs.base import Action
from envs.reward_fn import RewardFnEnv
from rollout.chat import ChatFormat
from slime.api import compose_config
from slime.core.types import Task

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def workload() -> vs_trl.Workload:
    return vs_trl.Workload(model="tiny_dense", steps=3, cores=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, workload: vs_trl.Workload) -> str:
    path = tmp_path_factory.mktemp("vs_trl") / "prompts.jsonl"
    rows = vs_trl.make_prompts(workload.steps * workload.prompts_per_step)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_settings_match(workload: vs_trl.Workload, data: str, tmp_path) -> None:
    for staleness in (0, 1):
        cfg = compose_config(vs_trl.slime_overrides(workload, data, staleness), str(tmp_path))
        trl = vs_trl.trl_config(workload, str(tmp_path / "trl"))
        assert cfg.buffer.max_staleness == staleness
        assert cfg.rollout.group_size == trl.num_generations == workload.group_size
        per_step = trl.per_device_train_batch_size * trl.gradient_accumulation_steps
        assert cfg.trainer.batch_groups * cfg.rollout.group_size == per_step == workload.completions_per_step
        assert trl.steps_per_generation == trl.gradient_accumulation_steps  # one optimizer step per batch
        assert cfg.trainer.micro_batch_size == trl.per_device_train_batch_size
        assert cfg.rollout.max_tokens_per_turn == trl.max_completion_length and cfg.rollout.max_turns == 1
        assert cfg.rollout.temperature == trl.temperature and cfg.rollout.top_p == trl.top_p == 1.0
        assert cfg.trainer.lr == trl.learning_rate and cfg.trainer.warmup_steps == trl.warmup_steps == 0
        assert tuple(cfg.trainer.betas) == (trl.adam_beta1, trl.adam_beta2)
        assert cfg.trainer.weight_decay == trl.weight_decay == 0.0
        assert cfg.trainer.grad_clip == trl.max_grad_norm
        assert cfg.trainer.steps == trl.max_steps
        assert cfg.trainer.dtype == cfg.model.dtype == trl.model_init_kwargs["dtype"] == "float32"
        assert not trl.bf16 and not trl.gradient_checkpointing and not cfg.trainer.gradient_checkpointing
        algo = cfg.algorithm
        assert algo.clip_low == algo.clip_high == trl.epsilon and trl.epsilon_high is None
        assert algo.kl_coef == trl.beta == 0.0 and algo.entropy_coef == 0.0
        assert algo.ppo_epochs == trl.num_iterations == 1 and algo.num_minibatches == 1
        assert algo.advantage == "grpo" and algo.normalize_adv_std and trl.scale_rewards == "group"
        assert algo.loss_agg == "seq_mean" and trl.loss_type == "grpo"
        assert not cfg.env.dataset.shuffle and not trl.shuffle_dataset
        assert cfg.env.kwargs["reward"] == ["benchmarks.vs_trl:reward"]


def test_prompt_tokens_match(tokenizer) -> None:
    """slime's chat format renders each prompt to the token ids TRL's apply_chat_template call gives."""
    chat = ChatFormat(tokenizer)
    for row in vs_trl.make_prompts(8):
        trl_ids = tokenizer.apply_chat_template(
            conversation=[row["prompt"]], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"][0]
        assert chat.initial_prompt_ids(row["prompt"]) == list(trl_ids)


def test_reward_is_the_same_on_both_paths() -> None:
    """The function TRL calls directly gives what slime's reward_fn environment computes from it."""
    rows = vs_trl.make_prompts(4)
    env = RewardFnEnv(reward="benchmarks.vs_trl:reward")
    for row in rows:
        task = Task(id=row["id"], prompt=row["prompt"], env_args={"answer": row["answer"]})
        for reply in (
            f"The answer is {row['answer']}.",
            f"{row['answer']} is it? No: {int(row['answer']) + 1}",
            "",
        ):
            asyncio.run(env.reset(task))
            slime = asyncio.run(env.step(Action(content=reply))).reward
            trl = vs_trl.reward(
                prompts=[row["prompt"]],
                completions=[[{"role": "assistant", "content": reply}]],
                answer=[row["answer"]],
            )
            assert slime == trl[0]
    assert vs_trl.reward(completions=["1,000 then 12"], answer=["12"]) == [1.0]
    assert vs_trl.reward(completions=["12 then 1,000"], answer=["12"]) == [0.0]
    assert vs_trl.reward(completions=["no number"], answer=["3"]) == [0.0]


def test_prompts_are_fixed_and_distinct() -> None:
    rows = vs_trl.make_prompts(16)
    assert rows == vs_trl.make_prompts(16)
    assert len({r["id"] for r in rows}) == 16
    assert all(r["prompt"][0]["content"].endswith(vs_trl.INSTRUCTION) for r in rows)


@pytest.mark.slow
def test_tiny_run_prints_the_table(tmp_path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        vs_trl.main(
            [
                "--model=tiny_dense",
                "--steps=1",
                "--prompts-per-step=2",
                "--group-size=2",
                "--max-new-tokens=8",
                f"--out={tmp_path / 'runs.json'}",
                f"--png={tmp_path / 'reward.png'}",
            ]
        )
    table = out.getvalue()
    for name in vs_trl.FRAMEWORKS:
        assert any(line.startswith(name) for line in table.splitlines()), table
    assert "completions/s slime-async / trl" in table
    assert "overlap: sync phases" in table and "overlap: each sync phase had every core" in table
    assert "left out of the trainer's forward and backward" in table
    assert "same prompts in the same order: yes" in table
    assert (tmp_path / "reward.png").stat().st_size > 0
    runs = json.loads((tmp_path / "runs.json").read_text())["runs"]
    assert [r["framework"] for r in runs] == list(vs_trl.FRAMEWORKS)
    assert all(r["peak_rss_gb"] > 0 and len(r["steps"]) == 1 for r in runs)
