"""Trainer step packed vs padded, with and without the shared prefix, on a mix of reply lengths.

    python -m benchmarks.packing            # SmolLM2-135M, fp32, 16 sequences, micro-batch 4, 1 thread
    python -m benchmarks.packing --dtype bfloat16 --seqs 32 --micro-batch 8 --reps 3

The batch is agentic-shaped: the calculator env's real first prompt (system prompt, tool list, one
worked example, the question; `benchmarks.shared_prefix`), groups of 4, and replies whose lengths
vary the way multi-turn agent episodes do (log-uniform between `--min-reply` and `--max-reply`
tokens). One `TrainerRank` (DeepSpeed, world size 1, lr 0 so every setting sees the same weights)
runs `train_step` in each of the four settings (trainer.pack x trainer.share_prefix), in turn
(every other round in reverse order), `--reps` times; printed: median step seconds, real tokens per second, `perf/mfu`, and the loss and
gradient norm (the same step computed four ways: they agree).

First, the attention alone (`--attention`): one layer's sdpa over 8 packed sequences of 430 tokens
with transformers' block-diagonal mask vs trainer.packing's segment attention (one causal sdpa per
sequence).
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time

from benchmarks.common import resolve_model_dir, trainer_parser, trainer_worker


def attention_figures(threads: int) -> tuple[float, float]:
    """Seconds of one sdpa over 8 x 430 packed tokens (SmolLM2's 9 heads x 64) with a
    block-diagonal causal mask, and of `segment_attention` on the same tensors."""
    import torch
    import torch.nn.functional as F

    from trainer.packing import segment_attention

    torch.set_num_threads(threads)
    lens = [430] * 8
    n = sum(lens)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, n, 64, generator=gen) for _ in range(3))
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    pos = torch.arange(n)
    mask = ((seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]))[None, None]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])

    def best(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    dense = best(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    segments = best(lambda: segment_attention(torch.nn.Module(), q, k, v, None, cu_seq_lens_q=cu))
    return dense, segments


def build_groups(model_dir: str, seqs: int, min_reply: int, max_reply: int, seed: int) -> list:
    from benchmarks.shared_prefix import build_groups as agentic_groups

    groups = agentic_groups(model_dir, seqs, 4, 1, seed)  # real prompts, one reply token for now
    rng = random.Random(seed)
    for g in groups:
        for t in g.trajectories:
            n = round(math.exp(rng.uniform(math.log(min_reply), math.log(max_reply))))
            reply = [rng.randrange(100, 40000) for _ in range(n)]
            p = t.prompt_len
            t.token_ids = t.token_ids[:p] + reply
            t.loss_mask = [0] * p + [1] * n
            t.behavior_logprobs = [0.0] * p + [-5.0] * n
            t.versions = [-1] * p + [0] * n
    return groups


def main() -> None:
    ap = trainer_parser(__doc__, micro_batch=4, reps=2)
    ap.add_argument("--min-reply", type=int, default=8, help="shortest reply (tokens)")
    ap.add_argument("--max-reply", type=int, default=256, help="longest reply (tokens)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="trainer.dtype")
    ap.add_argument(
        "--no-attention", dest="attention", action="store_false", help="skip the attention figures"
    )
    args = ap.parse_args()

    if args.attention:
        dense, segments = attention_figures(args.threads)
        print(
            f"attention, 8 x 430 packed tokens: block-diagonal mask {dense * 1e3:.0f} ms, "
            f"segment attention {segments * 1e3:.0f} ms ({dense / segments:.1f}x)"
        )

    from trainer.batching import flatten_groups, make_micro_batches, num_micro_batches

    model_dir = resolve_model_dir(args)
    groups = build_groups(model_dir, args.seqs, args.min_reply, args.max_reply, seed=0)
    lengths = sorted(len(t.token_ids) for g in groups for t in g.trajectories)
    worker = trainer_worker(model_dir, args, lr=0.0, dtype=args.dtype)
    info = worker.setup()
    settings = [(False, False), (False, True), (True, False), (True, True)]
    runs: dict[tuple[bool, bool], list[dict[str, float]]] = {s: [] for s in settings}
    try:
        worker.train_step(groups, version=0)  # warm-up (allocator, DeepSpeed's first step)
        for rep in range(args.reps):
            # Every other round in reverse order, so a machine whose load drifts favours no setting.
            for pack, share in settings if rep % 2 == 0 else settings[::-1]:
                worker.forward.pack, worker.forward.share_prefix = pack, share
                runs[pack, share].append(worker.train_step(groups, version=0))
    finally:
        worker.close()
    refs = flatten_groups(groups)
    padded = make_micro_batches(refs, num_micro_batches(len(refs), args.micro_batch), pad_id=0, trim=False)
    slots = sum(mb.input_ids.numel() for mb in padded)
    print(
        f"{args.seqs} sequences of {lengths[0]}-{lengths[-1]} tokens (median {lengths[len(lengths) // 2]}, "
        f"prompt {groups[0].trajectories[0].prompt_len}, {sum(lengths)} in all; padded micro-batches "
        f"{slots}, {1 - sum(lengths) / slots:.0%} padding), micro-batch {args.micro_batch}, "
        f"{args.threads} thread(s), {args.dtype}, {os.path.basename(model_dir)}; measured peak "
        f"{info['peak_tflops'] * 1e3:.0f} GFLOP/s"
    )
    print("pack   share_prefix  step s  tokens/s     mfu   loss/policy  grad_norm")
    med = {}
    for s in settings:
        med[s] = statistics.median(r["time/train_s"] for r in runs[s])
        last = runs[s][-1]
        mfu = statistics.median(r["perf/mfu"] for r in runs[s])
        print(
            f"{s[0]!s:<6} {s[1]!s:<12} {med[s]:7.2f} {last['train/tokens'] / med[s]:9.1f} {mfu:7.2%} "
            f"{last['loss/policy']:12.6f} {last['grad_norm']:10.4f}"
        )
    base = med[False, True]
    print(
        f"speed-up over padded + shared prefix (the previous default): packed {base / med[True, False]:.2f}x, "
        f"packed + shared prefix {base / med[True, True]:.2f}x; over padded alone: "
        f"{med[False, False] / med[True, True]:.2f}x"
    )


if __name__ == "__main__":
    main()
