"""Entry point: `python -m slime.train +experiment=NAME [overrides]`.

Hydra composes `configs/` against the dataclass schemas (a wrong key or type fails here), the result
is converted to `SlimeConfig` once, checked by `validate`, and everything that can be wrong with the
model, environment or dataset is checked before any Ray actor starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from slime.config import SlimeConfig, register_configs, validate

log = logging.getLogger("slime")

register_configs()


def prepare(cfg: SlimeConfig) -> str:
    """Fail-fast checks and one-time preparation in the driver. Returns the local model dir.

    Raises ValueError (or a subclass) with a message that names the key to change.
    """
    from envs.dataset import load_tasks
    from envs.registry import load_env_class
    from slime.models import resolve_dtype, resolve_model

    validate(cfg)
    # Resolved once here so every actor gets a concrete dtype (set explicitly for mixed clusters).
    cfg.model.dtype = resolve_dtype(cfg.model.dtype)
    cfg.trainer.dtype = resolve_dtype(cfg.trainer.dtype)
    if cfg.buffer.replay_path and not os.path.exists(cfg.buffer.replay_path):
        raise ValueError(f"buffer.replay_path={cfg.buffer.replay_path!r} does not exist")
    if cfg.resume and not os.path.isdir(cfg.resume):
        raise ValueError(f"resume={cfg.resume!r} is not a checkpoint directory")
    env_cls = load_env_class(cfg.env.name)  # unknown env / broken plugin -> clear error now
    try:
        env_cls(**cfg.env.kwargs)  # wrong env.kwargs -> clear error now, not a failed episode each
    except Exception as e:
        raise ValueError(f"env.kwargs={cfg.env.kwargs} do not construct {cfg.env.name}: {e}") from e
    from envs.openai_agent import uses_agent

    if uses_agent(env_cls):
        from rollout.agent_episode import load_agent

        load_agent(cfg.env.agent)  # a wrong env.agent fails here, not inside a worker
    tasks = load_tasks(cfg.env, cfg.seed)  # empty or malformed dataset -> clear error now
    log.info("env %s: %d tasks", cfg.env.name, len(tasks))
    return resolve_model(cfg.model, cfg.cache_dir, cfg.seed)


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


def to_config(dcfg: DictConfig) -> SlimeConfig:
    """The single DictConfig -> dataclass conversion; nothing downstream sees a DictConfig."""
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, SlimeConfig)
    _reject_unknown_keys(cfg, "")
    return cfg


@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
    except ValueError as e:
        print(f"slime: config error: {e}", file=sys.stderr)
        sys.exit(2)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(OmegaConf.to_yaml(dcfg, resolve=True))
    try:
        model_dir = prepare(cfg)
    except (ValueError, TypeError, ImportError) as e:
        print(f"slime: config error: {e}", file=sys.stderr)
        sys.exit(2)
    from slime.controller import run_controller, to_dict

    rows = asyncio.run(run_controller(cfg, model_dir, to_dict(cfg)))
    if rows:
        first, last = rows[0], rows[-1]
        log.info(
            "done: %d steps, reward %.3f -> %.3f, run dir %s",
            len(rows),
            first.get("reward/mean", 0.0),
            last.get("reward/mean", 0.0),
            cfg.run_dir,
        )


if __name__ == "__main__":
    main()
