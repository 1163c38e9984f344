"""Find environment classes by name.

`load_env_class(name)` resolves, in order:
1. a built-in short name (`calculator`, `math`, ...; see BUILTIN_ENVS),
2. a dotted path `package.module:Class` (any importable class),
3. an installed entry point in the group `slime.envs` (pip-installable plugins declare
   `[project.entry-points."slime.envs"] my_env = "my_pkg.env:MyEnv"`).
Every class found is checked with `check_environment_class`, so a plugin with the wrong shape fails
here, at start-up, with a message naming what is missing.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from envs.base import check_environment_class, one_line

ENTRY_POINT_GROUP = "slime.envs"

# Short name -> "module:Class". Imported lazily: listing the registry must not import every env.
BUILTIN_ENVS: dict[str, str] = {
    "calculator": "envs.calculator:CalculatorEnv",
    "math": "envs.math_env:MathEnv",
    "guess_number": "envs.guess_number:GuessNumberEnv",
    "reasoning_gym": "envs.reasoning_gym_env:ReasoningGymEnv",
    "target": "envs.target:TargetEnv",
    "reward_fn": "envs.reward_fn:RewardFnEnv",
    "flaky": "envs.flaky:FlakyEnv",
    "long_tail": "envs.long_tail:LongTailEnv",
    "parcel": "envs.parcel:ParcelEnv",
    # Black-box agents over the OpenAI-compatible endpoint (run by rollout/agent/runner.py).
    "openai_agent": "envs.openai_agent:OpenAIAgentEnv",
    # Environments of other ecosystems, named by env.id (docs/environments.md).
    "verifiers": "envs.verifiers_env:VerifiersEnv",
    "openenv": "envs.openenv_env:OpenEnvEnv",
}


class EnvNotFoundError(ValueError):
    """The name matches no built-in, importable path or entry point."""


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_envs() -> dict[str, str]:
    """Every environment that can be named without a dotted path: short name -> "module:Class".

    Built-ins first; an entry point with a built-in's name is listed as "<name> (entry point)" only if
    it points elsewhere, since the built-in wins when resolving.
    """
    found = dict(BUILTIN_ENVS)
    for name, ep in sorted(_entry_points().items()):
        if name in found and found[name] != ep.value:
            found[f"{name} (entry point, shadowed)"] = ep.value
        else:
            found[name] = ep.value
    return found


def import_object(path: str, label: str, kind: str = "Class", error: type[Exception] = ValueError) -> Any:
    """The object `package.module:Name` names (`Name` may be dotted, e.g. `Class.attribute`).

    `label` starts every error message (e.g. "env 'pkg.mod:Env'" or "env.agent='pkg.mod:run'"), `kind`
    names what the path should point to in the format hint; failures raise `error` saying what is
    wrong: the format, the module that fails to import (and why), or the missing attribute.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise error(f"{label} must look like package.module:{kind}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise error(f"{label}: cannot import module {module_name!r} ({one_line(e)})") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise error(f"{label}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_env_class(name: str) -> type:
    """Resolve `name` to a checked environment class (see the module docstring).

    Raises EnvNotFoundError (a ValueError) listing the available names when nothing matches, and
    TypeError/ValueError from `check_environment_class` when the class has the wrong shape.
    """
    if not isinstance(name, str) or not name.strip():
        raise EnvNotFoundError(f"env.name must be a non-empty string; available: {', '.join(list_envs())}")
    name = name.strip()
    if name in BUILTIN_ENVS:
        cls = import_object(BUILTIN_ENVS[name], f"built-in env {name!r}", error=EnvNotFoundError)
    elif ":" in name:
        cls = import_object(name, f"env {name!r}", error=EnvNotFoundError)
    else:
        eps = _entry_points()
        if name not in eps:
            raise EnvNotFoundError(
                f"unknown environment {name!r}; available: {', '.join(list_envs())} "
                f"(or give a dotted path package.module:Class, or install a plugin in entry-point group "
                f"{ENTRY_POINT_GROUP!r})"
            )
        try:
            cls = eps[name].load()
        except Exception as e:
            raise EnvNotFoundError(f"entry point {name!r} ({eps[name].value}) failed to load: {e}") from e
    check_environment_class(cls)
    return cls
