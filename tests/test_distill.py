"""On-policy distillation (algorithm.distill): the reverse-KL advantage by hand, the teacher's engine
scoring against transformers (at the rollout temperature too), a bad teacher refused before Ray starts,
and through the real loop a student distilling from a teacher checkpoint with its reverse KL falling.

The real-loop pair is built here in seconds from the tiny random model (the SmolLM2 tokenizer), on four
single-digit calculator problems: the teacher is fine-tuned to answer each with "Answer: <the right
number>", the student to answer with "Answer: <any digit>" (it has the format but guesses). The
comparison with RL alone is measured on SmolLM2 in docs/algorithms.md.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_trajectory

from trainer.advantages import distill_advantages
from trainer.batching import SeqRef, collate, trim_leading

NAN = float("nan")


def test_reverse_kl_advantage_by_hand():
    adv = torch.tensor([[0.5, 0.5, 0.0], [-1.0, -1.0, -1.0]])
    teacher = torch.tensor([[-1.0, -2.0, NAN], [NAN, NAN, NAN]])
    student = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # Mixed (coef 1, env_coef 1): A + (teacher - student) = 0.5 + 0.5, 0.5 - 1.0; the unscored second
    # row keeps the environment's advantage; padding 0.
    got = distill_advantages(adv, teacher, student, mask, coef=1.0, env_coef=1.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, -0.5, 0.0], [-1.0, -1.0, -1.0]]))
    # Alone (env_coef 0), coef 2: 2 * (teacher - student).
    got = distill_advantages(adv, teacher, student, mask, coef=2.0, env_coef=0.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="one shape"):
        distill_advantages(adv, teacher[:, :2], student, mask, 1.0, 1.0)


def test_the_advantage_descends_the_exact_reverse_kl():
    """One categorical over 3 tokens, every token 'sampled' once with its probability as weight: the
    expected policy gradient with A = log q - log p equals -grad KL(p || q) computed exactly."""
    q = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    z = torch.tensor([0.0, 1.0, 0.5], requires_grad=True)
    logp = torch.log_softmax(z, -1)
    kl = (logp.exp() * (logp - q)).sum()
    (exact,) = torch.autograd.grad(kl, z, retain_graph=True)
    p = logp.exp().detach()
    a = distill_advantages(
        torch.zeros(1, 3), q[None], logp.detach()[None], torch.ones(1, 3), coef=1.0, env_coef=0.0
    )[0]
    surrogate = -(p * a * logp).sum()  # the policy loss's expectation over the sampled token
    (pg,) = torch.autograd.grad(surrogate, z)
    torch.testing.assert_close(pg, exact)


def test_teacher_logprobs_travel_into_the_micro_batch(tokenizer):

    scored = make_trajectory([1, 2, 3], [4, 5])
    scored.teacher_logprobs = [0.0, 0.0, 0.0, -0.7, -0.9]
    unscored = make_trajectory([1, 2, 3], [6, 7, 8])
    mb = trim_leading(collate([SeqRef(scored, 0), SeqRef(unscored, 1)], pad_id=0))
    t = mb.teacher_logprobs.tolist()
    assert t[0][:2] == pytest.approx([-0.7, -0.9]) and math.isnan(t[0][2])  # padding
    assert all(math.isnan(x) for x in t[1])  # not scored: nan, the environment's term only


async def test_the_teacher_engine_scores_like_transformers(engine, tokenizer, tiny_dense_dir):
    from tests.test_engine import hf_logprobs, load_hf, prompts

    hf = load_hf(tiny_dense_dir)
    ids = prompts(tokenizer, 1)[0] + tokenizer.encode(" and the answer is 12")
    try:
        for temperature in (1.0, 0.7):  # vLLM's prompt logprobs skip temperature: the logit scale does it
            await engine.set_score_temperature(temperature)
            got = await engine.score(ids, request_id=f"teacher-score-{temperature}")
            ref = hf_logprobs(hf, ids[:1], ids[1:], temperature)
            assert got[0] == 0.0 and len(got) == len(ids)
            diffs = [abs(a - b) for a, b in zip(got[1:], ref, strict=True)]
            assert sum(diffs) / len(diffs) < 1e-4 and max(diffs) < 1e-3, (temperature, max(diffs))
    finally:
        await engine.set_score_temperature(1.0)  # the engine is shared by the session


def test_a_bad_teacher_is_refused_before_ray_starts(tmp_path, tiny_dense_dir, monkeypatch):
    import shutil

    import slime.controller
    from slime import api
    from slime.core.model import load_tokenizer

    def no_ray(*args, **kwargs):
        raise AssertionError("the controller (and Ray) started")

    monkeypatch.setattr(slime.controller, "run_controller", no_ray)
    base = ["+experiment=tiny", "trainer.steps=1"]
    with pytest.raises(ValueError, match=r"algorithm\.distill\.teacher=.*/nowhere"):
        api.run([*base, f"algorithm.distill.teacher={tmp_path / 'nowhere'}"], str(tmp_path / "a"))
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tiny_dense_dir, other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["<only-in-the-teacher>"])
    tok.save_pretrained(str(other))
    with pytest.raises(ValueError, match=r"algorithm\.distill\.teacher=.*another tokenizer"):
        api.run([*base, f"algorithm.distill.teacher={other}"], str(tmp_path / "b"))
    # A top-p or top-k student against a full-distribution teacher: refused, naming the keys.
    for sampling in ("rollout.top_p=0.9", "rollout.top_k=20"):
        with pytest.raises(ValueError, match=r"rollout\.top_p=1\.0 rollout\.top_k=0"):
            api.run([*base, f"algorithm.distill.teacher={tiny_dense_dir}", sampling], str(tmp_path / "c"))


def test_an_agents_truncated_episode_fails_under_a_teacher():
    """An agent's own top_p on the endpoint: the episode fails with the reason, counted like any
    failure; full-distribution and already failed episodes pass through unchanged."""
    import dataclasses

    from rollout.worker import TRUNCATED_UNDER_TEACHER, fail_if_truncated
    from slime.core.types import Status

    full = make_trajectory([1, 2], [3, 4, 5], reward=1.0)
    assert fail_if_truncated(full) is full
    assert fail_if_truncated(dataclasses.replace(full, sample_kept=[0] * 5)).status == Status.COMPLETED
    truncated = dataclasses.replace(full, sample_kept=[0, 0, 7, 9, 7])
    failed = fail_if_truncated(truncated)
    assert (failed.status, failed.reward, failed.info["error"]) == (
        Status.FAILED,
        0.0,
        TRUNCATED_UNDER_TEACHER,
    )
    assert failed.token_ids == truncated.token_ids
    already = dataclasses.replace(truncated, status=Status.FAILED, info={"error": "env raised"})
    assert fail_if_truncated(already) is already


# ------------------------------------------------------------------------------------ the real loop

DISTILL_STEPS = 10
CALCULATOR = [
    "+experiment=tiny",
    "env=calculator",
    "env.kwargs.max_turns=1",
    "env.kwargs.format_bonus=0.2",
    "env.dataset.num_tasks=4",
    "env.dataset.kwargs.digits=1",
    "env.dataset.kwargs.num_ops=1",
    "env.dataset.kwargs.word_problems=false",
    "rollout.max_tokens_per_turn=8",
    "rollout.max_total_tokens=384",
    "model.dtype=float32",
    "trainer.dtype=float32",
    "trainer.lr=1e-3",
    "buffer.max_staleness=0",
]


def build_pair(out_dir, overrides: list[str], seed: int = 0) -> tuple[str, str, dict[str, str]]:
    """Fine-tune the tiny random model on the calculator prompts of `overrides` into a student that
    answers with a random digit, and that student into a teacher that answers with the right number.
    Returns (teacher dir, student dir, prompt -> answer)."""
    import asyncio
    import os

    from envs.dataset import load_tasks
    from envs.registry import load_env_class
    from rollout.chat import ChatFormat
    from slime.api import compose_config
    from slime.core.model import load_tokenizer, resolve_model

    cfg = compose_config(overrides, str(out_dir / "compose"))
    base = resolve_model(cfg.model, cfg.cache_dir, cfg.seed)
    tok = load_tokenizer(base)
    chat = ChatFormat(tok)
    env = load_env_class(cfg.env.name)(**cfg.env.kwargs)
    turn_end = sorted(chat.stop_ids)[0]
    answers = {}
    prompts = []
    for task in load_tasks(cfg.env, cfg.seed):
        messages = asyncio.run(env.reset(task))
        prompts.append(chat.initial_prompt_ids(messages, env.tools))
        answers[task.prompt] = task.env_args["answer"]

    def finetune(pairs: list[tuple[list[int], list[int]]], name: str, start: str = base) -> str:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
        # Left-padded, so every completion ends at the last column and only the last `keep` positions
        # need logits (the vocabulary-sized head on the prompts would dominate the cost).
        width = max(len(p) + len(c) for p, c in pairs)
        keep = max(len(c) for _, c in pairs) + 1
        ids = torch.full((len(pairs), width), tok.pad_token_id or 0)
        labels = torch.full((len(pairs), keep - 1), -100)
        attn = torch.zeros((len(pairs), width), dtype=torch.long)
        for i, (p, c) in enumerate(pairs):
            ids[i, width - len(p) - len(c) :] = torch.tensor(p + c)
            attn[i, width - len(p) - len(c) :] = 1
            labels[i, keep - 1 - len(c) :] = torch.tensor(c)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(100):
            logits = model(
                input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=keep
            ).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        path = str(out_dir / name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        with open(os.path.join(path, "sft_loss.json"), "w") as f:
            json.dump({"final_loss": float(loss)}, f)
        return path

    def reply(text: str) -> list[int]:
        return tok.encode(text) + [turn_end]

    tasks = load_tasks(cfg.env, cfg.seed)
    student = finetune([(p, reply(f"Answer: {d}")) for p in prompts for d in range(10)], "student")
    # The teacher starts from the student: it ends a reply after any digit as the student does, so on
    # the student's wrong answers it disagrees about the digit only (a teacher that never saw a wrong
    # digit gives the end of such a reply a low logprob and teaches the student to ramble).
    teacher = finetune(
        [(p, reply(f"Answer: {t.env_args['answer']}")) for p, t in zip(prompts, tasks, strict=True)],
        "teacher",
        start=student,
    )
    return teacher, student, answers


@pytest.mark.slow
def test_the_student_distils_and_its_reverse_kl_falls(tmp_path, ray_cluster):
    """Distillation alone (env_coef 0) from the fine-tuned teacher's checkpoint through the real loop:
    every step logs distill/reverse_kl, and it falls (measured: 0.88 1.01 1.33 0.82 0.90 0.93 0.71 0.59
    0.49 0.69). At lr 1e-2, as an earlier version of this test had it, Adam's steps overshoot on the tiny
    model and the reverse KL rose (1.0 -> 3.5 here) with the advantage's sign right
    (docs/algorithms.md has the measurement)."""
    from slime import api

    teacher, student, _ = build_pair(tmp_path, CALCULATOR)
    rows = api.run(
        [
            *CALCULATOR,
            "model.source=pretrained",
            f"model.path={student}",
            "model.name=student",
            f"trainer.steps={DISTILL_STEPS}",
            f"algorithm.distill.teacher={teacher}",
            "algorithm.distill.env_coef=0",
        ],
        run_dir=str(tmp_path / "distill"),
    )
    rkl = [r["distill/reverse_kl"] for r in rows]
    print("reverse KL", [round(x, 3) for x in rkl], "reward", [round(r["reward/mean"], 3) for r in rows])
    assert len(rkl) == DISTILL_STEPS and all(r["rollout/worker0/teacher_s"] > 0 for r in rows)
    first, last = sum(rkl[:3]) / 3, sum(rkl[-3:]) / 3  # 16 samples a step: single steps are noisy
    assert last < first - 0.1, rkl
