"""Session-wide fixtures shared by all test modules.

- `cache_dir`: where models are built (`$SLIME_CACHE_DIR`, default ~/.cache/slime).
- `tiny_dense_dir`, `tiny_moe_dir`, `smollm2_dir`: local transformers checkpoints resolved from
  `configs/model/*.yaml` (built once into the cache, reused afterwards).
- `tokenizer`: the SmolLM2 tokenizer (all test models use it).
- `engine`: ONE started `VLLMEngine` on tiny_dense for the whole session (dtype float32, so engine
  logprobs can be compared with a transformers fp32 forward tightly; bf16 is also emulated, hence slow,
  on CPUs without AVX512-BF16/AMX such as this one; one OpenMP thread). It lives on the session event loop:
  pytest's asyncio loop scope is "session" (pyproject.toml), so any async test in any module can use it.
  Tests may update its weights: the version only grows, and a test that needs particular weights loads
  them itself (test_engine restores the original checkpoint's weights after its update tests).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_asyncio

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "configs" / "model"


def load_model_config(name: str):
    """configs/model/<name>.yaml validated into slime.config.ModelConfig."""
    from omegaconf import OmegaConf

    from slime.config import ModelConfig

    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml")
    )
    return OmegaConf.to_object(merged)


@pytest.fixture(scope="session")
def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))


def _resolve(name: str, cache_dir: str) -> str:
    from slime.models import resolve_model

    return resolve_model(load_model_config(name), cache_dir)


@pytest.fixture(scope="session")
def tiny_dense_dir(cache_dir: str) -> str:
    return _resolve("tiny_dense", cache_dir)


@pytest.fixture(scope="session")
def tiny_moe_dir(cache_dir: str) -> str:
    return _resolve("tiny_moe", cache_dir)


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: str) -> str:
    return _resolve("smollm2_135m", cache_dir)


@pytest.fixture(scope="session")
def tokenizer(cache_dir: str):
    from slime.models import load_tokenizer, smollm2_tokenizer_dir

    return load_tokenizer(str(smollm2_tokenizer_dir(cache_dir)))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_dense_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A started float32 VLLMEngine on tiny_dense, shared by the whole session."""
    from rollout.engine import VLLMEngine

    eng = VLLMEngine(
        tiny_dense_dir,
        dtype="float32",
        max_model_len=2048,
        kv_cache_gib=1,
        enforce_eager=True,
        seed=0,
        work_dir=str(tmp_path_factory.mktemp("vllm-engine")),
        num_threads=1,  # the test machine is shared; oversubscribed OpenMP threads spin
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()
