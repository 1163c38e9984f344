"""MoE route capture cost, in one run: generation tokens/s of two vLLM engines on the same MoE model,
one plain, one with `capture_routes=True` (algorithm.routing_replay=rollout).

    python -m benchmarks.route_capture                    # model=tiny_moe, 32 requests x 64 tokens, 3 rounds
    python -m benchmarks.route_capture --model glm5_tiny --requests 16 --rounds 2

Both engines run at once (fp32, one thread each) and take turns: each round sends the same batch of
distinct prompts (so prefix caching, which capture turns off, has nothing to reuse) to one engine, then
the other, so drift in the machine's load hits both. Reported: median generated tokens/s of each and
their ratio. The capture engine's figure includes fetching each finished request's routes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from benchmarks.common import config_model_dir


async def _round(engine, prompts: list[list[int]], max_tokens: int, seed: int) -> tuple[float, int]:
    from slime.core.types import SamplingParams

    t0 = time.perf_counter()
    outs = await asyncio.gather(
        *[
            engine.generate(p, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i))
            for i, p in enumerate(prompts)
        ]
    )
    elapsed = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / elapsed, sum(
        o.routed_experts.num_valid for o in outs if o.routed_experts is not None
    )


async def main(args: argparse.Namespace) -> None:
    from rollout.engines.vllm import VLLMEngine
    from slime.core.model import load_tokenizer

    model_dir = config_model_dir(args.model, os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))
    tok = load_tokenizer(model_dir)
    prompts = [
        tok(f"Report {i}: the {i}th station logged {7 * i + 3} readings, and then")["input_ids"]
        for i in range(args.requests)
    ]
    work = tempfile.mkdtemp(prefix="slime-bench-routes-")
    engines = {}
    for name, capture in (("plain", False), ("capture", True)):
        eng = VLLMEngine(
            model_dir,
            dtype="float32",
            kv_cache_gib=1,
            enforce_eager=True,
            work_dir=os.path.join(work, name),
            num_threads=args.num_threads,
            capture_routes=capture,
        )
        await eng.start()
        engines[name] = eng
    try:
        for eng in engines.values():  # warm-up
            await _round(eng, prompts[:4], 8, 0)
        rates: dict[str, list[float]] = {name: [] for name in engines}
        rows = 0
        for r in range(args.rounds):
            for name, eng in engines.items():
                rate, n = await _round(eng, prompts, args.max_tokens, 1000 * r)
                rates[name].append(rate)
                rows += n
        plain, capture = (statistics.median(rates[n]) for n in ("plain", "capture"))
        print(
            f"model={args.model} requests={args.requests} max_tokens={args.max_tokens} rounds={args.rounds}"
        )
        print(f"plain   {plain:8.1f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in rates['plain'])})")
        print(f"capture {capture:8.1f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in rates['capture'])})")
        print(f"capture / plain = {capture / plain:.3f}; {rows} token rows of routes returned")
    finally:
        for eng in engines.values():
            await eng.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny_moe")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-threads", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
