"""A small OpenEnv environment written for slime's docs and tests (`env=openenv`, docs/environments.md):
the number-guessing game of slime's built-in `guess_number`, as an OpenEnv `Environment` with its
server. `examples.openenv_guess.env:GuessEnvironment` runs in process; `python -m
examples.openenv_guess.server --port 8765` serves it over OpenEnv's HTTP/WebSocket server."""
