"""Weight sync cost, in one run: engine `update_weights` vs a plain memory copy of the same bytes.

    python -m benchmarks.weight_sync                 # SmolLM2-135M, bf16 engine, 512 MB buckets, 1 thread
    python -m benchmarks.weight_sync --dtype float32 --reps 5 --bucket-mb 64 --num-threads 2

Measured (median of --reps):
- write:   `write_weights` of the transformers state dict (cast to the engine dtype) to /dev/shm;
- update:  `VLLMEngine.update_weights` of that manifest (pause, reload in the worker, tied-head refresh,
           resume), with the worker's own load time alongside;
- memcpy:  `torch.clone` of every tensor of the same (cast) state dict: the plain memory copy the
           ratios are against (it allocates fresh memory, as vLLM's layerwise reload also does);
           `copy_` into already-touched tensors is shown too, as the bandwidth floor;
- ratios:  update / memcpy and (write + update) / memcpy.
The engine is idle during the measurement (no requests in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time


def _resolve_smollm2(cache_dir: str) -> str:
    from omegaconf import OmegaConf

    from slime.config import ModelConfig
    from slime.models import resolve_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig),
        OmegaConf.load(os.path.join(root, "configs/model/smollm2_135m.yaml")),
    )
    return resolve_model(OmegaConf.to_object(cfg), cache_dir)


async def run(model_dir: str, dtype: str, reps: int, bucket_mb: int, num_threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.engine import VLLMEngine
    from slime.types import SamplingParams
    from slime.weights import checkpoint_tensors, default_weights_dir, write_weights

    tdtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = checkpoint_tensors(model)
    cast = {k: v.to(tdtype) for k, v in state.items()}
    nbytes = sum(t.numel() * t.element_size() for t in cast.values())

    work = tempfile.mkdtemp(prefix="slime-bench-weights-")
    engine = VLLMEngine(model_dir, dtype=dtype, kv_cache_gib=1, work_dir=work, num_threads=num_threads)
    await engine.start()
    try:
        await engine.generate([1, 2, 3], SamplingParams(max_tokens=4))  # warm the engine up
        out_dir = default_weights_dir(f"bench-{os.getpid()}")
        write_s, update_s, load_s, copy_s, copy_into_s = [], [], [], [], []
        targets = {k: torch.empty_like(v) for k, v in cast.items()}
        for k, v in cast.items():  # touch the pages once, so copy_ below measures copying only
            targets[k].copy_(v)
        for rep in range(reps):
            t0 = time.perf_counter()
            manifest = write_weights(state.items(), rep + 1, out_dir, bucket_mb, dtype=tdtype)
            write_s.append(time.perf_counter() - t0)
            update_s.append(await engine.update_weights(manifest, mode="keep"))
            load_s.append(engine.last_update["load_s"])
            t0 = time.perf_counter()
            copies = {k: v.clone() for k, v in cast.items()}
            copy_s.append(time.perf_counter() - t0)
            del copies
            t0 = time.perf_counter()
            for k, v in cast.items():
                targets[k].copy_(v)
            copy_into_s.append(time.perf_counter() - t0)
        out = await engine.generate([1, 2, 3], SamplingParams(max_tokens=4))
        assert out.versions == [reps] * len(out.token_ids)
    finally:
        await engine.shutdown()
    shutil.rmtree(out_dir, ignore_errors=True)
    med = statistics.median
    return {
        "bytes": nbytes,
        "tensors": manifest.num_tensors,
        "files": len(manifest.files),
        "start_s": engine.start_s or float("nan"),
        "write_s": med(write_s),
        "update_s": med(update_s),
        "load_s": med(load_s),
        "memcpy_s": med(copy_s),
        "copy_into_s": med(copy_into_s),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model-dir", default="", help="checkpoint dir (default: SmolLM2-135M from the cache)"
    )
    parser.add_argument("--cache-dir", default=os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--num-threads", type=int, default=1, help="engine OpenMP threads")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or _resolve_smollm2(os.path.expanduser(args.cache_dir))
    r = asyncio.run(run(model_dir, args.dtype, args.reps, args.bucket_mb, args.num_threads))
    mb = r["bytes"] / 1e6
    print(
        f"\nmodel: {model_dir}  dtype: {args.dtype}  {r['tensors']} tensors, {mb:.1f} MB, "
        f"{r['files']} bucket file(s); engine start {r['start_s']:.1f} s; median of {args.reps}"
    )
    print(f"{'step':<34} {'seconds':>8} {'GB/s':>7} {'x memcpy':>9}")
    rows = [
        ("memcpy (torch clone, same bytes)", r["memcpy_s"]),
        ("  copy_ into allocated tensors", r["copy_into_s"]),
        ("write_weights -> /dev/shm", r["write_s"]),
        ("update_weights (engine, total)", r["update_s"]),
        ("  of which worker reload", r["load_s"]),
        ("write + update", r["write_s"] + r["update_s"]),
    ]
    for name, secs in rows:
        print(f"{name:<34} {secs:>8.3f} {r['bytes'] / secs / 1e9:>7.2f} {secs / r['memcpy_s']:>9.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
