"""The DeepSpeed trainer on tiny models: real DeepSpeed (gloo, CPU), real transformers models.

In-process tests drive `TrainerRank` with world size 1 (one process group for the module, torn
down at the end so later tests see a clean process); `test_ranks_*` runs `TrainerRanks` with two Ray
ranks and compares against one rank. No op is JIT-compiled (the trainer avoids DeepSpeed's CPU Adam
and shared-memory comm op).
"""

from __future__ import annotations

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

from slime.core.types import Group, Task, Trajectory

MODEL_CFG = tiny_model_cfg()


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _process_group(in_process_trainer) -> None:
    """In-process workers share one process group, released after the module (tests/conftest.py)."""


def full_state(w) -> dict[str, torch.Tensor]:
    """The worker's full weights under checkpoint names, fp32, via the export path's generator."""
    return {k: v.clone() for k, v in w.full_named_tensors(torch.float32)}


def checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a model dir's safetensors files (the engines' format)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), "pt") as sf:
                for k in sf.keys():  # noqa: SIM118 - safe_open is not a mapping
                    out[k] = tuple(sf.get_slice(k).get_shape())
    return out


def manifest_shapes(manifest) -> dict[str, tuple[int, ...]]:
    from slime.core.transport_files import read_weights

    return {k: tuple(v.shape) for k, v in read_weights(manifest)}


METRIC_KEYS = {
    "loss/policy",
    "entropy",
    "clip_frac",
    "is_ratio/mean",
    "is_ratio/max",
    "masked_frac",
    "adv/mean",
    "adv/std",
    "mismatch/logprob_abs",
    "grad_norm",
    "lr",
    "time/train_s",
    "perf/train_tokens_per_s",
    "train/tokens",
    "train/sequences",
}


# --------------------------------------------------------------------------------------------------
# (a) one rank, dense: training changes weights, metrics, export per ZeRO stage, checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dense_step_and_export(stage: int, tiny_dense_dir: str, tokenizer, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    w = new_worker(tiny_dense_dir, trainer_cfg(zero_stage=stage), algo_cfg())
    try:
        before = full_state(w)
        groups = make_groups(tokenizer)
        metrics = w.train_step(groups, version=0)
        assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
        assert all(isinstance(v, float) and v == v for v in metrics.values()), metrics
        assert metrics["train/sequences"] == 8.0
        assert metrics["train/tokens"] == sum(len(t.token_ids) for g in groups for t in g.trajectories)
        assert metrics["grad_norm"] > 0 and metrics["lr"] == pytest.approx(1e-3)
        assert 9.0 < metrics["entropy"] < 11.0  # near log(49152) = 10.8 for a random model
        after = full_state(w)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(changed) == len(before), set(before) - set(changed)

        manifest = publish_files(w, 1, str(tmp_path / "weights"), 1)
        assert len(manifest.files) > 1  # 1 MiB buckets split the 12 MiB model
        shapes = manifest_shapes(manifest)
        assert shapes == checkpoint_shapes(tiny_dense_dir)
        # Dense: checkpoint names are the state_dict names minus the tied lm_head.
        ref = AutoModelForCausalLM.from_pretrained(tiny_dense_dir).state_dict()
        assert set(shapes) == set(ref) - {"lm_head.weight"}
        assert all(shapes[k] == tuple(ref[k].shape) for k in shapes)
        from slime.core.transport_files import read_weights

        exported = dict(read_weights(manifest))
        assert all(torch.equal(exported[k], after[k]) for k in exported)  # fp32 model: exact
    finally:
        w.close()


