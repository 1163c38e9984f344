"""The `eval` section (`eval.*` keys; no preset files in configs/): evaluation during training."""

from __future__ import annotations

from dataclasses import dataclass

from slime.core.config.fields import _require, _require_non_negative, _require_positive, opt


@dataclass
class EvalConfig:
    """Evaluation during training, on the rollout engines, beside the training rollouts."""

    every: int = opt(0, "evaluate every N trainer steps, at step 0 and after the last step (0 = never)")
    dataset: str = opt(
        "",
        "JSONL/Parquet file of held-out tasks (empty: the env's generator, with a seed disjoint from training)",
    )
    num_tasks: int = opt(32, "tasks per evaluation (the first N of the dataset)")
    n: int = opt(1, "samples per task; eval/pass@k uses k = n")
    temperature: float = opt(0.0, "sampling temperature (0 = greedy)")
    top_p: float = opt(1.0, "nucleus sampling for evaluation")
    success: float = opt(1.0, "a sample counts as solved (pass@k) when its reward is at least this")

    def validate(self) -> None:
        _require_non_negative(self, "eval", "every", "temperature")
        _require_positive(self, "eval", "num_tasks", "n")
        _require(0.0 < self.top_p <= 1.0, f"eval.top_p must be in (0, 1], got {self.top_p}")
