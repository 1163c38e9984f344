"""MoE trainer figures, each part measured in one run (docs/moe.md has the results):

    python -m benchmarks.moe --part ep       # trainer tokens/s and memory per rank, EP size 1 vs 2, 64 and 256 experts
    python -m benchmarks.moe --part replay   # moe/routing_mismatch, mismatch/logprob_abs with and without replay
    python -m benchmarks.moe --part push     # gather + push of MoE weights vs a memory copy of the same bytes

- ep: two trainer ranks (Ray actors, gloo, ZeRO-1, fp32, one thread each) on a Qwen3-MoE shaped like
  tiny_moe but with E experts (top-8), the same batch of 8 groups x 4 sequences every step; the ranks
  are data-parallel either way, at EP size 2 each holds half of every MoE layer's experts. Reported: the
  median `perf/train_tokens_per_s` of steps 2..N, each rank's parameter bytes and peak resident memory.
- replay: `+experiment=glm5_tiny` synchronously (buffer.max_staleness=0, so the logprob mismatch is
  numerical, not policy change) with routing_replay=rollout and =none (routes returned and compared,
  not replayed), in the default precision
  (bf16 where native) and in fp32; means over the steps.
- push: glm5_tiny on two ranks with EP size 2: `publish_weights` (all-gather of the experts + bucketed
  safetensors on /dev/shm) and the engine's `update_weights` of that manifest, vs `copy_` of the same
  bytes into an already-allocated buffer.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import statistics
import tempfile
import time
from typing import Any

from benchmarks.common import config_model_dir


def _model_dir(num_experts: int, cache_dir: str) -> str:
    from slime.core.config import ModelConfig
    from slime.core.model import resolve_model

    cfg = ModelConfig(
        name=f"bench-moe-{num_experts}",
        source="random",  # type: ignore[arg-type]
        architecture="Qwen3MoeForCausalLM",
        hf_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "num_experts": num_experts,
            "num_experts_per_tok": 8,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
        },
    )
    return resolve_model(cfg, cache_dir)


def _groups(seed: int, num_groups: int = 8, n: int = 4, length: int = 96) -> list[Any]:
    import random

    from slime.core.types import Group, Task, Trajectory

    rng = random.Random(seed)
    groups = []
    for g in range(num_groups):
        prompt = [rng.randrange(100, 20000) for _ in range(length // 2)]
        trajs = []
        for _ in range(n):
            resp = [rng.randrange(100, 20000) for _ in range(length - len(prompt))]
            trajs.append(
                Trajectory(
                    task_id=str(g),
                    token_ids=prompt + resp,
                    loss_mask=[0] * len(prompt) + [1] * len(resp),
                    behavior_logprobs=[0.0] * len(prompt) + [-10.0] * len(resp),
                    versions=[-1] * len(prompt) + [0] * len(resp),
                    prompt_len=len(prompt),
                    reward=rng.random(),
                )
            )
        groups.append(Group(task=Task(id=str(g), prompt="p"), trajectories=trajs))
    return groups


async def _ep_one(model_dir: str, ep: int, steps: int) -> dict[str, Any]:
    from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from trainer.actors import TrainerRanks
    from trainer.rank import TrainerSpec

    tcfg = TrainerConfig(
        steps=steps,
        num_ranks=2,
        expert_parallel_size=ep,
        lr=1e-4,
        micro_batch_size=8,
        dtype="float32",  # type: ignore[arg-type]
        zero_stage=1,
        threads_per_rank=1,
        num_cpus_per_rank=1.0,
    )
    acfg = AlgorithmConfig(name="grpo")  # type: ignore[arg-type]
    model = ModelConfig(name="bench", source="random", dtype="float32")  # type: ignore[arg-type]
    ranks = TrainerRanks(TrainerSpec(model_dir, model, tcfg, acfg, 0))
    try:
        await ranks.setup()
        batch = _groups(0)
        rates = []
        for step in range(steps):
            m = await ranks.train_step(copy.deepcopy(batch), version=step)
            rates.append(m["perf/train_tokens_per_s"])
        mem = await ranks._all("memory")
        return {
            "ep": ep,
            "tokens_per_s": statistics.median(rates[1:]),
            "param_mb": [round(x["param_mb"], 1) for x in mem],
            "peak_rss_mb": [round(x["peak_rss_mb"]) for x in mem],
        }
    finally:
        ranks.shutdown()


async def part_ep(cache_dir: str, steps: int) -> list[dict[str, Any]]:
    out = []
    for experts in (64, 256):
        model_dir = _model_dir(experts, cache_dir)
        for ep in (1, 2):
            r = await _ep_one(model_dir, ep, steps)
            r["experts"] = experts
            print(json.dumps(r), flush=True)
            out.append(r)
    return out


def part_replay(steps: int, work: str) -> list[dict[str, Any]]:
    from slime import api

    out = []
    for precision in ("auto", "float32"):
        for replay in ("rollout", "none"):
            overrides = [
                "+experiment=glm5_tiny",
                f"trainer.steps={steps}",
                "buffer.max_staleness=0",
                f"algorithm.routing_replay={replay}",
                f"model.dtype={precision}",
                f"trainer.dtype={precision}",
            ]
            rows = api.run(overrides, run_dir=os.path.join(work, f"replay-{precision}-{replay}"))
            r = {
                "precision": precision,
                "replay": replay,
                "routing_mismatch": statistics.mean(x["moe/routing_mismatch"] for x in rows),
                "routing_mismatch_used": statistics.mean(x["moe/routing_mismatch_used"] for x in rows),
                "logprob_abs": statistics.mean(x["mismatch/logprob_abs"] for x in rows),
                "reward_first_last": (rows[0]["reward/mean"], rows[-1]["reward/mean"]),
            }
            print(json.dumps(r), flush=True)
            out.append(r)
    return out


async def push(cache_dir: str, reps: int, work: str) -> dict[str, Any]:
    """EP-2 gather + write, engine reload, vs copy_ of the same bytes (medians of `reps`)."""
    import torch

    from rollout.engines.vllm import VLLMEngine
    from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from slime.core.transport_files import read_weights
    from trainer.actors import TrainerRanks
    from trainer.rank import TrainerSpec

    model_dir = config_model_dir("glm5_tiny", cache_dir)
    tcfg = TrainerConfig(
        steps=1,
        num_ranks=2,
        expert_parallel_size=2,
        dtype="float32",  # type: ignore[arg-type]
        zero_stage=1,
        threads_per_rank=1,
        num_cpus_per_rank=0.5,
    )
    spec = TrainerSpec(
        model_dir,
        ModelConfig(name="glm5-tiny", source="random", dtype="float32"),  # type: ignore[arg-type]
        tcfg,
        AlgorithmConfig(name="grpo"),  # type: ignore[arg-type]
        0,
    )
    ranks = TrainerRanks(spec)
    engine = VLLMEngine(model_dir, dtype="float32", kv_cache_gib=1, work_dir=work, num_threads=1)
    gather, update = [], []
    try:
        await ranks.setup()
        await engine.start()
        manifest = None
        await ranks.open_weights("files", os.path.join(work, "weights"), 64, "gloo", 600)
        for v in range(1, reps + 1):
            t0 = time.perf_counter()
            manifest = await ranks.publish_weights(v)
            gather.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await engine.update_weights(manifest)
            update.append(time.perf_counter() - t0)
        tensors = dict(read_weights(manifest))
    finally:
        await engine.shutdown()
        ranks.shutdown()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    dst = {k: torch.empty_like(t).copy_(t) for k, t in tensors.items()}  # allocated and touched
    copies = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for k, t in tensors.items():
            dst[k].copy_(t)
        copies.append(time.perf_counter() - t0)
    g, u, c = (statistics.median(x) for x in (gather, update, copies))
    out = {
        "bytes_mb": nbytes / 2**20,
        "gather_write_s": g,
        "engine_update_s": u,
        "copy_s": c,
        "update_over_copy": u / c,
        "gather_plus_update_over_copy": (g + u) / c,
    }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("ep", "replay", "push"), required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--cache-dir", default=os.path.expanduser(os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))
    )
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="slime-bench-moe-")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        if args.part == "ep":
            asyncio.run(part_ep(args.cache_dir, args.steps))
        elif args.part == "replay":
            part_replay(args.steps, work)
        else:
            asyncio.run(push(args.cache_dir, args.reps, work))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
