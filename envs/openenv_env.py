"""`openenv`: train an OpenEnv environment (PyPI `openenv-core`), in process or over its server.

    python -m slime.train env=openenv env.id=package.module:EnvironmentClass    # in process
    python -m slime.train env=openenv env.kwargs.base_url=http://HOST:PORT      # over its server

OpenEnv environments are gym-style: `reset(seed, episode_id) -> Observation` and `step(Action) ->
Observation`, each observation carrying `reward` and `done`. They become slime episodes through the
ordinary environment loop (rollout/episode.py), token in, token out, one turn per step:

- **observation -> message**: the observation's own fields (OpenEnv's wire form: everything but
  `reward`, `done`, `metadata`) become one user message: `env.kwargs.observation_field` names the field
  whose text it is; unset, a single field's value is the text and several fields are written as JSON.
  `env.kwargs.system_prompt`, when set, comes first at reset.
- **reply -> action** (`env.kwargs.action_format`): `text` (default) puts the model's whole reply into
  one string field of the action, `env.kwargs.action_field`, or, unset, the action's only string field;
  `json` parses the reply (bare or in a ```json fence) as a JSON object of the action's fields. A reply
  the action does not accept (not JSON, or refused by the action's validation) is answered with a user
  message saying why, costs the turn, and the episode goes on (as the built-in envs treat a bad reply).
- **reward / done**: each step's `reward` (None counts 0) is that step's reward, summed over the
  episode as for every env; `done` ends it. A reward that is not a number fails the episode.
- **tasks**: OpenEnv has no dataset: task i is `reset(seed=..., **env.kwargs.reset_kwargs)` with a seed
  drawn from (slime's seed, i); `env.dataset.num_tasks` of them.

In process, `env.id` is the Environment subclass (`env.kwargs.env_kwargs` go to its constructor; the
action class comes from its `Environment[Action, Observation, State]` parameters or
`env.kwargs.action_class`). Over a server, each episode opens its own WebSocket session (OpenEnv's
`GenericEnvClient`, the session protocol its clients use: its HTTP `/reset` and `/step` keep no state
between calls), and the action's fields come from the server's `/schema`.

Failures: at start-up (`make_tasks`, run by the driver's checks) a class that does not import or is not
an OpenEnv Environment, an action field that cannot be chosen, or a server that does not answer
`/health` within `env.kwargs.connect_timeout_s` raise a ValueError naming the key to fix. During the
run, an environment that raises, a server that stops answering (`env.kwargs.message_timeout_s`, and
slime's own `rollout.step_timeout_s`) or a reward that is not a number fail that episode only.
"""

from __future__ import annotations

import json
import math
import random
import re
import typing
from typing import Any

from envs.base import Action, Environment, StepResult, import_extra, one_line
from slime.core.types import Message, Task

ACTION_FORMATS = ("text", "json")
# Fields of OpenEnv's Action base class that are not the agent's to fill.
_BASE_ACTION_FIELDS = {"metadata"}
_JSON_FENCE = re.compile(r"```(?:json)?\s*(\{.*\})\s*```", re.DOTALL)


class OpenEnvError(ValueError):
    """The OpenEnv environment cannot be used as configured (start-up)."""


def _openenv() -> Any:
    return import_extra(
        "openenv.core.env_server.interfaces", "env=openenv", "openenv-core", "openenv", OpenEnvError
    )


def environment_class(path: str) -> type:
    """The OpenEnv Environment subclass `package.module:Class` names; OpenEnvError otherwise."""
    from envs.registry import import_object

    interfaces = _openenv()
    cls = import_object(path, f"env.id={path!r}", kind="EnvironmentClass", error=OpenEnvError)
    if not (isinstance(cls, type) and issubclass(cls, interfaces.Environment)):
        raise OpenEnvError(
            f"env.id={path!r} is {cls!r}, not an OpenEnv Environment subclass "
            "(openenv.core.env_server.interfaces.Environment)"
        )
    return cls


def action_class_of(env_cls: type) -> type | None:
    """The Action class of `Environment[ActT, ObsT, StateT]` in `env_cls`'s bases; None when unbound."""
    from openenv.core.env_server.types import Action as OpenEnvAction

    for klass in env_cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], OpenEnvAction):
                return args[0]
    return None


def choose_action_field(schema: dict[str, Any], requested: str, action_format: str) -> str:
    """The action field the reply's text goes into (action_format=text); "" for json. OpenEnvError
    naming env.kwargs.action_field when it cannot be chosen."""
    fields = {k: v for k, v in (schema.get("properties") or {}).items() if k not in _BASE_ACTION_FIELDS}
    if action_format == "json":
        return ""
    if requested:
        if requested not in fields:
            raise OpenEnvError(
                f"env.kwargs.action_field={requested!r} is not a field of the action (fields: {sorted(fields)})"
            )
        return requested
    strings = [k for k, v in fields.items() if v.get("type") == "string"]
    if len(strings) == 1:
        return strings[0]
    raise OpenEnvError(
        f"the action has {len(strings)} string fields ({strings}; all fields: {sorted(fields)}): set "
        "env.kwargs.action_field to the one the model's reply goes into, or env.kwargs.action_format=json "
        "for replies that are JSON objects of the action's fields"
    )


