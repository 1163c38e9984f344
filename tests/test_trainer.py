"""The DeepSpeed trainer on tiny models: real DeepSpeed (gloo, CPU), real transformers models.

In-process tests drive `TrainerWorker` with world size 1 (one process group for the module, torn
down at the end so later tests see a clean process); `test_group_*` runs `TrainerGroup` with two Ray
ranks and compares against one rank. The first DeepSpeed init in a process costs about 1.5 s; no op
is JIT-compiled (the trainer avoids DeepSpeed's CPU Adam and shared-memory comm op).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import torch

from slime.config import AlgorithmConfig, ModelConfig, TrainerConfig
from slime.types import Group, Task, Trajectory

MODEL_CFG = ModelConfig(name="tiny", source="random", dtype="float32")
WORDS = [" the", " cat", " sat", " on", " a", " mat", " and", " then", " ran", " far", " away", " home"]


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _process_group() -> Iterator[None]:
    """In-process workers share one world-size-1 process group; afterwards the group, DeepSpeed's
    comm backend, the env vars and the thread count are restored so other modules are unaffected."""
    env = dict(os.environ)
    threads = torch.get_num_threads()
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm

        ds_comm.cdb = None
    except ImportError:
        pass
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the session (reused if another module started one)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield
    if started:
        ray.shutdown()


def trainer_cfg(**kw) -> TrainerConfig:
    base = dict(steps=1, lr=1e-3, micro_batch_size=4, dtype="float32", zero_stage=1, threads_per_rank=1)
    base.update(kw)
    return TrainerConfig(**base)


def algo_cfg(**kw) -> AlgorithmConfig:
    base = dict(name="grpo", advantage="grpo", loss_agg="seq_mean", off_policy="tis")
    base.update(kw)
    return AlgorithmConfig(**base)


def make_groups(tokenizer, num_groups: int = 2, n: int = 4, seed: int = 0) -> list[Group]:
    """Groups of n trajectories: a real prompt, a response of real word tokens, random rewards and
    plausible (not on-policy) behaviour logprobs."""
    rng = random.Random(seed)
    word_ids = [tokenizer.encode(w)[0] for w in WORDS]
    groups = []
    for g in range(num_groups):
        prompt = tokenizer.encode(f"Question {g + seed}: tell me a story.")
        trajs = []
        for _ in range(n):
            response = [rng.choice(word_ids) for _ in range(rng.randrange(2, 10))]
            trajs.append(
                Trajectory(
                    task_id=str(g),
                    token_ids=prompt + response,
                    loss_mask=[0] * len(prompt) + [1] * len(response),
                    behavior_logprobs=[0.0] * len(prompt) + [-rng.uniform(9.0, 12.0) for _ in response],
                    versions=[-1] * len(prompt) + [0] * len(response),
                    prompt_len=len(prompt),
                    reward=float(rng.random()),
                )
            )
        groups.append(Group(task=Task(id=str(g), prompt="p"), trajectories=trajs))
    return groups


def new_worker(model_dir: str, tcfg: TrainerConfig, acfg: AlgorithmConfig, **kw):
    from trainer.worker import TrainerWorker, free_port

    w = TrainerWorker(0, 1, "127.0.0.1", free_port(), model_dir, MODEL_CFG, tcfg, acfg, seed=0, **kw)
    w.setup()
    return w


def full_state(w) -> dict[str, torch.Tensor]:
    """The worker's full weights under checkpoint names, fp32, via the export path's generator."""
    return {k: v.clone() for k, v in w._full_named_tensors(torch.float32)}


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
    from slime.weights import read_weights

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

        manifest = w.export_weights(1, str(tmp_path / "weights"), bucket_mb=1)
        assert len(manifest.files) > 1  # 1 MiB buckets split the 12 MiB model
        shapes = manifest_shapes(manifest)
        assert shapes == checkpoint_shapes(tiny_dense_dir)
        # Dense: checkpoint names are the state_dict names minus the tied lm_head.
        ref = AutoModelForCausalLM.from_pretrained(tiny_dense_dir).state_dict()
        assert set(shapes) == set(ref) - {"lm_head.weight"}
        assert all(shapes[k] == tuple(ref[k].shape) for k in shapes)
        from slime.weights import read_weights

        exported = dict(read_weights(manifest))
        assert all(torch.equal(exported[k], after[k]) for k in exported)  # fp32 model: exact
    finally:
        w.close()


def test_checkpoint_roundtrip_and_hf_export(tiny_dense_dir: str, tokenizer, tmp_path) -> None:
    """ZeRO-3 (the gathering path): the hf export loads in transformers with the trainer's logits,
    and load_checkpoint restores weights, optimizer state and counters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slime import checkpoint as ck

    tcfg = trainer_cfg(zero_stage=3, warmup_steps=4)
    w = new_worker(tiny_dense_dir, tcfg, algo_cfg())
    try:
        w.train_step(make_groups(tokenizer, seed=1), version=0)
        ckpt = w.save_checkpoint(str(tmp_path / "step_000001"), step=1, version=1)
        assert ck.read_state(ckpt)["version"] == 1
        assert ck.resolve_checkpoint(str(tmp_path)) == ckpt
        hf = os.path.join(ckpt, ck.HF_DIR)
        assert os.path.exists(os.path.join(hf, "tokenizer.json"))
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        assert AutoTokenizer.from_pretrained(hf).encode("hello") == tokenizer.encode("hello")
        ids = torch.tensor([tokenizer.encode("Once upon a time there was a cat")])
        with torch.no_grad():
            trainer_logits = w.engine(input_ids=ids, use_cache=False).logits
            hf_logits = model(input_ids=ids).logits
        torch.testing.assert_close(hf_logits, trainer_logits, rtol=1e-5, atol=1e-5)
        saved = full_state(w)
        next_groups = make_groups(tokenizer, seed=2)
        m_cont = w.train_step(next_groups, version=1)
    finally:
        w.close()

    w2 = new_worker(tiny_dense_dir, tcfg, algo_cfg())
    try:
        assert w2.load_checkpoint(str(tmp_path)) == (1, 1)
        restored = full_state(w2)
        assert all(torch.equal(saved[k], restored[k]) for k in saved)
        # Same optimizer state and LR schedule position => the same next step.
        m_resumed = w2.train_step(next_groups, version=1)
        assert m_resumed["lr"] == m_cont["lr"] == pytest.approx(1e-3 * 2 / 4)
        assert m_resumed["loss/policy"] == pytest.approx(m_cont["loss/policy"], abs=1e-6)
        assert m_resumed["grad_norm"] == pytest.approx(m_cont["grad_norm"], rel=1e-5)
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
        w.cfg.share_prefix = False
        w.engine.module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    import trainer.worker as tw

    monkeypatch.setattr(tw, "cpu_has_fast_bf16", lambda: True)
    from trainer.worker import TrainerWorker, free_port

    mcfg = ModelConfig(name="tiny", source="random", dtype="bfloat16")
    w = TrainerWorker(
        0, 1, "127.0.0.1", free_port(), tiny_dense_dir, mcfg, trainer_cfg(dtype="bfloat16"), algo_cfg(), 0
    )
    w.setup()
    try:
        assert w.bf16 and next(w.engine.module.parameters()).dtype == torch.bfloat16
        metrics = w.train_step(make_groups(tokenizer, num_groups=1, n=2), version=0)
        assert metrics["grad_norm"] > 0 and metrics["loss/policy"] == metrics["loss/policy"]
        manifest = w.export_weights(1, str(tmp_path), bucket_mb=64)
        from slime.weights import read_weights

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
        manifest = w.export_weights(1, str(tmp_path / "w"), bucket_mb=8)
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
    loss and gradient of the plain forward (lr=0 keeps the weights fixed between the steps)."""
    from trainer.batching import flatten_groups, make_micro_batches

    model_dir = tiny_dense_dir if model == "dense" else tiny_moe_dir
    w = new_worker(model_dir, trainer_cfg(lr=0.0, micro_batch_size=4, zero_stage=stage), algo_cfg())
    groups = long_prompt_groups(tokenizer)
    try:
        mbs = make_micro_batches(flatten_groups(groups), 2, w.pad_id)
        assert all(mb.shared_prefix > 40 for mb in mbs)
        with torch.no_grad():
            for mb in mbs:
                w.cfg.share_prefix = True
                shared = w._logits(w.engine, mb)
                w.cfg.share_prefix = False
                full = w._logits(w.engine, mb)
                assert shared.shape == full.shape
                real = mb.loss_mask > 0  # padded columns may differ; they carry no loss
                # Measured: at most 3e-7 in float32 (summation order only).
                assert (shared - full)[real].abs().max() < 1e-5
        runs = []
        for share in (True, False):
            w.cfg.share_prefix = share
            runs.append(w.train_step(groups, version=0))
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
        return float(w._logprobs(w.engine, mb)[0, -1])

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
    )
    w = new_worker(tiny_dense_dir, trainer_cfg(micro_batch_size=3), acfg)
    try:
        assert w.ref is not None and w.critic is not None
        metrics = w.train_step(make_groups(tokenizer, num_groups=2, n=3), version=0)
        assert metrics["train/optimizer_steps"] == 4.0
        # Averaged over the 4 updates: the first sees policy == reference, later ones have moved.
        assert 0.0 < metrics["kl"] < 1.0
        assert metrics["adv/mean"] == pytest.approx(0.0, abs=1e-5)  # whitened over the batch
        assert metrics["adv/std"] == pytest.approx(1.0, rel=1e-2)
        assert metrics["loss/value"] > 0 and metrics["critic/grad_norm"] > 0
        metrics = w.train_step(make_groups(tokenizer, num_groups=2, n=3, seed=5), version=1)
        assert metrics["kl"] > 0 and metrics["loss/value"] > 0
    finally:
        w.close()


# --------------------------------------------------------------------------------------------------
# (d) two Ray ranks give the same step as one rank
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_agg", ["token_mean"])
async def test_group_two_ranks_match_one_rank(
    loss_agg: str, tiny_dense_dir, tokenizer, ray_cluster, tmp_path
) -> None:
    from trainer.group import TrainerGroup

    acfg = algo_cfg(loss_agg=loss_agg)
    # Groups of 6 and 2 trajectories: the ranks get 8 and 4 sequences (4 and 2 micro-batches), so
    # one runs dummy micro-batches; advantages are computed per group size.
    batches = [
        make_groups(tokenizer, num_groups=1, n=6, seed=s)
        + make_groups(tokenizer, num_groups=3, n=2, seed=s + 1)
        for s in (10, 20)
    ]
    one = new_worker(tiny_dense_dir, trainer_cfg(zero_stage=3, micro_batch_size=2), acfg)
    try:
        ref = [one.train_step(b, version=i) for i, b in enumerate(batches)]
        ref_weights = full_state(one)
    finally:
        one.close()

    group = TrainerGroup(
        tiny_dense_dir, MODEL_CFG, trainer_cfg(zero_stage=3, micro_batch_size=2, num_ranks=2), acfg, 0
    )
    try:
        info = await group.setup()
        assert [i["rank"] for i in info] == [0, 1]
        got = [await group.train_step(b, version=i) for i, b in enumerate(batches)]
        for r, g in zip(ref, got, strict=True):
            assert g["train/sequences"] == r["train/sequences"] and g["train/tokens"] == r["train/tokens"]
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
        manifest = await group.export_weights(2, str(tmp_path / "w"), bucket_mb=4)
        from slime.weights import read_weights

        exported = dict(read_weights(manifest))
        assert set(exported) == set(ref_weights)
        for k, v in exported.items():
            torch.testing.assert_close(v, ref_weights[k], rtol=0, atol=2e-4)
        assert len(await group.ping()) == 2
        with pytest.raises(RuntimeError, match=r"trainer rank \d failed in train_step"):
            bad = make_groups(tokenizer, num_groups=2, n=2)
            for g in bad:
                g.trajectories[0].token_ids = g.trajectories[0].token_ids[:1]
                for name in ("loss_mask", "behavior_logprobs", "versions"):
                    setattr(g.trajectories[0], name, getattr(g.trajectories[0], name)[:1])
            await group.train_step(bad, version=2)
    finally:
        group.shutdown()
