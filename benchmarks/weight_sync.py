"""Weight push cost, part by part, against a copy of the same bytes into memory already allocated.

    python -m benchmarks.weight_sync                        # SmolLM2-135M, float32, 1 thread, median of 5
    python -m benchmarks.weight_sync --dtype bfloat16 --threads 2 --reps 7

A real DeepSpeed trainer rank (in this process, ZeRO-1, float32 master weights) pushes to a real vLLM
engine on this node, over each way a push can go:
- files:     weights.transport=files (safetensors buckets, `slime.core.transport.write_weights`, the engine reading the files);
- shm:       weights.transport=shm (a slot in /dev/shm the engine maps; slime/core/transport.py);
- broadcast: weights.transport=broadcast (a gloo group; bytes over loopback TCP here);
- alias:     shm with rollout.weight_alias (the engine's parameters are views of the slot, its
             linear layers use torch's GEMM: rollout/engines/cpu_alias.py); run last, it changes the engine.
Per push (median of --reps after two warm-up pushes, so both slots are touched):
- gather:    the trainer's `full_named_tensors` alone, cast to the export dtype (as the files path
             gathers; shm and broadcast gather without the cast and cast in the slot copy);
- publish:   the trainer's `publish_weights` (gather + copy into the slot, or serialise into files);
- send:      broadcast only, the trainer's send (the engine receives at the same time);
- pause:     the engine pausing its scheduler; then, inside the engine's worker:
  receive (map the slot / receive the bytes / open the files), reload (vLLM's layerwise reload,
  with the CPU GEMM repack inside it), refresh (the tied-lm_head / MoE-expert stale-weight guards);
  repack counts every CPU GEMM repack (`dispatch_cpu_unquantized_gemm`) of reload and refresh;
- push:      wall time from the start of the export to the engine serving the new version;
- page faults: minor faults of the engine's process over the push, and of this process in publish.
Decode: the engine's generated tokens per second for 32 concurrent requests of up to 64 new tokens
(sampled, seeded), before the pushes (vLLM's packed GEMMs) and after the alias pushes (torch's GEMM
on the slot's plain weights): what the alias costs generation.
The baseline `copy` is `copy_` of every exported tensor into tensors allocated and touched beforehand,
with the trainer's thread count, timed once before each push (so on a busy machine both see the same
load); each transport's ratios are against its own median copy. The engine is idle (no requests in
flight).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import config_model_dir

HOWS = ("files", "shm", "broadcast", "alias")
PARTS = ("gather", "publish", "send", "pause", "receive", "reload", "repack", "refresh", "update", "push")


def _worker_counters(worker: Any) -> tuple[float, int]:
    """Runs in vLLM's worker: (seconds spent in CPU GEMM repacks, minor page faults of the process),
    both cumulative. The first call wraps `dispatch_cpu_unquantized_gemm`, which vLLM's layers import
    at call time."""
    import resource
    import time as _time

    import vllm.model_executor.layers.utils as layer_utils

    total = getattr(layer_utils, "_slime_repack_s", None)
    if total is None:
        total = layer_utils._slime_repack_s = [0.0]
        dispatch = layer_utils.dispatch_cpu_unquantized_gemm

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = _time.perf_counter()
            try:
                return dispatch(*args, **kwargs)
            finally:
                total[0] += _time.perf_counter() - t0

        layer_utils.dispatch_cpu_unquantized_gemm = timed
    return total[0], resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _trainer(model_dir: str, dtype: str, threads: int) -> Any:
    from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
    from trainer.rank import TrainerRank, TrainerSpec

    tcfg = TrainerConfig(steps=1, micro_batch_size=4, dtype="float32", zero_stage=1, threads_per_rank=threads)
    mcfg = ModelConfig(name="bench", source="pretrained", path=model_dir, dtype=dtype)
    w = TrainerRank(TrainerSpec(model_dir, mcfg, tcfg, AlgorithmConfig(name="grpo"), seed=0))
    w.setup()
    return w


async def _push(
    w: Any, engine: Any, how: str, version: int, out_dir: str, bucket_mb: int
) -> dict[str, float]:
    import cloudpickle

    counters = cloudpickle.dumps(_worker_counters)
    repack0, engine_faults0 = (await engine.collective_rpc(counters))[0]
    t0 = time.perf_counter()
    for _ in w.full_named_tensors(w.export_dtype):
        pass
    gather = time.perf_counter() - t0

    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    manifest = w.publish_weights(version)
    publish = time.perf_counter() - t0
    publish_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    if how == "broadcast":
        sent: dict[str, float] = {}

        def send() -> None:
            t = time.perf_counter()
            w.send_weights(manifest, ["engine"])
            sent["s"] = time.perf_counter() - t

        await asyncio.gather(asyncio.to_thread(send), engine.update_weights(manifest))
    else:
        await engine.update_weights(manifest)
    push = time.perf_counter() - t0
    u = engine.last_update
    repack1, engine_faults1 = (await engine.collective_rpc(counters))[0]
    return {
        "gather": gather,
        "publish": publish,
        "send": sent["s"] if how == "broadcast" else 0.0,
        "pause": u["pause_s"],
        "receive": u["receive_s"],
        "reload": u["reload_s"],
        "repack": repack1 - repack0,
        "refresh": u["refresh_s"],
        "update": u["total_s"],
        "push": push,
        "faults": float(engine_faults1 - engine_faults0),
        "publish_faults": float(publish_faults),
    }


async def decode_rate(engine: Any, reps: int = 2) -> float:
    """Generated tokens per second for 32 concurrent requests of up to 64 new tokens (best of `reps`)."""
    from slime.core.types import SamplingParams

    prompts = [[1 + (7 * i + j) % 500 for j in range(24)] for i in range(32)]
    best = 0.0
    for rep in range(reps):
        t0 = time.perf_counter()
        outs = await asyncio.gather(
            *[
                engine.generate(p, SamplingParams(max_tokens=64, seed=rep * 100 + i))
                for i, p in enumerate(prompts)
            ]
        )
        best = max(best, sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0))
    return best


class CopyBaseline:
    """`copy_` of every exported tensor into tensors allocated and touched beforehand."""

    def __init__(self, w: Any) -> None:
        import torch

        self.tensors = [t.clone() for _, t in w.full_named_tensors(w.export_dtype)]
        self.targets = [torch.empty_like(t) for t in self.tensors]
        self()  # touch every page once
        self.nbytes = sum(t.numel() * t.element_size() for t in self.tensors)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        for dst, src in zip(self.targets, self.tensors, strict=True):
            dst.copy_(src)
        return time.perf_counter() - t0


async def run(model_dir: str, dtype: str, reps: int, threads: int, bucket_mb: int) -> dict[str, Any]:
    from rollout.engines.vllm import VLLMEngine
    from slime.core.transport import for_engine

    w = _trainer(model_dir, dtype, threads)
    work = tempfile.mkdtemp(prefix="slime-bench-weights-")
    engine = VLLMEngine(model_dir, dtype=dtype, kv_cache_gib=1, work_dir=work, num_threads=threads)
    await engine.start()
    results: dict[str, Any] = {}
    try:
        copy = CopyBaseline(w)
        results.update(bytes=copy.nbytes, tensors=len(copy.tensors), start_s=engine.start_s)
        version = 0
        results["decode_packed"] = await decode_rate(engine)
        for how in HOWS:
            out_dir = os.path.join(work, how)
            if how == "alias":
                engine.settings = dataclasses.replace(engine.settings, weight_alias=True)
            transport = "shm" if how == "alias" else how
            channel = w.open_weights(transport, out_dir, bucket_mb, "gloo", 600)
            if how == "broadcast":
                channel = for_engine(channel, "engine", 1)
                await asyncio.gather(
                    asyncio.to_thread(w.accept_weights, "engine", 1), engine.open_weights(channel)
                )
            else:
                await engine.open_weights(channel)
            rows = []
            for rep in range(reps + 2):
                version += 1
                copy_s = copy()  # interleaved with the pushes: both see the same load on a busy machine
                row = await _push(w, engine, how, version, out_dir, bucket_mb)
                if rep >= 2:
                    rows.append({**row, "copy": copy_s})
            results[how] = {
                k: statistics.median(r[k] for r in rows) for k in (*PARTS, "faults", "publish_faults", "copy")
            }
            if how == "alias" and not engine.last_update["aliased"]:
                raise RuntimeError("the alias pushes took vLLM's reload (see the engine's log)")
        results["decode_alias"] = await decode_rate(engine)
        w.weight_sender.close()
    finally:
        await engine.shutdown()
        w.close()
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir", default="", help="checkpoint dir (default: SmolLM2-135M from the cache)"
    )
    parser.add_argument("--cache-dir", default=os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="trainer torch threads and engine OpenMP threads"
    )
    parser.add_argument("--bucket-mb", type=int, default=256, help="trainer.weight_bucket_mb")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or config_model_dir("smollm2_135m", args.cache_dir)
    r = asyncio.run(run(model_dir, args.dtype, args.reps, args.threads, args.bucket_mb))
    mb = r["bytes"] / 1e6
    print(
        f"\nmodel: {model_dir}  dtype: {args.dtype}  {r['tensors']} tensors, {mb:.1f} MB; "
        f"threads {args.threads}; "
        f"engine start {r['start_s']:.1f} s; median of {args.reps}"
    )
    hows = HOWS
    print(f"{'part (ms; x copy)':<20}" + "".join(f"{h:>20}" for h in hows))
    for part in ("copy", *PARTS):
        cells = "".join(f"{r[h][part] * 1e3:>12.1f} {r[h][part] / r[h]['copy']:>6.1f}x" for h in hows)
        print(f"{part:<20}{cells}")
    gbps = "".join(f"{r['bytes'] / r[h]['copy'] / 1e9:>19.1f} " for h in hows)
    print(f"{'copy GB/s':<20}{gbps}")
    print(f"{'engine page faults':<20}" + "".join(f"{r[h]['faults']:>20.0f}" for h in hows))
    print(f"{'publish page faults':<20}" + "".join(f"{r[h]['publish_faults']:>20.0f}" for h in hows))
    packed, alias = r["decode_packed"], r["decode_alias"]
    print(
        f"decode, 32 requests: vLLM's packed GEMMs {packed:.0f} tok/s, aliased plain weights {alias:.0f} tok/s "
        f"({alias / packed:.2f}x)"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
