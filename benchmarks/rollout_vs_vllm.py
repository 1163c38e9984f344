"""slime's generation path against bare vLLM, and what one weight push costs the requests in flight.

    python -m benchmarks.rollout_vs_vllm                      # SmolLM2-135M fp32, 1 thread
    python -m benchmarks.rollout_vs_vllm --model tiny --reps 3 --update-reps 1

One process, one model, the same dtype, thread count and engine arguments on both sides:
- bare:     `vllm.LLM.generate` (its engine core in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0, as
            `VLLMEngine` sets it for its own core process), all prompts in one call, with the vLLM
            SamplingParams slime's engine builds for the same request (sampled-token logprob, no
            detokenisation);
- asyncllm: the same requests straight into that engine's `AsyncLLM` (its core in a process of its
            own, outputs streamed), consumed without slime's per-token work;
- slime:    `VLLMEngine.generate` as rollout workers call it: one asyncio task per request, all at once;
- episodes: `rollout.episode.run_env_group` on the same engine, as one rollout worker runs its groups (the
            calculator env with the agentic experiment's settings: three worked examples, two turns,
            64 tokens a turn, temperature 0.7), all groups at once. Its bare counterpart replays the
            requests those episodes made, one `LLM.generate` per turn; the episodes also spend time in
            the environment, and slime's turns overlap where the replay's cannot.
Generation prompts are the calculator env's first prompts, `--group-size` copies of each (as a worker
sends a group). The paths run back to back, in alternating order, `--reps` times: tok/s is the median,
a ratio the median of the per-rep ratios (a busy machine's load drifts less within a rep).

Weight push: `--update-batch` requests with distinct random prompts (nothing cached), `--update-tokens`
new tokens each, with no update, and with one update of the same weights (a new version) landed when
the first request has generated half its tokens, under `rollout.kv_after_update` keep and recompute.
Reported: the batch's wall time, the update's total and the worker's reload time, and the tokens the
model computed beyond one prefill per prompt and one decode step per later token
(`benchmarks.engine_probe.forward_tokens`): the re-prefill that recompute pays.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks.common import config_model_dir

GiB = 1 << 30
MODELS = {"smollm2": "smollm2_135m", "tiny": "tiny_dense"}


def calculator_setup(model_dir: str, groups: int, seed: int) -> tuple[Any, list, Any, Any]:
    """The agentic experiment's calculator env: (env factory, tasks, chat format, rollout config)."""
    from envs.calculator import CalculatorEnv
    from rollout.chat import ChatFormat
    from slime.core.config import RolloutConfig
    from slime.core.model import load_tokenizer

    tasks = CalculatorEnv.make_tasks(groups, seed, digits=1, num_ops=1)
    cfg = RolloutConfig(temperature=0.7, max_turns=2, max_tokens_per_turn=64)
    chat = ChatFormat(load_tokenizer(model_dir))
    return (lambda: CalculatorEnv(demonstrations=3, tool_bonus=0.2)), tasks, chat, cfg


def bare_llm(model_dir: str, threads: int, kv_gib: int, max_model_len: int) -> Any:
    """`vllm.LLM` with the engine arguments `VLLMEngine.start` uses on CPU."""
    import torch
    from vllm import LLM

    from rollout.engines.base import scoped_env
    from slime.core.cores import thread_env

    torch.set_num_threads(threads)
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        **thread_env(threads),
    }
    with scoped_env(env):
        return LLM(
            model=model_dir,
            dtype="float32",
            max_model_len=max_model_len,
            enforce_eager=True,
            seed=0,
            kv_cache_memory_bytes=kv_gib * GiB,
            disable_log_stats=True,
            logprobs_mode="processed_logprobs",
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(max_model_len, 2048),
        )


