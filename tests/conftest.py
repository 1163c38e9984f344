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
- `ray_cluster`: ONE local Ray cluster (2 CPUs) for every test that needs Ray; the controller reuses it.

Builders (plain functions; test modules import them with `from conftest import ...`):
- `make_trajectory(prompt, response, ...)`: a trajectory with a loss mask on the response only,
  behaviour logprobs, per-token versions and a reward.
- `make_group(trajectories, ...)`: a group of trajectories for one task.
- In-process trainers: `tiny_model_cfg`, `trainer_cfg`, `algo_cfg` (config sections), `new_worker`,
  `make_groups` (groups of real-token trajectories), `token_logprobs`, `safetensors_dir`, and
  `restore_weights` (the session engine back on a checkpoint's own weights).
- `assert_start_up_fails(overrides, words, tmp_path)`: the tiny experiment with `overrides` fails the
  driver's start-up checks with a message naming each of `words` (the env adapters' bad configs).
- `first_and_best_window(scores)`: what the tiny models' learning tests compare.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio

from slime.core.config import AlgorithmConfig, ModelConfig, TrainerConfig
from slime.core.types import Group, Status, Task, Trajectory

REPO = Path(__file__).resolve().parents[1]
MODEL_CONFIGS = REPO / "configs" / "model"


def load_model_config(name: str):
    """configs/model/<name>.yaml validated into slime.core.config.ModelConfig."""
    from omegaconf import OmegaConf

    from slime.core.config import ModelConfig

    merged = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(MODEL_CONFIGS / f"{name}.yaml")
    )
    return OmegaConf.to_object(merged)


@pytest.fixture(scope="session")
def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("SLIME_CACHE_DIR", "~/.cache/slime"))


