"""OpenEnv's HTTP/WebSocket server for the guessing game:

    python -m examples.openenv_guess.server --port 8765 [--reward-kind text]

`env=openenv env.kwargs.base_url=http://127.0.0.1:8765` then trains against it (one WebSocket session
per episode, as OpenEnv's own clients use it).
"""

from __future__ import annotations

import argparse
import functools

import uvicorn
from openenv.core.env_server.http_server import create_app

from examples.openenv_guess.env import GuessAction, GuessEnvironment, GuessObservation


def make_app(max_sessions: int = 64, **env_kwargs):
    """The FastAPI app: a fresh GuessEnvironment(**env_kwargs) per session, up to `max_sessions` at once
    (a rollout worker runs a whole group of episodes concurrently)."""
    factory = functools.partial(GuessEnvironment, **env_kwargs)
    return create_app(factory, GuessAction, GuessObservation, max_concurrent_envs=max_sessions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--reward-kind", default="number", choices=["number", "text"])
    args = parser.parse_args()
    app = make_app(args.max_sessions, reward_kind=args.reward_kind)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