def run_bare(llm: Any, engine: Any, requests: list[tuple[list[int], Any]]) -> tuple[int, float]:
    """(tokens generated, seconds) of one `LLM.generate` over (prompt ids, slime SamplingParams) pairs,
    each sent as the vLLM request slime's engine would build for it."""
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = []
    for _, sampling in requests:
        params.append(engine._params(sampling, sampling.max_tokens))
        params[-1].output_kind = RequestOutputKind.FINAL_ONLY  # LLM.generate returns whole outputs
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    secs = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs), secs


async def run_slime(engine: Any, requests: list[tuple[list[int], Any]]) -> tuple[int, float]:
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(engine.generate(p, sp) for p, sp in requests))
    return sum(len(o.token_ids) for o in outs), time.perf_counter() - t0


async def run_async_llm(engine: Any, requests: list[tuple[list[int], Any]]) -> tuple[int, float]:
    """The same requests straight into the engine's `AsyncLLM` (same process layout and streamed
    outputs, none of slime's per-token work): separates slime's own cost from AsyncLLM's."""
    from vllm.inputs import TokensPrompt

    async def one(i: int, prompt: list[int], sampling: Any) -> int:
        n = 0
        params = engine._params(sampling, sampling.max_tokens)
        async for out in engine._llm.generate(TokensPrompt(prompt_token_ids=prompt), params, f"raw{i}"):
            n += len(out.outputs[0].token_ids)
        return n

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p, sp) for i, (p, sp) in enumerate(requests)))
    return sum(counts), time.perf_counter() - t0


class Recorder:
    """The engine as the episode loop sees it, recording every request (for the bare replay)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.calls: list[tuple[list[int], Any]] = []

    @property
    def version(self) -> int:
        return self.engine.version

    async def generate(self, prompt_ids: list[int], sampling: Any, request_id: str | None = None) -> Any:
        self.calls.append((list(prompt_ids), sampling))
        return await self.engine.generate(prompt_ids, sampling, request_id)


async def run_episodes(engine: Any, setup: tuple, group_size: int) -> tuple[int, float, list[list]]:
    """(tokens generated, seconds, the requests made, by turn) of all groups run at once."""
    from rollout.episode import run_env_group
    from slime.core.types import SamplingParams

    factory, tasks, chat, cfg = setup
    sampling = SamplingParams(
        max_tokens=cfg.max_tokens_per_turn, temperature=cfg.temperature, top_p=cfg.top_p
    )
    rec = Recorder(engine)
    t0 = time.perf_counter()
    groups = await asyncio.gather(
        *(run_env_group(rec, factory, t, group_size, chat, cfg, sampling) for t in tasks)
    )
    secs = time.perf_counter() - t0
    # A request's turn: how many distinct earlier prompts it extends (its episode's earlier turns).
    distinct = {tuple(p) for p, _ in rec.calls}
    turns: dict[int, list] = {}
    for p, sp in rec.calls:
        turn = sum(1 for q in distinct if len(q) < len(p) and tuple(p[: len(q)]) == q)
        turns.setdefault(turn, []).append((p, sp))
    return sum(t.num_generated for g in groups for t in g), secs, [turns[k] for k in sorted(turns)]


def replay_bare(llm: Any, engine: Any, turns: list[list]) -> tuple[int, float]:
    """The episodes' requests on bare vLLM: one `LLM.generate` per turn."""
    got = [run_bare(llm, engine, requests) for requests in turns]
    return sum(n for n, _ in got), sum(s for _, s in got)


