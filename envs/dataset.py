"""Tasks for an environment: from a local JSONL/Parquet file or the environment's own generator.

File rows have the columns `prompt` (a string, or a list of {"role", "content"} messages), `id`
(optional: defaults to "<file stem>-<row>") and `env_args` (optional: a dict, or a JSON string of
one -- a JSON string survives Parquet's column typing exactly, a dict column gains None for keys other
rows have). Files are read with the `datasets` library, locally; nothing is fetched from a hub.

Order: file order, or the generator's order. Shuffling between epochs is the consumer's job
(`env.dataset.shuffle`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from envs.registry import load_env_class
from slime.config import EnvConfig
from slime.types import Task

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import datasets

    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"env.dataset.path={str(path)!r}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)"
        )
    if not path.exists():
        raise FileNotFoundError(f"env.dataset.path={str(path)!r} does not exist")
    # Quiet datasets' progress bars; they would interleave with the run's console lines.
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:
        raise ValueError(f"env.dataset.path={str(path)!r} could not be read as {fmt}: {e}") from e
    if "prompt" not in ds.column_names:
        raise ValueError(
            f"env.dataset.path={str(path)!r} has no 'prompt' column (columns: {', '.join(ds.column_names)}); "
            "expected id, prompt, env_args"
        )
    return ds.to_list()


def _row_to_task(row: dict[str, Any], index: int, path: Path, env_name: str) -> Task:
    where = f"{path} row {index}"
    prompt = row["prompt"]
    if isinstance(prompt, list):
        for m in prompt:
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                raise ValueError(f"{where}: prompt messages need string 'role' and 'content'")
        prompt = [{k: v for k, v in m.items() if v is not None} for m in prompt]
    elif not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: prompt must be a non-empty string or a list of messages")
    env_args = row.get("env_args")
    if env_args is None:
        env_args = {}
    elif isinstance(env_args, str):
        try:
            env_args = json.loads(env_args)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: env_args is a string but not JSON ({e.msg})") from None
    if not isinstance(env_args, dict):
        raise ValueError(f"{where}: env_args must be a dict (or a JSON object string)")
    task_id = row.get("id")
    task_id = f"{path.stem}-{index}" if task_id is None or task_id == "" else str(task_id)
    return Task(id=task_id, prompt=prompt, env=env_name, env_args=env_args)


def load_tasks(env_cfg: EnvConfig, seed: int) -> list[Task]:
    """The task list for `env_cfg`.

    From `env.dataset.path` when set, else from the environment class's
    `make_tasks(env.dataset.num_tasks, seed, **env.dataset.kwargs)`. Raises ValueError naming
    `env.dataset` when the result is empty, when ids repeat, when a file lacks the prompt column, or
    when neither a path nor a generator exists.
    """
    ds_cfg = env_cfg.dataset
    if ds_cfg.path:
        path = Path(ds_cfg.path).expanduser()
        tasks = [_row_to_task(r, i, path, env_cfg.name) for i, r in enumerate(_read_rows(path))]
        source = f"env.dataset.path={ds_cfg.path!r}"
    else:
        cls = load_env_class(env_cfg.name)
        make = getattr(cls, "make_tasks", None)
        if make is None:
            raise ValueError(
                f"env {env_cfg.name!r} does not generate tasks (no make_tasks): set env.dataset.path to a "
                "JSONL/Parquet file"
            )
        tasks = make(int(ds_cfg.num_tasks), int(seed), **dict(ds_cfg.kwargs))
        source = (
            f"env {env_cfg.name!r} make_tasks(num_tasks={ds_cfg.num_tasks}, kwargs={dict(ds_cfg.kwargs)})"
        )
        if not isinstance(tasks, list) or not all(isinstance(t, Task) for t in tasks):
            raise ValueError(f"env.dataset: {source} must return a list of Task")
        for t in tasks:
            t.env = t.env or env_cfg.name
    if not tasks:
        raise ValueError(f"env.dataset is empty: {source} gave no tasks")
    seen: set[str] = set()
    for t in tasks:
        if t.id in seen:
            raise ValueError(f"env.dataset: task id {t.id!r} appears twice in {source}")
        seen.add(t.id)
    return tasks
