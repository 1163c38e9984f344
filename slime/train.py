"""Entry point: `python -m slime.train +experiment=NAME [overrides]`.

Hydra composes `configs/` against the dataclass schemas (a wrong key, type or choice fails here), the
result is converted to `SlimeConfig` once (`to_config`: the selected environment's `env.by_name`
arguments folded in), checked by `validate`, and everything that can be wrong with the model,
environment or dataset is checked before any Ray actor starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from slime.core.config import Dtype, SlimeConfig, register_configs
from slime.core.validation import validate

log = logging.getLogger("slime")

register_configs()


def prepare(cfg: SlimeConfig) -> str:
    """Fail-fast checks and one-time preparation in the driver. Returns the local model dir.

    Raises ValueError (or a subclass) with a message that names the key to change.
    """
    from slime.core.model import resolve_dtype, resolve_model

    validate(cfg)
    # Resolved once here so every actor gets a concrete dtype (set explicitly for mixed clusters).
    cfg.model.dtype = Dtype(resolve_dtype(cfg.model.dtype))
    cfg.trainer.dtype = Dtype(resolve_dtype(cfg.trainer.dtype))
    if cfg.buffer.replay_path and not os.path.exists(cfg.buffer.replay_path):
        raise ValueError(f"buffer.replay_path={cfg.buffer.replay_path!r} does not exist")
    cfg.resume = resolve_resume(cfg.resume, cfg.run_dir)
    num_tasks = check_env(cfg)
    log.info("env %s: %d tasks", cfg.env.name, num_tasks)
    model_dir = resolve_model(cfg.model, cfg.cache_dir, cfg.seed)
    if cfg.algorithm.distill.teacher:
        # Every actor gets the checkpoint itself (rollout workers start the teacher's engine from it).
        cfg.algorithm.distill.teacher = resolve_teacher(cfg.algorithm.distill.teacher, cfg, model_dir)
    return model_dir


def resolve_teacher(spec: str, cfg: SlimeConfig, model_dir: str) -> str:
    """The checkpoint dir (or hub id) of `algorithm.distill.teacher`: a transformers checkpoint dir (a
    slime checkpoint's `hf/` export is found from the checkpoint dir), a configs/model name, or a hub
    id. Raises ValueError naming the key when it cannot be found or does not share the student's
    tokenizer (its logprobs would be of other tokens)."""
    from pathlib import Path

    from slime.core.config import ModelConfig, ModelSource
    from slime.core.model import load_tokenizer, resolve_model

    path = Path(os.path.expanduser(spec))
    if spec.startswith(("/", ".", "~")) and not path.is_dir():
        # A path, not a hub id: say so now rather than after a failed hub look-up.
        raise ValueError(f"algorithm.distill.teacher={spec!r}: no such checkpoint directory")
    preset = Path(__file__).resolve().parent / "configs" / "model" / f"{spec}.yaml"
    if path.is_dir() and not (path / "config.json").exists() and (path / "hf" / "config.json").exists():
        path = path / "hf"
    if path.is_dir():
        teacher = ModelConfig(name="teacher", source=ModelSource.pretrained, path=str(path))
    elif "/" not in spec and preset.exists():
        teacher = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(preset))
        )
    else:
        teacher = ModelConfig(name="teacher", source=ModelSource.pretrained, path=spec)
    try:
        teacher_dir = resolve_model(teacher, cfg.cache_dir, cfg.seed)
        theirs = load_tokenizer(teacher_dir, cfg.model.trust_remote_code).get_vocab()
    except Exception as e:
        raise ValueError(f"algorithm.distill.teacher={spec!r}: {e}") from e
    ours = load_tokenizer(model_dir, cfg.model.trust_remote_code).get_vocab()
    if theirs != ours:
        raise ValueError(
            f"algorithm.distill.teacher={spec!r} has another tokenizer than the student ({len(theirs)} vs "
            f"{len(ours)} tokens): the teacher must score the student's own token ids"
        )
    log.info("distillation teacher: %s", teacher_dir)
    return teacher_dir


def check_env(cfg: SlimeConfig) -> int:
    """Everything that can be wrong with the environment, checked in the driver: the class resolves,
    `env.id` is set only for one that takes it, `env.kwargs` construct it (an adapter such as
    env=verifiers loads the named environment there), `env.agent` loads (or is unset for an env that
    runs no agent or brings its own), and the
    dataset is non-empty and well-formed. Returns the number of tasks; raises ValueError (or a
    subclass) naming the key to change."""
    from envs.dataset import load_tasks
    from envs.registry import load_env_class

    env_cls = load_env_class(cfg.env.name)  # unknown env / broken plugin -> clear error now
    if cfg.env.id and not _takes_id(env_cls):
        raise ValueError(
            f"env.id={cfg.env.id!r} is set but env.name={cfg.env.name} takes no id (env.id names the "
            "environment for env=verifiers and env=openenv): remove env.id"
        )
    try:
        env = env_cls(**cfg.env.kwargs)  # wrong env.kwargs -> clear error now, not a failed episode each
    except Exception as e:
        if cfg.env.id:  # an adapter's message names what to fix (id not installed, config refused, ...)
            raise ValueError(str(e)) from e
        raise ValueError(f"env.kwargs={cfg.env.kwargs} do not construct {cfg.env.name}: {e}") from e
    from envs.openai_agent import uses_agent

    if uses_agent(env_cls):
        from rollout.agent.runner import env_agent

        env_agent(env, cfg.env.agent)  # a wrong env.agent fails here, not inside a worker
    elif cfg.env.agent:
        raise ValueError(
            f"env.agent={cfg.env.agent!r} is set but env.name={cfg.env.name} does not run agents "
            "(env.agent is for env=openai_agent): remove env.agent"
        )
    return len(load_tasks(cfg.env, cfg.seed))  # empty or malformed dataset -> clear error now


def _takes_id(env_cls: type) -> bool:
    """Whether the environment's constructor has a parameter `id` (where env.id goes)."""
    import inspect

    try:
        return "id" in inspect.signature(env_cls).parameters
    except (TypeError, ValueError):
        return False


def resolve_resume(resume: str, run_dir: str) -> str:
    """`resume=auto`: the latest complete checkpoint of this run dir ("" when there is none yet, so
    the same command starts a run and continues it); `resume=PATH`: that checkpoint, or the latest
    complete one under PATH."""
    from slime.core.checkpoint import CHECKPOINTS_DIR, latest_checkpoint, resolve_checkpoint

    if not resume:
        return ""
    if resume == "auto":
        latest = latest_checkpoint(os.path.join(run_dir, CHECKPOINTS_DIR))
        log.info("resume=auto: %s", latest or "no checkpoint yet, starting fresh")
        return latest or ""
    try:
        return resolve_checkpoint(resume)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from e


def _reject_unknown_keys(obj: object, path: str) -> None:
    """`+group.key=...` can smuggle keys past the schema; refuse them instead of ignoring them."""
    names = {f.name for f in dataclasses.fields(obj)}
    extra = sorted(set(vars(obj)) - names)
    if extra:
        raise ValueError(f"unknown config key(s) {', '.join(f'{path}{k}' for k in extra)}")
    for name in names:
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            _reject_unknown_keys(value, f"{path}{name}.")
        elif isinstance(value, dict):
            for key, item in value.items():
                if dataclasses.is_dataclass(item):
                    _reject_unknown_keys(item, f"{path}{name}.{key}.")


def to_config(dcfg: DictConfig) -> SlimeConfig:
    """The single DictConfig -> dataclass conversion; nothing downstream sees a DictConfig.

    The selected environment's `env.by_name` entry is folded into `env.kwargs` / `env.dataset.kwargs`
    here (`EnvConfig.select`), so every consumer sees exactly the arguments that environment gets.
    """
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, SlimeConfig)
    _reject_unknown_keys(cfg, "")
    cfg.env.select()
    return cfg


