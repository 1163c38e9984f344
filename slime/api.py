"""Programmatic entry: compose the same Hydra config as the CLI and run it (tests, benchmarks, notebooks).

    rows = slime.api.run(["+experiment=tiny", "buffer.max_staleness=0"], run_dir="runs/x")

Each call starts its actors and tears them down; the Ray cluster (if this process started one) is
kept so several runs in one process share it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from slime.core.config import SlimeConfig, register_configs


def compose_config(overrides: list[str], run_dir: str) -> SlimeConfig:
    """Compose `configs/config.yaml` with CLI-style overrides into a validated-type SlimeConfig."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from slime.train import to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="slime.configs", version_base="1.3"):
        dcfg = compose(config_name="config", overrides=overrides)
    OmegaConf.update(dcfg, "run_dir", os.path.abspath(run_dir), force_add=True)
    return to_config(dcfg)


def run(overrides: list[str], run_dir: str) -> list[dict[str, Any]]:
    """Run one training job; returns the metric rows (also in <run_dir>/metrics.jsonl). Writes
    <run_dir>/config.yaml as the CLI does (what `slime.simulate` and the benchmarks' reports read)."""
    from slime.controller import run_controller, to_dict
    from slime.train import config_yaml, prepare

    cfg = compose_config(overrides, run_dir)
    model_dir = prepare(cfg)
    os.makedirs(cfg.run_dir, exist_ok=True)
    with open(os.path.join(cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config_yaml(cfg))
    return asyncio.run(run_controller(cfg, model_dir, to_dict(cfg)))
