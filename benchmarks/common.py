"""What the trainer benchmarks (lora.py, packing.py, shared_prefix.py) and the others share: the
command-line options every trainer benchmark takes, the model they run on, and one bench
`TrainerRank` (DeepSpeed, world size 1, GRPO)."""

from __future__ import annotations

import argparse
import os
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_model_dir(config: str, cache_dir: str) -> str:
    """The checkpoint dir of `configs/model/<config>.yaml` (downloaded, or built for random models,
    into `cache_dir` on first use)."""
    from omegaconf import OmegaConf

    from slime.core.config import ModelConfig
    from slime.core.model import resolve_model

    path = os.path.join(REPO, "configs", "model", f"{config}.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    return resolve_model(OmegaConf.to_object(cfg), os.path.expanduser(cache_dir))


def trainer_parser(doc: str, *, micro_batch: int, reps: int) -> argparse.ArgumentParser:
    """A parser with the options of every trainer benchmark (model, batch size, steps, threads);
    the caller adds its own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="transformers checkpoint (default: SmolLM2-135M)")
    ap.add_argument("--seqs", type=int, default=16, help="sequences per step (groups of 4)")
    ap.add_argument("--micro-batch", type=int, default=micro_batch, help="trainer.micro_batch_size")
    ap.add_argument("--reps", type=int, default=reps, help="steps per setting (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="trainer.threads_per_rank")
    ap.add_argument("--cache-dir", default=os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))
    return ap


def resolve_model_dir(args: argparse.Namespace) -> str:
    """`--model-dir`, or SmolLM2-135M from `--cache-dir`."""
    return args.model_dir or config_model_dir("smollm2_135m", args.cache_dir)


def trainer_worker(
    model_dir: str, args: argparse.Namespace, *, lr: float, dtype: str = "float32", lora_rank: int = 0
) -> Any:
    """A `TrainerRank` (not set up yet) on `model_dir` with `--micro-batch` and `--threads`, GRPO,
    seed 0; LoRA adapters of rank `lora_rank` when > 0, else every weight trains."""
    from slime.core.config import AlgorithmConfig, LoraConfig, ModelConfig, TrainerConfig
    from trainer.rank import TrainerRank, TrainerSpec

    tcfg = TrainerConfig(
        steps=1, lr=lr, micro_batch_size=args.micro_batch, dtype=dtype, threads_per_rank=args.threads
    )
    model = ModelConfig(name="bench", lora=LoraConfig(r=lora_rank))
    return TrainerRank(TrainerSpec(model_dir, model, tcfg, AlgorithmConfig(name="grpo"), 0))