async def test_checkpoint_roundtrip_and_hf_export(tiny_dense_dir: str, tokenizer, tmp_path, engine) -> None:
    """ZeRO-3 (the gathering path). The hf export holds exactly the trainer's parameters (not the
    initial ones), loads in transformers with the trainer's logits and in vLLM with the trainer's
    logprobs. load_checkpoint restores weights, optimizer state and counters: the step after it
    leaves the weights exactly where the run that never stopped left them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slime.core import checkpoint as ck
    from slime.core.types import SamplingParams, WeightManifest

    tcfg = trainer_cfg(zero_stage=3, warmup_steps=4)
    w = new_worker(tiny_dense_dir, tcfg, algo_cfg())
    try:
        w.train_step(make_groups(tokenizer, seed=1), version=0)
        ckpt = w.save_checkpoint(str(tmp_path / "step_000001"), step=1, version=1)
        assert ck.read_state(ckpt)["version"] == 1
        assert ck.resolve_checkpoint(str(tmp_path)) == ckpt
        hf = os.path.join(ckpt, ck.HF_DIR)
        assert os.path.exists(os.path.join(hf, "tokenizer.json"))
        saved = full_state(w)
        exported = safetensors_dir(hf)
        initial = safetensors_dir(tiny_dense_dir)
        assert set(exported) == set(saved) == set(initial)
        for k in exported:
            assert torch.equal(exported[k], saved[k]), k  # fp32: exactly the trainer's parameters
            assert not torch.equal(exported[k], initial[k]), k  # ... after the step, not before it
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        assert AutoTokenizer.from_pretrained(hf).encode("hello") == tokenizer.encode("hello")
        ids = torch.tensor([tokenizer.encode("Once upon a time there was a cat")])
        with torch.no_grad():
            trainer_logits = w.policy(input_ids=ids, use_cache=False).logits
            hf_logits = model(input_ids=ids).logits
        torch.testing.assert_close(hf_logits, trainer_logits, rtol=1e-5, atol=1e-5)

        # vLLM loads the export's weight file (the session's float32 engine on the same model).
        prompt = tokenizer.encode("Once upon a time there was a cat")
        files = sorted(os.path.join(hf, f) for f in os.listdir(hf) if f.endswith(".safetensors"))
        num_bytes = sum(t.numel() * t.element_size() for t in exported.values())
        await engine.update_weights(
            WeightManifest(engine.version + 1, "files", num_bytes, len(exported), files=files)
        )
        try:
            out = await engine.generate(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=3))
            ours = token_logprobs(w.policy, prompt + out.token_ids, len(prompt))
            assert max(abs(a - b) for a, b in zip(out.logprobs, ours, strict=True)) < 1e-3
            # The check can tell: the initial weights give other logprobs for these tokens.
            before = AutoModelForCausalLM.from_pretrained(tiny_dense_dir, dtype=torch.float32).eval()
            lp0 = token_logprobs(before, prompt + out.token_ids, len(prompt))
            assert max(abs(a - b) for a, b in zip(lp0, ours, strict=True)) > 1e-2
        finally:
            await restore_weights(engine, tiny_dense_dir)

        next_groups = make_groups(tokenizer, seed=2)
        m_cont = w.train_step(next_groups, version=1)
        after_cont = full_state(w)
    finally:
        w.close()

    w2 = new_worker(tiny_dense_dir, tcfg, algo_cfg())
    try:
        assert w2.load_checkpoint(str(tmp_path)) == (1, 1)
        restored = full_state(w2)
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
        # Same optimizer state and LR schedule position => the same next step, to the bit.
        m_resumed = w2.train_step(next_groups, version=1)
        assert m_resumed["lr"] == m_cont["lr"] == pytest.approx(1e-3 * 2 / 4)
        assert m_resumed["loss/policy"] == pytest.approx(m_cont["loss/policy"], abs=1e-6)
        assert m_resumed["grad_norm"] == pytest.approx(m_cont["grad_norm"], rel=1e-5)
        after_resumed = full_state(w2)
        for k in after_cont:
            assert torch.equal(after_resumed[k], after_cont[k]), k
    finally:
        w2.close()


def test_micro_batching_does_not_change_the_step(tiny_dense_dir: str, tokenizer) -> None:
    """The loss and gradient of one optimizer step do not depend on how the batch is cut into
    micro-batches, for every aggregation, nor on gradient checkpointing (lr=0 keeps the weights
    fixed between the runs)."""
    acfg = algo_cfg()
    w = new_worker(tiny_dense_dir, trainer_cfg(lr=0.0, micro_batch_size=8), acfg)
    groups = make_groups(tokenizer, num_groups=3, n=3, seed=3)
    try:
        before = full_state(w)
        for agg in ("token_mean", "seq_mean", "seq_sum_norm"):
            acfg.loss_agg = agg
            runs = []
            for mbs in (16, 2, 1):
                w.cfg.micro_batch_size = mbs
                runs.append(w.train_step(groups, version=0))
            for r in runs[1:]:
                assert r["loss/policy"] == pytest.approx(runs[0]["loss/policy"], rel=1e-5, abs=1e-7), agg
                assert r["grad_norm"] == pytest.approx(runs[0]["grad_norm"], rel=1e-4), agg
        # Gradient checkpointing recomputes activations: same loss and gradient (it cannot share the
        # prefix cache: the recomputation would append to it again; the config check forbids both).
        w.forward.share_prefix = False
        w.policy.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        recomputed = w.train_step(groups, version=0)
        assert recomputed["loss/policy"] == pytest.approx(runs[-1]["loss/policy"], rel=1e-5, abs=1e-7)
        assert recomputed["grad_norm"] == pytest.approx(runs[-1]["grad_norm"], rel=1e-4)
        after = full_state(w)
        assert all(torch.equal(before[k], after[k]) for k in before)  # the LR set per step is honoured
    finally:
        w.close()


def test_bf16_path(tiny_dense_dir: str, tokenizer, tmp_path, monkeypatch) -> None:
    """DeepSpeed's bf16 mode (bf16 weights, fp32 master copy) as on AMX CPUs and GPUs; forced here,
    where this CPU only emulates bf16. Exports in model.dtype (bfloat16)."""
    import slime.core.model

    monkeypatch.setattr(slime.core.model, "has_native_bf16", lambda cuda=None: True)
    mcfg = tiny_model_cfg(dtype="bfloat16")
    w = new_worker(tiny_dense_dir, trainer_cfg(dtype="bfloat16"), algo_cfg(), mcfg)
    try:
        assert w.bf16 and next(w.policy.module.parameters()).dtype == torch.bfloat16
        metrics = w.train_step(make_groups(tokenizer, num_groups=1, n=2), version=0)
        assert metrics["grad_norm"] > 0 and metrics["loss/policy"] == metrics["loss/policy"]
        manifest = publish_files(w, 1, str(tmp_path), 64)
        from slime.core.transport_files import read_weights

        assert {v.dtype for _, v in read_weights(manifest)} == {torch.bfloat16}
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# (b) MoE under ZeRO-2 and ZeRO-3
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [2, 3])
def test_moe_step_and_export(stage: int, tiny_moe_dir: str, tokenizer, tmp_path) -> None:
    w = new_worker(tiny_moe_dir, trainer_cfg(zero_stage=stage), algo_cfg())
    try:
        before = {k: v for k, v in full_state(w).items() if ".experts." in k}
        metrics = w.train_step(make_groups(tokenizer), version=0)
        assert metrics["grad_norm"] > 0 and metrics["loss/policy"] == metrics["loss/policy"]
        after = full_state(w)
        assert any(not torch.equal(before[k], after[k]) for k in before)  # experts trained
        manifest = publish_files(w, 1, str(tmp_path / "w"), 8)
        # Checkpoint layout (per-expert tensors, as on disk and as vLLM loads), not transformers'
        # in-memory fused `experts.gate_up_proj`.
        assert manifest_shapes(manifest) == checkpoint_shapes(tiny_moe_dir)
    finally:
        w.close()


def long_prompt_groups(tokenizer, num_groups: int = 2, n: int = 4) -> list[Group]:
    """make_groups with a long system-like prefix common to every group, as agentic prompts have."""
    system = tokenizer.encode("You are a helpful assistant with tools. " * 6)
    groups = make_groups(tokenizer, num_groups=num_groups, n=n, seed=5)
    for g in groups:
        for t in g.trajectories:
            t.token_ids = system + t.token_ids
            t.loss_mask = [0] * len(system) + t.loss_mask
            t.behavior_logprobs = [0.0] * len(system) + t.behavior_logprobs
            t.versions = [-1] * len(system) + t.versions
            t.prompt_len += len(system)
    return groups


@pytest.mark.parametrize(("model", "stage"), [("dense", 0), ("dense", 2), ("moe", 1)])
def test_shared_prefix_forward_matches_the_full_forward(
    model: str, stage: int, tiny_dense_dir: str, tiny_moe_dir: str, tokenizer
) -> None:
    """Running the rows' common prefix once (its cache repeated, with gradients) gives the logits,
    loss and every parameter's gradient of the plain forward (lr=0 keeps the weights fixed between
    the steps), and the shared path did run (the forward would fall back to the plain one silently)."""
    from trainer.batching import flatten_groups, make_micro_batches
    from trainer.build import load_causal_lm

    model_dir = tiny_dense_dir if model == "dense" else tiny_moe_dir
    w = new_worker(model_dir, trainer_cfg(lr=0.0, micro_batch_size=4, zero_stage=stage), algo_cfg())
    groups = long_prompt_groups(tokenizer)
    # Per-parameter gradients come from a plain copy of the model (DeepSpeed's hooks own the
    # policy's gradients); the forward under test is the same object the worker uses.
    plain = load_causal_lm(model_dir, MODEL_CFG)
    params = list(plain.named_parameters())

    def grads(mb, share: bool) -> dict[str, torch.Tensor]:
        """Per-parameter gradients of a weighted sum of the logprobs of every loss column."""
        w.forward.share_prefix = share
        lp = w.forward.logprobs(plain, mb)  # [B, T]
        weights = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp) * mb.loss_mask
        g = torch.autograd.grad((lp * weights).sum(), [p for _, p in params], allow_unused=True)
        return {n: torch.zeros_like(p) if d is None else d for (n, p), d in zip(params, g, strict=True)}

    try:
        mbs = make_micro_batches(flatten_groups(groups), 2, w.pad_id)
        assert all(mb.shared_prefix > 40 for mb in mbs)
        for mb in mbs:
            with torch.no_grad():
                ran = w.forward.shared_prefix_forwards
                w.forward.share_prefix = True
                shared = w.forward.logits(w.policy, mb)
                assert w.forward.shared_prefix_forwards == ran + 1
                w.forward.share_prefix = False
                full = w.forward.logits(w.policy, mb)
                assert w.forward.shared_prefix_forwards == ran + 1
            assert shared.shape == full.shape
            real = mb.loss_mask > 0  # padded columns may differ; they carry no loss
            # Summation order only (float32).
            assert (shared - full)[real].abs().max() < 1e-5
            g_shared, g_full = grads(mb, True), grads(mb, False)
            assert any(g.abs().sum() > 0 for g in g_full.values())
            for n in g_full:
                torch.testing.assert_close(g_shared[n], g_full[n], rtol=1e-3, atol=1e-6, msg=n)
        runs = []
        for share in (True, False):
            w.forward.share_prefix = share
            ran = w.forward.shared_prefix_forwards
            runs.append(w.train_step(groups, version=0))
            assert (w.forward.shared_prefix_forwards > ran) == share
        assert runs[0]["loss/policy"] == pytest.approx(runs[1]["loss/policy"], rel=1e-4, abs=1e-6)
        assert runs[0]["grad_norm"] == pytest.approx(runs[1]["grad_norm"], rel=1e-3)
        assert runs[0]["grad_norm"] > 0
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# (c) learning: reward on token X raises the logprob of X
# --------------------------------------------------------------------------------------------------


def test_learns_rewarded_token(tiny_dense_dir: str, tokenizer) -> None:
    from trainer.batching import collate, flatten_groups

    prompt = tokenizer.encode("Say one word:")
    x, *others = (tokenizer.encode(t)[0] for t in (" yes", " no", " maybe", " cat"))
    w = new_worker(tiny_dense_dir, trainer_cfg(lr=3e-3), algo_cfg(loss_agg="token_mean"))

    @torch.no_grad()
    def logprob_of(token: int) -> float:
        g = Group(
            task=Task(id="q", prompt="p"),
            trajectories=[
                Trajectory(
                    "q",
                    prompt + [token],
                    [0] * len(prompt) + [1],
                    [0.0] * (len(prompt) + 1),
                    [-1] * len(prompt) + [0],
                    len(prompt),
                )
            ],
        )
        mb = collate(flatten_groups([g]), w.pad_id)
        return float(w.forward.logprobs(w.policy, mb)[0, -1])

    def on_policy_groups() -> list[Group]:
        groups = []
        for g in range(2):
            trajs = []
            for tok in (x, *others):
                lp = logprob_of(tok)  # behaviour = current policy: on-policy data
                trajs.append(
                    Trajectory(
                        str(g),
                        prompt + [tok],
                        [0] * len(prompt) + [1],
                        [0.0] * len(prompt) + [lp],
                        [-1] * len(prompt) + [0],
                        len(prompt),
                        reward=1.0 if tok == x else 0.0,
                    )
                )
            groups.append(Group(task=Task(id=str(g), prompt="p"), trajectories=trajs))
        return groups

    try:
        start = logprob_of(x)
        for step in range(4):
            metrics = w.train_step(on_policy_groups(), version=step)
            assert metrics["mismatch/logprob_abs"] < 1e-4  # same model, same tokens
            assert metrics["is_ratio/mean"] == pytest.approx(1.0, abs=1e-4)
        end = logprob_of(x)
        assert end > start + 1.0, (start, end)
        assert all(logprob_of(t) < end for t in others)
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# PPO path (critic + reference model) and multi-minibatch path run
# --------------------------------------------------------------------------------------------------


def test_ppo_with_critic_reference_and_minibatches(tiny_dense_dir: str, tokenizer) -> None:
    from trainer.batching import flatten_groups, minibatch_split

    acfg = algo_cfg(
        name="ppo",
        advantage="gae",
        loss_agg="token_mean",
        kl_coef=0.05,
        kl_mode="reward",
        kl_estimator="k3",
        lam=0.95,
        num_minibatches=2,
        ppo_epochs=2,
        critic_lr=3e-3,
    )
    w = new_worker(tiny_dense_dir, trainer_cfg(micro_batch_size=3), acfg)
    try:
        assert w.reference is not None and w.critic is not None
        batch = make_groups(tokenizer, num_groups=2, n=3)
        metrics = first = w.train_step(batch, version=0)
        assert metrics["train/optimizer_steps"] == 4.0
        # Averaged over the 4 updates: the first sees policy == reference, later ones have moved.
        assert 0.0 < metrics["kl"] < 1.0
        assert metrics["adv/mean"] == pytest.approx(0.0, abs=1e-5)  # whitened over the batch
        assert metrics["adv/std"] == pytest.approx(1.0, rel=1e-2)
        assert metrics["loss/value"] > 0 and metrics["critic/grad_norm"] > 0
        metrics = w.train_step(make_groups(tokenizer, num_groups=2, n=3, seed=5), version=1)
        assert metrics["kl"] > 0 and metrics["loss/value"] > 0

        # The critic learns: back on the first batch, its value loss is well below the first time
        # (when the zero-initialised head predicted 0 everywhere).
        again = [w.train_step(batch, version=2 + i)["loss/value"] for i in range(2)]
        assert max(again) < 0.5 * first["loss/value"], (first["loss/value"], again)

        # Minibatches are a seeded shuffle of the batch, not its order: a different split than the
        # unshuffled one, the same one again for the same step.
        refs = flatten_groups(make_groups(tokenizer, num_groups=4, n=3, seed=9))

        def split() -> list[list[int]]:
            plan, _ = w._plan_micro_batches(refs, set())
            return [sorted(int(i) for s in mini if not s.mb.dummy for i in s.mb.seq_index) for mini in plan]

        shuffled = split()
        assert sorted(i for mini in shuffled for i in mini) == list(range(len(refs)))
        assert shuffled != [[r.index for r in mini] for mini in minibatch_split(refs, 2)]
        assert split() == shuffled
    finally:
        w.close()


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_zero_advantage_sequences_are_left_out_without_changing_the_step(
    num_minibatches: int, tiny_dense_dir: str, tokenizer
) -> None:
    """Sequences of groups whose rewards are all equal have advantage 0 and so loss and gradient 0:
    the step leaves them out of its forward and backward, and loss, gradient norm, advantage
    moments and counts equal those of the step that computes them (lr=0 keeps the weights fixed
    between the runs; two minibatches check that nothing changes minibatch). seq_sum_norm without a
    fixed constant, a KL term or an entropy bonus turn the skip off."""

    def with_flat_rewards(flat: dict[int, float]) -> list[Group]:
        groups = make_groups(tokenizer, num_groups=4, n=3, seed=5)
        for g, r in flat.items():
            for t in groups[g].trajectories:
                t.reward = r
        return groups

    acfg = algo_cfg(num_minibatches=num_minibatches)
    w = new_worker(tiny_dense_dir, trainer_cfg(lr=0.0, micro_batch_size=2), acfg)
    groups = with_flat_rewards({0: 1.0, 2: 0.0})
    try:
        assert w.skip_zero_advantage
        for agg in ("token_mean", "seq_mean"):
            acfg.loss_agg = agg
            runs, flops = {}, {}
            for skip in (False, True):
                w.skip_zero_advantage = skip
                w.step = 0  # the same minibatch shuffle (seeded by the step)
                runs[skip] = w.train_step(groups, version=0)
                flops[skip] = w.forward.flops_done
            full, lean = runs[False], runs[True]
            assert full["train/skipped_sequences"] == 0 and lean["train/skipped_sequences"] == 6
            assert flops[True] < 0.75 * flops[False]  # half the sequences, the prompts shared
            for key in ("train/loss_tokens", "train/tokens", "train/sequences"):
                assert lean[key] == full[key], key
            for key in ("loss/policy", "adv/mean", "adv/std"):
                assert lean[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), (agg, key)
            assert lean["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-4), agg
        # Nothing to learn from: every sequence left out, one dummy micro-batch keeps the step.
        flat = w.train_step(with_flat_rewards({0: 1.0, 1: 1.0, 2: 0.0, 3: 0.0}), version=0)
        assert flat["train/skipped_sequences"] == 12 and flat["train/sequences"] == 12
        assert flat["grad_norm"] == 0.0 and flat["loss/policy"] == 0.0
    finally:
        w.close()

    # The same update with a real learning rate: two workers from one seed, skip off and on.
    states = []
    for skip in (False, True):
        w = new_worker(tiny_dense_dir, trainer_cfg(lr=1e-2, micro_batch_size=2), algo_cfg())
        try:
            w.skip_zero_advantage = skip
            initial = full_state(w)
            w.train_step(groups, version=0)
            states.append(full_state(w))
        finally:
            w.close()
    assert max(float((states[0][k] - v).abs().max()) for k, v in initial.items()) > 1e-3
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=0, atol=1e-5)


def test_the_zero_advantage_skip_is_off_where_it_would_change_the_update() -> None:
    """Only where every loss term is proportional to the advantage (trainer/objective.py)."""
    from trainer.objective import skips_zero_advantage

    assert skips_zero_advantage(algo_cfg(), router_losses=False, max_response_len=0)
    assert skips_zero_advantage(algo_cfg(loss_agg="seq_sum_norm"), router_losses=False, max_response_len=64)
    assert not skips_zero_advantage(
        algo_cfg(loss_agg="seq_sum_norm"), router_losses=False, max_response_len=0
    )
    assert not skips_zero_advantage(algo_cfg(kl_coef=0.1), router_losses=False, max_response_len=0)
    assert not skips_zero_advantage(algo_cfg(entropy_coef=0.01), router_losses=False, max_response_len=0)
    assert not skips_zero_advantage(algo_cfg(), router_losses=True, max_response_len=0)
    assert not skips_zero_advantage(
        algo_cfg(name="ppo", advantage="gae"), router_losses=False, max_response_len=0
    )


def test_kl_reward_mode_changes_the_advantages(tiny_dense_dir: str, tokenizer, monkeypatch) -> None:
    """With kl_mode=reward, the KL to the reference (nonzero once the policy has moved) is taken from
    the rewards before the advantages: they differ from kl_mode=loss, whose Dr. GRPO advantages are
    exactly reward minus its group's mean."""
    import trainer.objective as obj

    captured: list[dict[int, float]] = []
    assign = obj.assign_sequence_advantages

    def spy(plan, seq_adv) -> None:
        assign(plan, seq_adv)
        adv: dict[int, float] = {}
        for s in (s for mini in plan for s in mini if not s.mb.dummy):
            for row, seq in enumerate(s.mb.seq_index.tolist()):
                adv[seq] = float(s.adv[row][s.mb.loss_mask[row] > 0][0])
        captured.append(adv)

    monkeypatch.setattr(obj, "assign_sequence_advantages", spy)
    acfg = algo_cfg(name="dr_grpo", advantage="dr_grpo", kl_coef=0.5, kl_mode="reward", kl_estimator="k1")
    w = new_worker(tiny_dense_dir, trainer_cfg(lr=1e-2), acfg)
    try:
        w.train_step(make_groups(tokenizer, seed=11), version=0)  # the policy leaves the reference
        w.cfg.lr = 0.0  # the same weights for both modes below
        batch = make_groups(tokenizer, seed=12)
        w.train_step(batch, version=1)
        acfg.kl_mode = "loss"
        w.train_step(batch, version=2)
        kl_reward, kl_loss = captured[1], captured[2]
        rewards = [t.reward for g in batch for t in g.trajectories]
        n = len(batch[0].trajectories)
        expected = [r - sum(rewards[i - i % n : i - i % n + n]) / n for i, r in enumerate(rewards)]
        assert [kl_loss[i] for i in range(len(rewards))] == pytest.approx(expected, abs=1e-6)
        assert max(abs(kl_reward[i] - kl_loss[i]) for i in kl_loss) > 1e-3
        for g in range(len(batch)):  # still centred per group
            assert sum(kl_reward[i] for i in range(g * n, g * n + n)) == pytest.approx(0.0, abs=1e-5)
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# (d) two Ray ranks give the same step as one rank
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "seq_sum_norm"])
async def test_ranks_two_ranks_match_one_rank(
    loss_agg: str, tiny_dense_dir, tokenizer, ray_cluster, tmp_path
) -> None:
    """Two Ray ranks take the same steps as one rank, for every loss aggregation: the loss is
    normalised over the global batch (units and the seq_sum_norm constant all-reduced)."""
    from trainer.actors import TrainerRanks
    from trainer.rank import TrainerSpec

    acfg = algo_cfg(loss_agg=loss_agg)
    # Groups of 6 and 2 trajectories: the ranks get 8 and 4 sequences (4 and 2 micro-batches), so
    # one runs dummy micro-batches; advantages are computed per group size.
    batches = [
        make_groups(tokenizer, num_groups=1, n=6, seed=s)
        + make_groups(tokenizer, num_groups=3, n=2, seed=s + 1)
        for s in (10, 20)
    ]
    # The second batch's group of 6 has one reward: its zero-advantage sequences are left out, so
    # rank 0 trains 2 sequences (and runs a dummy) while rank 1 trains 4.
    for t in batches[1][0].trajectories:
        t.reward = 1.0
    one = new_worker(tiny_dense_dir, trainer_cfg(zero_stage=3, micro_batch_size=2), acfg)
    try:
        ref = [one.train_step(b, version=i) for i, b in enumerate(batches)]
        ref_weights = full_state(one)
    finally:
        one.close()

    ranks = TrainerRanks(
        TrainerSpec(
            tiny_dense_dir, MODEL_CFG, trainer_cfg(zero_stage=3, micro_batch_size=2, num_ranks=2), acfg, 0
        )
    )
    try:
        info = await ranks.setup()
        assert [i["rank"] for i in info] == [0, 1]
        got = [await ranks.train_step(b, version=i) for i, b in enumerate(batches)]
        # (seq_sum_norm without max_response_len takes its constant from the trained sequences: no skip)
        assert [g["train/skipped_sequences"] for g in got] == [
            0.0,
            0.0 if loss_agg == "seq_sum_norm" else 6.0,
        ]
        for r, g in zip(ref, got, strict=True):
            assert g["train/sequences"] == r["train/sequences"] and g["train/tokens"] == r["train/tokens"]
            assert g["train/skipped_sequences"] == r["train/skipped_sequences"]
            for key in (
                "loss/policy",
                "adv/mean",
                "adv/std",
                "entropy",
                "is_ratio/mean",
                "mismatch/logprob_abs",
            ):
                assert g[key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), key
            assert g["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3)
            assert g["is_ratio/max"] == pytest.approx(r["is_ratio/max"], rel=1e-4)
        await ranks.open_weights("files", str(tmp_path / "w"), 4, "gloo", 60)
        manifest = await ranks.publish_weights(2)
        from slime.core.transport_files import read_weights

        exported = dict(read_weights(manifest))
        assert set(exported) == set(ref_weights)
        for k, v in exported.items():
            torch.testing.assert_close(v, ref_weights[k], rtol=0, atol=2e-4)
        with pytest.raises(RuntimeError, match=r"trainer rank \d failed in train_step"):
            bad = make_groups(tokenizer, num_groups=2, n=2)
            for g in bad:
                g.trajectories[0].token_ids = g.trajectories[0].token_ids[:1]
                for name in ("loss_mask", "behavior_logprobs", "versions"):
                    setattr(g.trajectories[0], name, getattr(g.trajectories[0], name)[:1])
            await ranks.train_step(bad, version=2)
    finally:
        ranks.shutdown()