def config_yaml(cfg: SlimeConfig) -> str:
    """The run's `config.yaml`: the effective config, resolved, choices as plain strings."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def hydra_log_path() -> str:
    """The driver's log file, `<Hydra's run dir>/<job name>.log`."""
    hc = HydraConfig.get()
    return os.path.join(hc.runtime.output_dir, f"{hc.job.name}.log")


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    t0 = time.perf_counter()
    try:
        cfg = to_config(dcfg)
    except ValueError as e:
        print(f"slime: config error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml(cfg))
    try:
        model_dir = prepare(cfg)
    except (ValueError, TypeError, ImportError) as e:
        print(f"slime: config error: {e}", file=sys.stderr)
        sys.exit(2)
    from slime.console import ray_logs_to_file, summary, train_rows
    from slime.controller import Stopped, run_controller, to_dict

    ray_logs_to_file(cfg.run_dir)
    log.info("run dir %s; the engines', trainer ranks' and Ray's logs go to its logs/", cfg.run_dir)
    outcome = "failed"  # the error follows the summary (the actor's traceback, its log file named)
    try:
        asyncio.run(run_controller(cfg, model_dir, to_dict(cfg)))
        outcome = "finished"
    except Stopped as stop:
        how = (
            f"resume with the same command plus resume={stop.checkpoint}"
            if stop.checkpoint
            else "nothing to resume"
        )
        print(f"slime: {stop}; {how} (or resume=auto with hydra.run.dir={cfg.run_dir})", file=sys.stderr)
        outcome = f"stopped by {stop.signal_name}"
        sys.exit(128 + signal.Signals[stop.signal_name].value)
    finally:
        rows = train_rows(cfg.run_dir)
        wall = time.perf_counter() - t0
        log.info("%s", summary(rows, outcome, wall, cfg.run_dir, cfg.trainer.steps, hydra_log_path()))


if __name__ == "__main__":
    main()