def _resolve(name: str, cache_dir: str) -> str:
    from slime.core.model import resolve_model

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
    from slime.core.model import load_tokenizer, smollm2_tokenizer_dir

    return load_tokenizer(str(smollm2_tokenizer_dir(cache_dir)))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine(tiny_dense_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """A started float32 VLLMEngine on tiny_dense, shared by the whole session."""
    from rollout.engines.vllm import VLLMEngine

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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the whole session (2 CPUs, no dashboard), started as a run starts one."""
    import ray

    from slime.controller import ray_init_options
    from slime.core.config import RayConfig

    if not ray.is_initialized():
        ray.init(**ray_init_options(RayConfig(num_cpus=2), log_to_driver=False))
    yield
    ray.shutdown()


def make_trajectory(
    prompt: Sequence[int],
    response: Sequence[int],
    *,
    reward: float = 0.0,
    version: int = 0,
    logprobs: Sequence[float] | None = None,
    status: Status = Status.COMPLETED,
    task_id: str = "t",
) -> Trajectory:
    """A one-turn trajectory: `prompt` then `response`, the policy's tokens being the response.

    Behaviour logprobs default to -0.5, -0.6, ... along the response (0 on the prompt); every
    response token carries `version`, prompt tokens -1.
    """
    n_p, n_r = len(prompt), len(response)
    if logprobs is None:
        logprobs = [-0.5 - 0.1 * i for i in range(n_r)]
    if len(logprobs) != n_r:
        raise ValueError(f"{len(logprobs)} logprobs for {n_r} response tokens")
    return Trajectory(
        task_id=task_id,
        token_ids=[*prompt, *response],
        loss_mask=[0] * n_p + [1] * n_r,
        behavior_logprobs=[0.0] * n_p + list(logprobs),
        versions=[-1] * n_p + [version] * n_r,
        prompt_len=n_p,
        reward=reward,
        status=status,
        start_version=version,
    )


def make_group(
    trajectories: Sequence[Trajectory], *, task_id: str = "g", ticket: int = 0, version: int | None = None
) -> Group:
    """The group of `trajectories` for task `task_id` (its start version: the oldest trajectory's)."""
    start = min(t.start_version for t in trajectories) if version is None else version
    return Group(
        task=Task(id=task_id, prompt="p"), trajectories=list(trajectories), ticket=ticket, start_version=start
    )


@pytest.fixture(scope="module")
def in_process_trainer() -> Iterator[None]:
    """For modules that build TrainerWorkers in the test process: they share one world-size-1 process
    group. Afterwards the group, DeepSpeed's cached groups and comm backend and the thread count are
    released, so the next module (or an expert-parallel one) starts clean."""
    import torch

    threads = torch.get_num_threads()
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    try:
        import deepspeed.comm.comm as ds_comm
        from deepspeed.utils import groups
    except ImportError:
        pass
    else:
        # torch's destroy_process_group bypasses DeepSpeed, whose group cache would then hand the next
        # trainer a destroyed group ("Group ... is not registered").
        groups._release_process_group_references(None)
        ds_comm.cdb = None
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# In-process trainers (test_trainer.py, test_lora.py, test_transport.py)
# --------------------------------------------------------------------------------------------------

WORDS = [" the", " cat", " sat", " on", " a", " mat", " and", " then", " ran", " far", " away", " home"]


def tiny_model_cfg(**kw) -> ModelConfig:
    """The `model` section of the tiny random test models, float32 (logprobs compared tightly)."""
    return ModelConfig(**{"name": "tiny", "source": "random", "dtype": "float32", **kw})


def trainer_cfg(**kw) -> TrainerConfig:
    """A float32 ZeRO-1 `trainer` section, one thread, micro-batches of 4; `kw` overrides."""
    base = dict(steps=1, lr=1e-3, micro_batch_size=4, dtype="float32", zero_stage=1, threads_per_rank=1)
    return TrainerConfig(**{**base, **kw})


def algo_cfg(**kw) -> AlgorithmConfig:
    """A GRPO `algorithm` section (seq-mean loss, TIS off-policy correction); `kw` overrides."""
    base = dict(name="grpo", advantage="grpo", loss_agg="seq_mean", off_policy="tis")
    return AlgorithmConfig(**{**base, **kw})


def new_worker(
    model_dir: str, tcfg: TrainerConfig, acfg: AlgorithmConfig, model_cfg: ModelConfig | None = None
):
    """A set-up in-process `TrainerRank` (seed 0) on `model_dir`; `model_cfg` defaults to
    `tiny_model_cfg()`. Modules that build one use the `in_process_trainer` fixture."""
    from trainer.rank import TrainerRank, TrainerSpec

    w = TrainerRank(TrainerSpec(model_dir, model_cfg or tiny_model_cfg(), tcfg, acfg, seed=0))
    w.setup()
    return w


def make_groups(tokenizer, num_groups: int = 2, n: int = 4, seed: int = 0) -> list[Group]:
    """Groups of n trajectories: a real prompt, a response of real word tokens, random rewards and
    plausible (not on-policy) behaviour logprobs."""
    import random

    rng = random.Random(seed)
    word_ids = [tokenizer.encode(w)[0] for w in WORDS]
    groups = []
    for g in range(num_groups):
        prompt = tokenizer.encode(f"Question {g + seed}: tell me a story.")
        trajs = []
        for _ in range(n):
            response = [rng.choice(word_ids) for _ in range(rng.randrange(2, 10))]
            logprobs = [-rng.uniform(9.0, 12.0) for _ in response]
            trajs.append(
                make_trajectory(
                    prompt, response, reward=float(rng.random()), logprobs=logprobs, task_id=str(g)
                )
            )
        groups.append(make_group(trajs, task_id=str(g)))
    return groups


def token_logprobs(model, ids: list[int], start: int) -> list[float]:
    """Logprobs (temperature 1) of ids[start:] given what precedes them, under `model`: a transformers
    model, a DeepSpeed engine (a worker's `policy`) or a LoRA worker's adapters-off `reference`."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()  # [len(ids), V]
    lp = torch.log_softmax(logits[start - 1 : -1], dim=-1)  # row j predicts ids[start + j]
    return lp.gather(1, torch.tensor(ids[start:]).unsqueeze(1)).squeeze(1).tolist()


def safetensors_dir(path: str) -> dict:
    """Every tensor of the safetensors files in a directory, by name."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


async def restore_weights(engine, model_dir: str) -> None:
    """Put the session `engine` back on `model_dir`'s own weights (later tests expect them) at the
    next version."""
    from slime.core.types import WeightManifest

    original = [os.path.join(model_dir, "model.safetensors")]
    await engine.update_weights(WeightManifest(engine.version + 1, "files", 0, 0, files=original))


def publish_files(rank, version: int, out_dir: str, bucket_mb: int):
    """An in-process `TrainerRank`'s weights as `version`, published through the files transport
    under `out_dir` (a manifest any engine loads, and `read_weights` reads)."""
    rank.open_weights("files", out_dir, bucket_mb, "gloo", 60)
    return rank.publish_weights(version)


def first_and_best_window(scores: list[float], window: int = 3) -> tuple[float, float]:
    """(mean of the first `window` rewards, best `window`-step mean after them). Tiny random models
    take off at a step that varies from run to run and may fall back after it, so their learning
    tests compare the best window, not the last one."""
    means = [sum(scores[i : i + window]) / window for i in range(len(scores) - window + 1)]
    return means[0], max(means[window:])


def assert_start_up_fails(overrides: list[str], words: list[str], tmp_path: Path) -> None:
    """The tiny experiment with `overrides` fails `check_env` (the driver's start-up checks, before Ray)
    with a ValueError whose message contains every one of `words`."""
    from slime import api
    from slime.train import check_env

    cfg = api.compose_config(["+experiment=tiny", *overrides], str(tmp_path))
    with pytest.raises(ValueError) as info:
        check_env(cfg)
    for w in words:
        assert w in str(info.value), str(info.value)


# ------------------------------------------------------------------ the suite's documented duration
_SUITE_T0 = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """After a full run (more than 500 tests), print the measured wall time next to docs/testing.md's
    figure, and say so when it drifted by more than a third (update the page then)."""
    ran = sum(len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error"))
    if ran < 500:
        return
    text = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    m = re.search(r"the whole suite[^\n]*?about (\d+) minutes", text)
    took = (time.monotonic() - _SUITE_T0) / 60
    if m is None:
        terminalreporter.write_line(f"suite: {took:.1f} min; docs/testing.md states no duration")
        return
    stated = int(m.group(1))
    drift = "" if abs(took - stated) <= stated / 3 else "  <- drifted: update docs/testing.md"
    terminalreporter.write_line(f"suite: {took:.1f} min measured, docs/testing.md says about {stated}{drift}")