def check_server(base_url: str, timeout: float) -> dict[str, Any]:
    """The server's action JSON schema, after `/health` answered; OpenEnvError naming env.kwargs.base_url
    when it does not answer or answers wrongly."""
    import httpx

    url = base_url.rstrip("/")
    try:
        health = httpx.get(f"{url}/health", timeout=timeout)
        health.raise_for_status()
        schema = httpx.get(f"{url}/schema", timeout=timeout)
        schema.raise_for_status()
        return dict(schema.json()["action"])
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise OpenEnvError(
            f"env.kwargs.base_url={base_url!r}: the OpenEnv server does not answer /health and /schema "
            f"({one_line(e)}): start it (e.g. python -m examples.openenv_guess.server --port PORT) or fix the URL"
        ) from e


# base_url -> the server's action schema, fetched once per process (every episode of a worker needs it).
_SERVER_SCHEMAS: dict[str, dict[str, Any]] = {}


def server_action_schema(base_url: str, timeout: float) -> dict[str, Any]:
    """`check_server`'s action schema, cached per process."""
    if base_url not in _SERVER_SCHEMAS:
        _SERVER_SCHEMAS[base_url] = check_server(base_url, timeout)
    return _SERVER_SCHEMAS[base_url]


def observation_text(fields: dict[str, Any], field: str) -> str:
    """The user message for an observation's fields (see the module docstring)."""
    if field:
        if field not in fields:
            raise ValueError(
                f"env.kwargs.observation_field={field!r} is not in the observation (fields: {sorted(fields)})"
            )
        value = fields[field]
        return value if isinstance(value, str) else json.dumps(value, default=str)
    if len(fields) == 1:
        (value,) = fields.values()
        return value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(fields, default=str)


def step_reward(reward: Any) -> float:
    """A step's reward as a float: None is 0; anything but a finite number raises TypeError/ValueError."""
    if reward is None:
        return 0.0
    if isinstance(reward, bool):
        return float(reward)
    if not isinstance(reward, int | float):
        raise TypeError(
            f"the OpenEnv observation's reward is not a number: {reward!r} ({type(reward).__name__})"
        )
    if not math.isfinite(reward):
        raise ValueError(f"the OpenEnv observation's reward is not finite: {reward}")
    return float(reward)


