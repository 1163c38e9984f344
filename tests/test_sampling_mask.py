"""Keep the sampling mask: tokens sampled with top-p / top-k are scored by the trainer under the same
truncated distribution the engine sampled them from (trainer/losses.py `token_logprobs_from_logits`
with `kept`; the engine records each token's support size, rollout/engines/vllm_capture.py).

Hand-computed values for the truncated logprob, entropy and gradient; the float32 vLLM engine against
the trainer's logprobs on the same weights with top-p 0.9 and top-k 20; the record's size on the wire;
and the real loop (`+experiment=tiny buffer.max_staleness=0 rollout.top_p=0.8`, float32), whose
step-0 `mismatch/logprob_abs` was 0.22 before the mask and is float32 noise with it.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from slime.core.types import SamplingParams, Trajectory
from tests.test_engine import load_hf, prompts
from trainer.batching import SeqRef, collate, trim_leading
from trainer.losses import entropy_from_logits, token_logprobs_and_entropy, token_logprobs_from_logits

# --------------------------------------------------------------------------------------- by hand


def test_truncated_logprob_entropy_and_gradient_by_hand():
    # One row, V = 4, logits ln(4), ln(3), ln(2), ln(1): softmax 0.4, 0.3, 0.2, 0.1.
    z = torch.tensor([[math.log(4), math.log(3), math.log(2), 0.0]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1])
    full = token_logprobs_from_logits(z, target)
    assert float(full) == pytest.approx(math.log(0.3))
    # kept = 2: the support is the two largest logits {4, 3}: p(1) = 3/7.
    lp = token_logprobs_from_logits(z, target, kept=torch.tensor([2]))
    assert float(lp) == pytest.approx(math.log(3 / 7))
    (grad,) = torch.autograd.grad(lp.sum(), z)
    # d log p_1 / dz = onehot(1) - p over the support, 0 outside it.
    torch.testing.assert_close(grad, torch.tensor([[-4 / 7, 1 - 3 / 7, 0.0, 0.0]], dtype=torch.float64))
    ent = entropy_from_logits(z, kept=torch.tensor([2]), targets=target)
    assert float(ent) == pytest.approx(-(4 / 7) * math.log(4 / 7) - (3 / 7) * math.log(3 / 7))
    # kept = 0 and kept >= V mean the whole vocabulary.
    for k in (0, 4, 9):
        assert float(token_logprobs_from_logits(z, target, kept=torch.tensor([k]))) == pytest.approx(
            math.log(0.3)
        )
    # A target the trainer ranks outside the support still gets a finite logprob: it joins it.
    # kept = 1 with target 1: support {0, 1} -> 3/7.
    assert float(token_logprobs_from_logits(z, target, kept=torch.tensor([1]))) == pytest.approx(
        math.log(3 / 7)
    )
    # Temperature first, then truncation (vLLM's order): T = 0.5 squares the odds: 16:9 -> 9/25.
    lp = token_logprobs_from_logits(z, target, temperature=0.5, kept=torch.tensor([2]))
    assert float(lp) == pytest.approx(math.log(9 / 25))
    # Ties at the threshold are kept (vLLM's top-k keeps them): logits 2, 1, 1, 0 with kept = 2 -> 3 tokens.
    tied = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    got = token_logprobs_from_logits(tied, torch.tensor([0]), kept=torch.tensor([2]))
    assert float(got) == pytest.approx(2.0 - math.log(math.e**2 + 2 * math.e))


def test_logprobs_and_entropy_in_one_pass_match_with_chunks(monkeypatch: pytest.MonkeyPatch):
    import trainer.losses as losses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=gen, dtype=torch.float64)
    targets = torch.randint(50, (3, 7), generator=gen)
    kept = torch.randint(0, 60, (3, 7), generator=gen)  # some rows whole, some truncated
    whole = token_logprobs_and_entropy(logits, targets, 0.8, kept)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 50 * 2)  # two rows per chunk
    chunked = token_logprobs_and_entropy(logits, targets, 0.8, kept)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole[1], entropy_from_logits(logits, 0.8, kept, targets))
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: token_logprobs_from_logits(t, targets, 0.8, kept), (x,))
    assert torch.autograd.gradcheck(lambda t: entropy_from_logits(t, 0.8, kept, targets), (x,))


def test_the_record_travels_with_the_trajectory_and_into_the_micro_batch():
    traj = Trajectory(
        task_id="t",
        token_ids=[5, 6, 7, 8, 9],
        loss_mask=[0, 0, 1, 1, 1],
        behavior_logprobs=[0.0, 0.0, -1.0, -2.0, -3.0],
        versions=[-1, -1, 3, 3, 4],
        prompt_len=2,
        sample_kept=[0, 0, 17, 0, 40000],
    )
    assert Trajectory.from_dict(traj.to_dict()) == traj
    mb = trim_leading(collate([SeqRef(traj, 0)], pad_id=0))
    assert mb.kept.tolist() == [[17, 0, 40000]] and mb.versions.tolist() == [[3, 3, 4]]
    # Compact: a pickled record costs ~3 bytes a token (small ints), the JSON record ~6.
    n = 1000
    kept = [50 + (i * 7919) % 40000 for i in range(n)]
    per_token = (len(pickle.dumps(kept)) - len(pickle.dumps([]))) / n
    print(f"sampling mask: {per_token:.2f} bytes/token pickled")
    assert per_token < 6
    with pytest.raises(ValueError, match="sample_kept has 2 entries"):
        Trajectory("t", [1, 2, 3], [0, 1, 1], [0.0] * 3, [-1, 0, 0], 1, sample_kept=[0, 1])


def test_which_requests_truncate():
    assert not SamplingParams(max_tokens=4).truncates
    assert SamplingParams(max_tokens=4, top_p=0.9).truncates
    assert SamplingParams(max_tokens=4, top_k=20).truncates
    assert not SamplingParams(max_tokens=4, top_k=-1).truncates
    assert not SamplingParams(max_tokens=4, temperature=0.0, top_p=0.5).truncates  # greedy


# ------------------------------------------------------------------------------- the vLLM engine


@pytest.fixture(scope="module")
def hf_dense(tiny_dense_dir):
    return load_hf(tiny_dense_dir)


def _trainer_logprobs(model, prompt: list[int], out, temperature: float, kept: list[int] | None):
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    k = None if kept is None else torch.tensor(kept)
    return token_logprobs_from_logits(logits, torch.tensor(out.token_ids), temperature, k)


@pytest.mark.parametrize(("top_p", "top_k"), [(0.9, -1), (1.0, 20), (0.8, 200)])
async def test_engine_and_trainer_agree_under_top_p_and_top_k(engine, tokenizer, hf_dense, top_p, top_k):
    vocab = hf_dense.config.vocab_size
    outs = []
    for i, prompt in enumerate(prompts(tokenizer, 4)):
        sp = SamplingParams(max_tokens=12, temperature=0.7, top_p=top_p, top_k=top_k)
        outs.append((prompt, await engine.generate(prompt, sp, request_id=f"mask-{top_p}-{top_k}-{i}")))
    masked, unmasked = [], []
    for prompt, out in outs:
        assert out.sample_kept is not None and len(out.sample_kept) == len(out.token_ids)
        assert all(0 < k < vocab for k in out.sample_kept), out.sample_kept
        if top_k > 0:
            assert all(k <= top_k for k in out.sample_kept)  # top-p may cut below k
        mine = _trainer_logprobs(hf_dense, prompt, out, 0.7, out.sample_kept)
        full = _trainer_logprobs(hf_dense, prompt, out, 0.7, None)
        engine_lp = torch.tensor(out.logprobs)
        masked += (mine - engine_lp).abs().tolist()
        unmasked += (full - engine_lp).abs().tolist()
    mean = sum(masked) / len(masked)
    print(
        f"top_p={top_p} top_k={top_k}: |engine - trainer| mean {mean:.2e} max {max(masked):.2e}, "
        f"without the mask mean {sum(unmasked) / len(unmasked):.3f}"
    )
    assert mean < 1e-4 and max(masked) < 1e-3, (mean, max(masked))
    assert sum(unmasked) / len(unmasked) > 1e-2  # the gap the mask closes


async def test_untruncated_requests_carry_no_record(engine, tokenizer):
    prompt = prompts(tokenizer, 1)[0]
    out = await engine.generate(prompt, SamplingParams(max_tokens=6, temperature=1.0), request_id="nomask")
    assert out.sample_kept is None


# ----------------------------------------------------------------------------------- the real loop


@pytest.mark.slow
def test_top_p_run_scores_the_distribution_it_sampled(tmp_path, ray_cluster):
    from slime import api

    fp32 = ["model.dtype=float32", "trainer.dtype=float32"]
    rows = api.run(
        ["+experiment=tiny", "buffer.max_staleness=0", "rollout.top_p=0.8", "trainer.steps=1", *fp32],
        run_dir=str(tmp_path),
    )
    # Before the mask: 0.22 (the trainer scored the whole distribution the engine had truncated); at
    # top-p 1, 4e-7. (bfloat16 engines give ~8e-4 with or without top-p.)
    print("step-0 mismatch/logprob_abs with top_p=0.8:", rows[0]["mismatch/logprob_abs"])
    assert rows[0]["mismatch/logprob_abs"] < 1e-5, rows[0]["mismatch/logprob_abs"]


async def test_the_transformers_engine_keeps_the_mask_too(tiny_dense_dir, tokenizer, hf_dense):
    from rollout.engines.hf import TransformersEngine

    eng = TransformersEngine(tiny_dense_dir, dtype="float32", max_batch_size=4)
    await eng.start()
    try:
        prompt = prompts(tokenizer, 1)[0]
        for top_p, top_k in ((0.9, -1), (1.0, 20)):
            sp = SamplingParams(max_tokens=8, temperature=0.7, top_p=top_p, top_k=top_k, seed=3)
            out = await eng.generate(prompt, sp)
            assert out.sample_kept is not None and all(
                0 < k < hf_dense.config.vocab_size for k in out.sample_kept
            )
            mine = _trainer_logprobs(hf_dense, prompt, out, 0.7, out.sample_kept)
            assert (mine - torch.tensor(out.logprobs)).abs().max() < 1e-4
        plain = await eng.generate(prompt, SamplingParams(max_tokens=4, temperature=1.0))
        assert plain.sample_kept is None
    finally:
        await eng.shutdown()
