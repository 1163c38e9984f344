"""Generate docs/config.md from the config dataclasses, the YAML presets and the built-in environments.

    python -m slime.config_docs            # print it
    python -m slime.config_docs --write    # write docs/config.md

`tests/test_config.py` fails when docs/config.md differs from what this prints, so the page can only
say what `slime/core/config/` (types, defaults, choices, descriptions), `configs/` (presets) and the
environments' signatures (their own arguments' defaults) say.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from slime.core.config import EnvArgs, SlimeConfig, field_choices, iter_fields

ROOT = Path(__file__).resolve().parents[1]
DOC_PATH = ROOT / "docs" / "config.md"
CONFIGS = Path(__file__).resolve().parent / "configs"
GROUPS = ("model", "env", "rollout", "trainer", "algorithm", "buffer", "logger", "experiment")
MAX_DEFAULT_CHARS = 40  # longer defaults (system prompts) are cut: the source has them in full


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "choice"
    if isinstance(hint, type):
        return hint.__name__
    origin = typing.get_origin(hint)
    return getattr(origin, "__name__", str(hint))


def _value(value: Any, limit: int = MAX_DEFAULT_CHARS) -> str:
    """A value as it would be written on the command line (YAML flow style), cut at `limit` chars."""
    if isinstance(value, enum.Enum):
        text = str(value.value)
    elif isinstance(value, str):
        text = "required" if value == MISSING else (value or '""')
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple):
        text = "[" + ", ".join(_value(v, 0) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{k}: {_value(v, 0)}" for k, v in value.items()) + "}"
    else:
        text = repr(value)
    if limit and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _row(key: str, f: dataclasses.Field, hint: Any) -> str:
    choices = ", ".join(f"`{c}`" for c in field_choices(f, hint))
    default = _cell(_value(_default(f)))
    return f"| `{key}` | {_type_name(hint)} | `{default}` | {choices} | {_cell(f.metadata.get('help', ''))} |"


_TABLE_HEAD = ["| key | type | default | choices | description |", "|---|---|---|---|---|"]


def _keys_table(cls: type, prefix: str) -> list[str]:
    return [*_TABLE_HEAD, *(_row(key, f, hint) for key, f, hint in iter_fields(cls, prefix))]


def _summary(path: Path) -> str:
    """The first line of a YAML file's leading comment (each file starts with a one-line summary)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# ") and not line.startswith("# @package"):
            return line[2:].strip()
    return ""


def _flatten(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        if not node:
            return [f"{prefix}={{}}"] if prefix else []
        out = []
        for k, v in node.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [f"{prefix}={_value(node)}"]


def _presets() -> list[str]:
    lines = []
    for group in GROUPS:
        lines += [f"### `{group}`", "", "| option | what | sets |", "|---|---|---|"]
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            data = OmegaConf.to_container(OmegaConf.load(path)) or {}
            data.pop("defaults", None)
            sets = _flatten(data, "" if group == "experiment" else group) if data else []
            shown = ", ".join(f"`{s}`" for s in sets) or "(only the defaults)"
            lines.append(f"| `{path.stem}` | {_cell(_summary(path))} | {_cell(shown)} |")
        lines.append("")
    return lines


def _arguments(fn: Any) -> str:
    params = [
        p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", "cls", "num", "seed")
    ]
    parts = []
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            parts.append(f"`**{p.name}`")
        elif p.kind is not p.VAR_POSITIONAL:
            default = "required" if p.default is p.empty else _value(p.default)
            parts.append(f"`{p.name}={_cell(default)}`")
    return ", ".join(parts) or "-"


def _environments() -> list[str]:
    from envs.registry import BUILTIN_ENVS

    lines = ["| env | `env.kwargs` (constructor) | `env.dataset.kwargs` (`make_tasks`) |", "|---|---|---|"]
    for path in sorted((CONFIGS / "env").glob("*.yaml")):
        name = OmegaConf.load(path).name
        module, _, attr = BUILTIN_ENVS[name].partition(":")
        cls = getattr(importlib.import_module(module), attr)
        make = getattr(cls, "make_tasks", None)
        lines.append(f"| `{name}` | {_arguments(cls.__init__)} | {_arguments(make) if make else '-'} |")
    return lines


def render() -> str:
    """The whole of docs/config.md."""
    hints = typing.get_type_hints(SlimeConfig)
    fields = dataclasses.fields(SlimeConfig)
    sections = [f for f in fields if dataclasses.is_dataclass(hints[f.name])]
    top_rows = [_row(f.name, f, hints[f.name]) for f in fields if f not in sections]
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m slime.config_docs --write` from slime/core/config/, slime/configs/ and the",
        "built-in environments; tests/test_config.py fails when this file is stale. Do not edit by hand. -->",
        "",
        "`python -m slime.train +experiment=NAME [group=option] [key=value ...]`. Hydra composes the",
        "groups below onto the dataclasses of `slime/core/config/` (one module per group), which hold every key's type, default,",
        "choices and description; the YAML files set only what differs. A wrong key, type or choice fails",
        "when Hydra composes; the checks across keys (`validate()` of each section and of the whole",
        "config) fail before Ray or any actor starts, with a message naming the keys to change.",
        "",
        "## Top level",
        "",
        *_TABLE_HEAD,
        *top_rows,
        "",
    ]
    for f in sections:
        cls = hints[f.name]
        out += [f"## `{f.name}`", "", (cls.__doc__ or "").strip(), "", *_keys_table(cls, f"{f.name}."), ""]
        if f.name == "env":
            out += [
                "`env.by_name.<name>` holds arguments for one environment, used only while `env.name` is",
                "`<name>` (folded under `env.kwargs` / `env.dataset.kwargs`, whose own keys win). Experiments",
                "put environment-specific settings there, so choosing another environment (`env=Y` or",
                "`env.name=X`) gives that environment its own defaults. Keys of an entry:",
                "",
                *_keys_table(EnvArgs, "env.by_name.<name>."),
                "",
                "`env.kwargs.K=V` and `env.dataset.kwargs.K=V` add a key without `+`; the environment's",
                "constructor (or `make_tasks`) rejects one it does not take, at start-up. Hydra's `--cfg job`",
                "prints the config before this fold; a run's `config.yaml` holds what the environment got.",
                "",
                "### Arguments of the built-in environments",
                "",
                "Their defaults are the environments' own (the `env/` group files set only `name`):",
                "",
                *_environments(),
                "",
            ]
    out += [
        "## Presets (`configs/`)",
        "",
        "`group=option` selects a file; `+experiment=NAME` adds an experiment (`# @package _global_`).",
        "",
        *_presets(),
    ]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slime.config_docs", description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {DOC_PATH.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