class OpenEnvEnv(Environment):
    """`env=openenv`: one OpenEnv episode per slime episode (see the module docstring)."""

    TASKS_FROM_KWARGS = True  # make_tasks gets env.kwargs too: it checks the environment at start-up

    def __init__(
        self,
        id: str = "",  # noqa: A002 - env.id
        base_url: str = "",
        env_kwargs: dict[str, Any] | None = None,
        action_class: str = "",
        action_field: str = "",
        action_format: str = "text",
        observation_field: str = "",
        system_prompt: str = "",
        reset_kwargs: dict[str, Any] | None = None,
        connect_timeout_s: float = 10.0,
        message_timeout_s: float = 60.0,
    ) -> None:
        _openenv()
        if bool(id) == bool(base_url):
            raise OpenEnvError(
                "env=openenv needs exactly one of env.id=package.module:EnvironmentClass (in process) and "
                "env.kwargs.base_url=http://HOST:PORT (its server)"
            )
        if action_format not in ACTION_FORMATS:
            raise OpenEnvError(
                f"env.kwargs.action_format must be one of {ACTION_FORMATS}, got {action_format!r}"
            )
        self.env_id, self.base_url = id, base_url
        self.env_kwargs = dict(env_kwargs or {})
        self.action_format, self.observation_field = action_format, observation_field
        self.system_prompt, self.reset_kwargs = system_prompt, dict(reset_kwargs or {})
        self.connect_timeout_s, self.message_timeout_s = connect_timeout_s, message_timeout_s
        self._action_field_requested = action_field
        self._action_cls: type | None = None
        if id:
            self._env_cls = environment_class(id)
            if action_class:
                from envs.registry import import_object

                self._action_cls = import_object(
                    action_class, f"env.kwargs.action_class={action_class!r}", error=OpenEnvError
                )
            else:
                self._action_cls = action_class_of(self._env_cls)
            if self._action_cls is None:
                raise OpenEnvError(
                    f"env.id={id!r} does not bind its Action type (Environment[Action, Observation, State]): "
                    "set env.kwargs.action_class=package.module:ActionClass"
                )
            self.action_field = choose_action_field(
                self._action_cls.model_json_schema(), action_field, action_format
            )
        else:
            self.action_field = ""  # from the server's schema, at the first reset (_server_action_field)
        self._env: Any = None  # the Environment instance (in process) or the session client (server)

    # ------------------------------------------------------------------ tasks and start-up checks

    @classmethod
    def make_tasks(cls, num: int, seed: int, **kwargs: Any) -> list[Task]:
        """`num` episodes, each a reset seed drawn from (seed, i). Checks the environment first: the class
        builds with env.kwargs.env_kwargs, or the server answers and its action field can be chosen."""
        probe = cls(**kwargs)
        if probe.base_url:
            # Fresh, not the per-process cache: a restarted server may serve another version.
            schema = check_server(probe.base_url, probe.connect_timeout_s)
            choose_action_field(schema, probe._action_field_requested, probe.action_format)
            name = probe.base_url
        else:
            try:
                probe._env_cls(**probe.env_kwargs).close()
            except Exception as e:
                raise OpenEnvError(
                    f"env.id={probe.env_id!r} does not build with env.kwargs.env_kwargs={probe.env_kwargs}: "
                    f"{one_line(e)}"
                ) from e
            name = probe.env_id
        rng = random.Random(f"openenv-{seed}")
        tasks = []
        for i in range(num):
            reset_seed = rng.randrange(2**31)
            tasks.append(
                Task(
                    id=f"openenv-{seed}-{i}",
                    prompt=f"(OpenEnv {name}: the first observation of reset(seed={reset_seed}))",
                    env="openenv",
                    env_args={"seed": reset_seed},
                )
            )
        return tasks

    # ------------------------------------------------------------------ the episode

    async def reset(self, task: Task) -> list[Message]:
        kwargs = {**self.reset_kwargs, "seed": task.env_args.get("seed")}
        if self.base_url:
            from openenv.core.generic_client import GenericEnvClient

            schema = server_action_schema(self.base_url, self.connect_timeout_s)
            self.action_field = choose_action_field(schema, self._action_field_requested, self.action_format)
            self._env = GenericEnvClient(
                self.base_url,
                connect_timeout_s=self.connect_timeout_s,
                message_timeout_s=self.message_timeout_s,
            )
            result = await self._env.reset(**kwargs)
            fields, reward, done = result.observation, result.reward, result.done
        else:
            from openenv.core.env_server.serialization import serialize_observation

            self._env = self._env_cls(**self.env_kwargs)
            wire = serialize_observation(await self._env.reset_async(episode_id=str(task.id), **kwargs))
            fields, reward, done = wire["observation"], wire["reward"], wire["done"]
        step_reward(reward)  # a malformed reward fails the episode now, not at the first step
        if done:
            raise ValueError("the OpenEnv environment was done at reset: nothing to play")
        messages: list[Message] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )
        messages.append({"role": "user", "content": observation_text(fields, self.observation_field)})
        return messages

    def _action(self, text: str) -> tuple[dict[str, Any] | None, str]:
        """(the action's fields, "") or (None, why the reply is not an action)."""
        if self.action_format == "text":
            fields: Any = {self.action_field: text}
        else:
            fence = _JSON_FENCE.search(text)
            try:
                fields = json.loads(fence.group(1) if fence else text.strip())
            except json.JSONDecodeError as e:
                return None, f"Your reply is not a JSON object of the action's fields ({e})."
            if not isinstance(fields, dict):
                return (
                    None,
                    f"Your reply must be a JSON object of the action's fields, got {type(fields).__name__}.",
                )
        if self._action_cls is not None:
            from pydantic import ValidationError

            try:
                self._action_cls.model_validate(fields)
            except ValidationError as e:
                return None, f"Your reply is not a valid action: {one_line(e)}"
        return fields, ""

    async def step(self, action: Action) -> StepResult:
        fields, why = self._action(action.content)
        if fields is None:
            return StepResult([{"role": "user", "content": why}], 0.0, False, {"invalid_action": True})
        if self.base_url:
            try:
                result = await self._env.step(fields)
            except RuntimeError as e:
                if "VALIDATION_ERROR" not in str(e):
                    raise
                # The server refused the action's fields: the model's reply was not an action.
                msg = f"Your reply is not a valid action: {one_line(e)}"
                return StepResult([{"role": "user", "content": msg}], 0.0, False, {"invalid_action": True})
            obs, reward, done = result.observation, result.reward, result.done
        else:
            from openenv.core.env_server.serialization import serialize_observation

            wire = serialize_observation(await self._env.step_async(self._action_cls.model_validate(fields)))
            obs, reward, done = wire["observation"], wire["reward"], wire["done"]
        observation = (
            [] if done else [{"role": "user", "content": observation_text(obs, self.observation_field)}]
        )
        return StepResult(observation, step_reward(reward), bool(done), {})

    async def close(self) -> None:
        env, self._env = self._env, None
        if env is None:
            return
        if self.base_url:
            await env.close()
        else:
            env.close()
