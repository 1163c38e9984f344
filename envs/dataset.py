"""Tasks for an environment: from a dataset (`env.dataset.path`) or the environment's own generator.

`env.dataset.path` is, in this order: a local directory written by `datasets`' `save_to_disk`; a
local JSONL/Parquet file; or a hub id `owner/name`, optionally `owner/name:config`, fetched by
`datasets` where the network allows. A `@split` suffix picks the split of a directory or hub
dataset (default `train`, or the only split).

Rows have the columns `prompt` (a string, or a list of {"role", "content"} messages), `id`
(optional: defaults to "<file stem>-<row>"), `env_args` (optional: a dict, or a JSON string of
one -- a JSON string survives Parquet's column typing exactly, a dict column gains None for keys other
rows have) and any other columns, which join `env_args` (a key in `env_args` itself wins): a dataset
with flat columns such as `answer` reaches the environment as `task.env_args["answer"]`.

Order: file order, or the generator's order. Shuffling between epochs is the consumer's job
(`env.dataset.shuffle`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from envs.registry import load_env_class
from slime.core.config import EnvConfig
from slime.core.types import Task

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
_OWN_COLUMNS = ("id", "prompt", "env_args")


def _split_of(spec: str) -> tuple[str, str | None]:
    """`where@split` -> (where, split); no suffix -> (spec, None)."""
    where, sep, split = spec.rpartition("@")
    return (where, split) if sep and where and split else (spec, None)


def _pick_split(ds: Any, split: str | None, spec: str) -> Any:
    """The Dataset of a DatasetDict: `split`, else `train`, else the only one."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        if split is not None:
            raise ValueError(f"env.dataset.path={spec!r}: a single dataset has no splits; remove '@{split}'")
        return ds
    names = list(ds)
    chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if chosen not in names:
        raise ValueError(
            f"env.dataset.path={spec!r}: choose a split with a '@split' suffix (splits: {', '.join(names)})"
        )
    return ds[chosen]


def _load(spec: str) -> Any:
    """The `datasets.Dataset` that `env.dataset.path` names (see the module docstring)."""
    import datasets

    # Quiet datasets' progress bars; they would interleave with the run's console lines.
    datasets.disable_progress_bars()
    path = Path(spec).expanduser()
    where, split = (spec, None) if path.exists() else _split_of(spec)
    local = Path(where).expanduser()
    if local.is_dir():
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as e:
            raise ValueError(
                f"env.dataset.path={spec!r} is a directory but not one written by datasets' save_to_disk: {e}"
            ) from e
        return _pick_split(ds, split, spec)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is not None:
        if not path.exists():
            raise FileNotFoundError(f"env.dataset.path={spec!r} does not exist")
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as e:
            raise ValueError(f"env.dataset.path={spec!r} could not be read as {fmt}: {e}") from e
    if _HUB_ID.match(where) and local.suffix.lower() not in (".csv", ".tsv", ".txt"):
        repo, _, config = where.partition(":")
        try:
            return datasets.load_dataset(repo, config or None, split=split or "train")
        except Exception as e:
            raise ValueError(
                f"env.dataset.path={spec!r} is no local file or directory, and loading it as the hub dataset "
                f"{repo!r} (config {config or 'default'}, split {split or 'train'}) failed: {e}"
            ) from e
    raise ValueError(
        f"env.dataset.path={spec!r}: unsupported file type {path.suffix!r} (use .jsonl or .parquet, a "
        "save_to_disk directory, or a hub id owner/name)"
    )


def _read_rows(spec: str) -> list[dict[str, Any]]:
    ds = _load(spec)
    if "prompt" not in ds.column_names:
        raise ValueError(
            f"env.dataset.path={spec!r} has no 'prompt' column (columns: {', '.join(ds.column_names)}); "
            "expected prompt and optionally id, env_args and columns that join env_args"
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
    env_args = {**{k: v for k, v in row.items() if k not in _OWN_COLUMNS}, **env_args}
    task_id = row.get("id")
    task_id = f"{path.stem}-{index}" if task_id is None or task_id == "" else str(task_id)
    return Task(id=task_id, prompt=prompt, env=env_name, env_args=env_args)


def load_tasks(env_cfg: EnvConfig, seed: int) -> list[Task]:
    """The task list for `env_cfg`.

    From `env.dataset.path` when set, else from the environment class's
    `make_tasks(env.dataset.num_tasks, seed, **env.dataset.kwargs)` (plus `env.kwargs`, the dataset's
    keys winning, for a class with `TASKS_FROM_KWARGS = True`: adapters such as env=verifiers, whose
    tasks come from the same configuration as their episodes). Raises ValueError naming
    `env.dataset` when the result is empty, when ids repeat, when a file lacks the prompt column, or
    when neither a path nor a generator exists.
    """
    ds_cfg = env_cfg.dataset
    if ds_cfg.path:
        path = Path(_split_of(ds_cfg.path)[0]).expanduser()
        tasks = [_row_to_task(r, i, path, env_cfg.name) for i, r in enumerate(_read_rows(ds_cfg.path))]
        source = f"env.dataset.path={ds_cfg.path!r}"
    else:
        cls = load_env_class(env_cfg.name)
        make = getattr(cls, "make_tasks", None)
        if make is None:
            raise ValueError(
                f"env {env_cfg.name!r} does not generate tasks (no make_tasks): set env.dataset.path to a "
                "JSONL/Parquet file, a save_to_disk directory or a hub id"
            )
        kwargs = dict(ds_cfg.kwargs)
        if getattr(cls, "TASKS_FROM_KWARGS", False):  # adapters: the tasks are part of the env's config
            kwargs = {**env_cfg.kwargs, **kwargs}
        tasks = make(int(ds_cfg.num_tasks), int(seed), **kwargs)
        source = f"env {env_cfg.name!r} make_tasks(num_tasks={ds_cfg.num_tasks}, kwargs={kwargs})"
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
