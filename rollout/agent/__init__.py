"""Black-box agents: an OpenAI-compatible endpoint in front of the rollout engine, and the episodes an
agent function runs against it.

- `protocol.py`: the OpenAI wire format as pure functions: requests parsed and validated, responses
  (JSON and streamed) built from one envelope.
- `session.py`: one episode's recorded calls (`CallRecord`, `EpisodeSession`).
- `prefix.py`: prompt ids for a request, reusing an earlier call's ids token-exactly where the
  conversation continues it.
- `server.py`: `AgentServer`, the routes and sessions served inside the rollout worker.
- `runner.py`: loading the agent function, running its episodes, turning calls into trajectories.
"""