async def update_batch(
    engine: Any, prompts: list[list[int]], tokens: int, manifest: Any, kv: str | None
) -> dict[str, float]:
    """One batch with an update (kv "keep" | "recompute") when request 0 is halfway, or none (kv None)."""
    from benchmarks.engine_probe import forward_tokens
    from slime.core.types import SamplingParams

    sampling = SamplingParams(max_tokens=tokens, temperature=1.0)
    before = await forward_tokens(engine)
    t0 = time.perf_counter()
    tasks = [
        asyncio.create_task(engine.generate(p, sampling, request_id=f"u{i}")) for i, p in enumerate(prompts)
    ]
    update = {"total_s": 0.0, "load_s": 0.0}
    if kv is not None:
        await asyncio.sleep(0)  # one loop turn: the tasks submit their requests
        await engine.wait_generated("u0", tokens // 2)
        await engine.update_weights(manifest, mode="keep", kv_after_update=kv)
        update = engine.last_update
    outs = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    computed = await forward_tokens(engine) - before
    plain = sum(len(p) + len(o.token_ids) - 1 for p, o in zip(prompts, outs, strict=True))
    return {
        "wall_s": wall,
        "update_s": update["total_s"],
        "load_s": update["load_s"],
        "extra_tokens": computed - plain,
        "tokens": sum(len(o.token_ids) for o in outs),
    }


def random_prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[list[int]]:
    """Distinct prompts that share no prefix (nothing is cached across or within batches)."""
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


async def measure(args: argparse.Namespace, model_dir: str, work: str) -> tuple[dict, dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.engines.vllm import VLLMEngine
    from slime.core.checkpoint import checkpoint_tensors
    from slime.core.transport_files import write_weights
    from slime.core.types import SamplingParams

    setup = calculator_setup(model_dir, args.groups, args.seed)
    factory, tasks, chat, _ = setup
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.7)
    requests = []
    for task in tasks:
        env = factory()
        prompt = chat.initial_prompt_ids(await env.reset(task), env.tools)
        requests += [(prompt, sampling)] * args.group_size

    llm = bare_llm(model_dir, args.threads, args.kv_gib, args.max_model_len)
    engine = VLLMEngine(
        model_dir,
        dtype="float32",
        max_model_len=args.max_model_len,
        kv_cache_gib=args.kv_gib,
        enforce_eager=True,
        work_dir=work,
        num_threads=args.threads,
    )
    await engine.start()
    rows: dict[str, list[tuple[int, float]]] = {
        "bare": [],
        "asyncllm": [],
        "slime": [],
        "episodes": [],
        "replay": [],
    }
    upd: dict[str, list[dict[str, float]]] = {"none": [], "keep": [], "recompute": []}
    try:
        run_bare(llm, engine, requests[:2])  # warm both up (and cache the shared prompts in both)
        await run_slime(engine, requests[:2])
        for rep in range(args.reps):
            for name in ("bare", "asyncllm", "slime") if rep % 2 == 0 else ("slime", "asyncllm", "bare"):
                if name == "bare":
                    rows[name].append(run_bare(llm, engine, requests))
                else:
                    run = run_slime if name == "slime" else run_async_llm
                    rows[name].append(await run(engine, requests))
            if not args.skip_episodes:
                n, secs, turns = await run_episodes(engine, setup, args.group_size)
                rows["episodes"].append((n, secs))
                rows["replay"].append(replay_bare(llm, engine, turns))
            print(
                f"rep {rep}: "
                + "  ".join(
                    f"{k} {v[-1][0]} tok {v[-1][0] / v[-1][1]:.1f} tok/s" for k, v in rows.items() if v
                ),
                flush=True,
            )
        if args.update_reps:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            state = checkpoint_tensors(model)
            rng = random.Random(args.seed)
            for rep in range(args.update_reps):
                for kind in ("none", "keep", "recompute") if rep % 2 == 0 else ("recompute", "keep", "none"):
                    manifest = write_weights(state.items(), engine.version + 1, os.path.join(work, "w"), 256)
                    batch = random_prompts(
                        rng, args.update_batch, args.update_prompt_len, model.config.vocab_size
                    )
                    kv = None if kind == "none" else kind
                    r = await update_batch(engine, batch, args.update_tokens, manifest, kv)
                    upd[kind].append(r)
                    print(
                        f"rep {rep} update={kind:<9} wall {r['wall_s']:6.2f} s  update {r['update_s']:5.2f} s "
                        f"(reload {r['load_s']:5.2f} s)  extra tokens {r['extra_tokens']:>5.0f}  "
                        f"generated {r['tokens']:.0f}",
                        flush=True,
                    )
    finally:
        await engine.shutdown()
    return rows, upd


def report(args: argparse.Namespace, model_dir: str, rows: dict, upd: dict) -> None:
    med = statistics.median

    def tps(name: str) -> float:
        return med(n / s for n, s in rows[name])

    def ratio(name: str, ref: str) -> float:
        """Median of the per-rep ratios: each rep's two runs were taken back to back."""
        return med((n / s) / (rn / rs) for (n, s), (rn, rs) in zip(rows[name], rows[ref], strict=True))

    print(
        f"\nmodel {model_dir}, float32, {args.threads} thread(s); {args.groups * args.group_size} requests "
        f"({args.groups} calculator prompts x {args.group_size}), max_tokens {args.max_tokens}, "
        f"temperature 0.7; median of {args.reps}"
    )
    print(f"{'path':<36} {'tok/s':>8} {'x bare':>7}")
    print(f"{'bare vllm.LLM.generate':<36} {tps('bare'):>8.1f} {'':>7}")
    print(
        f"{'AsyncLLM.generate (slime engine)':<36} {tps('asyncllm'):>8.1f} {ratio('asyncllm', 'bare'):>7.2f}"
    )
    print(f"{'slime VLLMEngine.generate':<36} {tps('slime'):>8.1f} {ratio('slime', 'bare'):>7.2f}")
    if rows["episodes"]:
        print(f"{'bare, the episodes turn by turn':<36} {tps('replay'):>8.1f} {'':>7}")
        print(
            f"{'slime episodes (run_env_group)':<36} {tps('episodes'):>8.1f} {ratio('episodes', 'replay'):>7.2f}"
        )
    if upd["none"]:
        base = med(r["wall_s"] for r in upd["none"])
        print(
            f"\nweight push mid-batch: {args.update_batch} requests, {args.update_prompt_len}-token random "
            f"prompts, {args.update_tokens} new tokens each, update at half; median of {args.update_reps}"
        )
        print(
            f"{'kv_after_update':<16} {'batch s':>8} {'x none':>7} {'update s':>9} {'reload s':>9} {'extra tokens':>13}"
        )
        for kind in ("none", "keep", "recompute"):
            w = med(r["wall_s"] for r in upd[kind])
            print(
                f"{kind:<16} {w:>8.2f} {w / base:>7.2f} {med(r['update_s'] for r in upd[kind]):>9.2f} "
                f"{med(r['load_s'] for r in upd[kind]):>9.2f} {med(r['extra_tokens'] for r in upd[kind]):>13.0f}"
            )


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--model-dir", default="", help="a checkpoint dir instead of --model")
    ap.add_argument("--cache-dir", default=os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))
    ap.add_argument("--threads", type=int, default=1, help="model OpenMP threads, both sides")
    ap.add_argument("--groups", type=int, default=8, help="distinct calculator prompts (groups)")
    ap.add_argument("--group-size", type=int, default=4, help="requests per prompt (the GRPO group)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-episodes", action="store_true")
    ap.add_argument("--update-reps", type=int, default=2, help="0 skips the weight-push measurement")
    ap.add_argument("--update-batch", type=int, default=16)
    ap.add_argument("--update-prompt-len", type=int, default=256)
    ap.add_argument("--update-tokens", type=int, default=128)
    ap.add_argument("--kv-gib", type=int, default=1)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model_dir = args.model_dir or config_model_dir(MODELS[args.model], args.cache_dir)
    work = tempfile.mkdtemp(prefix="slime-bench-rvv-")
    try:
        rows, upd = asyncio.run(measure(args, model_dir, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, model_dir, rows, upd)


if __name__ == "__main__":
    main(sys.argv[1:])
