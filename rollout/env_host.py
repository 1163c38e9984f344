"""Where an episode's environment runs: off the rollout worker's event loop.

The worker's event loop carries every episode in flight, the engine's streams and weight loads. An
environment that blocks it (a synchronous tool, a stuck subprocess, `time.sleep` or CPU work inside
`async def step`) would freeze all of them. So the episode loop never awaits an environment directly:
it calls it through a host (`env.executor`):

- `thread` (default): the environment's coroutines run on an event loop of their own, in a thread of
  the episode's own. A call that overruns `rollout.step_timeout_s` fails that episode at once and is
  cancelled; a thread still blocked a second later (`time.sleep`, a synchronous client) is abandoned
  (a daemon: it ends when the call returns or the worker exits) and its `close()` is not awaited. CPU-bound Python in such a thread still
  competes for the GIL with the worker (slower, never frozen): choose `process` for that.
- `process`: the environment lives in a child process of its own (spawned fresh, built there from
  `env.name` and `env.kwargs`), each call a message over a pipe. A call that overruns is ended by
  killing the process, so nothing of it is left running.

Hosts are per episode: one environment's failure never reaches another episode. `delay_s()` gives
each tool-calling step an artificial latency (`env.tool_latency_s`, fixed or heavy-tailed:
`env.tool_latency`): waiting costs no core, as real tools behind a network do, which makes it a
workload knob for benchmarks.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import random
import threading
from collections.abc import Callable
from typing import Any, Protocol

from slime.core.config import EnvConfig, EnvExecutor, ToolLatency


class EnvTimeout(Exception):
    """An environment call ran past its timeout."""


class EnvHost(Protocol):
    """One episode's environment, wherever it runs."""

    tools: Any  # the environment's `tools` attribute as it is (None when it has none)

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Await `env.<method>(*args)`; EnvTimeout past `timeout`, the env's own exception otherwise."""
        ...

    def has(self, method: str) -> bool: ...

    async def stop(self) -> None:
        """Release the host (after the episode, or after a timeout)."""
        ...


class ThreadHost:
    """The environment's coroutines on an event loop in a daemon thread of this episode's own."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.tools = getattr(env, "tools", None)
        self.stuck = False  # a call overran: the thread may still be inside it
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="slime-env", daemon=True)
        self._thread.start()

    def has(self, method: str) -> bool:
        return callable(getattr(self.env, method, None))

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self.stuck:
            raise EnvTimeout(f"env.{method}: an earlier call of this episode is still running")
        future = asyncio.run_coroutine_threadsafe(getattr(self.env, method)(*args), self._loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            future.cancel()  # takes effect at the env's next await, if it ever reaches one
            self.stuck = not await self._responsive()
            raise EnvTimeout(f"env.{method} timed out after {timeout:g}s") from None

    async def _responsive(self, within_s: float = 1.0) -> bool:
        """Whether the env's loop runs again (a cancelled `await` returns it; a blocked thread never)."""
        ping = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop)
        try:
            await asyncio.wait_for(asyncio.wrap_future(ping), within_s)
            return True
        except TimeoutError:
            return False

    async def stop(self) -> None:
        if self.stuck:  # the loop's thread is blocked: leave it to finish (or the process to exit)
            self._loop.call_soon_threadsafe(self._loop.stop)
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 5.0)
        if not self._thread.is_alive():
            self._loop.close()


def _serve(conn: Any, target: str, kwargs: dict[str, Any]) -> None:
    """The child process of a ProcessHost: build the environment, answer calls until told to stop.
    Replies are ("ok", value) or ("error", exception) (its type and message when it does not pickle)."""
    from envs.registry import load_env_class

    loop = asyncio.new_event_loop()
    try:
        env = load_env_class(target)(**kwargs)
        conn.send(("ok", getattr(env, "tools", None)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which fails the episode
        conn.send(("error", _picklable(e)))
        return
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return
        if method is None:
            return
        try:
            fn = getattr(env, method, None)
            reply = ("ok", None if fn is None else loop.run_until_complete(fn(*args)))
        except BaseException as e:  # noqa: BLE001
            reply = ("error", _picklable(e))
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable return value
            conn.send(("error", TypeError(f"env.{method} returned a value that cannot be sent back: {e}")))


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.dumps(e)
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


class ProcessHost:
    """The environment in a child process of its own; a call that overruns kills the process."""

    def __init__(self, target: str, kwargs: dict[str, Any]) -> None:
        self.target, self.kwargs = target, kwargs
        self.tools: Any = None
        self._proc: Any = None
        self._conn: Any = None
        self._methods: set[str] | None = None

    async def start(self, timeout: float | None) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads (vLLM, Ray)
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.target, self.kwargs), daemon=True)
        await asyncio.to_thread(self._proc.start)
        self._conn = parent
        self.tools = await self._reply("construction", timeout)

    def has(self, method: str) -> bool:
        from envs.registry import load_env_class

        if self._methods is None:
            cls = load_env_class(self.target)
            self._methods = {m for m in ("reset", "step", "close") if callable(getattr(cls, m, None))}
        return method in self._methods

    async def _reply(self, what: str, timeout: float | None) -> Any:
        ready = await asyncio.to_thread(self._conn.poll, timeout)
        if not ready:
            self._kill()
            raise EnvTimeout(f"env.{what} timed out after {timeout:g}s")
        try:
            status, value = await asyncio.to_thread(self._conn.recv)
        except EOFError:
            code = self._proc.exitcode if self._proc is not None else None
            raise RuntimeError(
                f"the environment's process died during env.{what} (exit code {code})"
            ) from None
        if status == "error":
            raise value
        return value

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        if self._proc is None or not self._proc.is_alive():
            raise RuntimeError(f"env.{method}: the environment's process is not running")
        await asyncio.to_thread(self._conn.send, (method, args))
        return await self._reply(method, timeout)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.is_alive():
            try:
                self._conn.send((None, ()))
            except (BrokenPipeError, OSError):
                pass
            await asyncio.to_thread(self._proc.join, 5.0)
            self._kill()
        self._conn.close()


async def open_host(cfg: EnvConfig, factory: Callable[[], Any], timeout: float | None) -> EnvHost:
    """A host for one episode's environment, per `cfg.executor`: `factory()` builds it here for a
    thread host; a process host builds `cfg.name(**cfg.kwargs)` in its child."""
    if cfg.executor == EnvExecutor.process:
        host = ProcessHost(cfg.name, cfg.kwargs)
        try:
            await host.start(timeout)
        except BaseException:
            await host.stop()
            raise
        return host
    return ThreadHost(factory())


def delay_s(cfg: EnvConfig, rng: random.Random) -> float:
    """One tool-calling step's artificial latency: `env.tool_latency_s` as a fixed delay, or the
    median of a lognormal with shape `env.tool_latency_sigma` (heavy-tailed: a few calls take many
    times the median), or 0 when unset."""
    if cfg.tool_latency_s <= 0:
        return 0.0
    if cfg.tool_latency == ToolLatency.fixed:
        return cfg.tool_latency_s
    return cfg.tool_latency_s * math.exp(rng.gauss(0.0, cfg.tool_latency_sigma))
