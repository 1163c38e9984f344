"""Black-box agents: an OpenAI- and Anthropic-compatible endpoint in front of the rollout engine, and the
episodes an agent function runs against it.

- `protocol.py`: the OpenAI Chat Completions / Completions wire format as pure functions (requests
  parsed and validated, responses, JSON and streamed, built from one envelope), and what every API
  shares: the normal form of messages, sampling checks, replies parsed for tool calls.
- `responses.py`: the OpenAI Responses API wire format, as pure functions.
- `messages.py`: Anthropic's Messages API wire format, as pure functions.
- `session.py`: one episode's recorded calls (`CallRecord`, `EpisodeSession`).
- `prefix.py`: prompt ids for a request, reusing an earlier call's ids token-exactly where the
  conversation continues it.
- `server.py`: `AgentServer`, the routes and sessions served inside the rollout worker.
- `runner.py`: loading the agent function, running its episodes, turning calls into trajectories.
"""
