"""An OpenAI-compatible endpoint in front of the rollout engine, for black-box agents.

One `AgentServer` per rollout worker: a FastAPI app served by uvicorn inside the worker's event loop
(the same loop as the engine) on a free 127.0.0.1 port. Each agent episode gets its own session and
base URL, `http://127.0.0.1:PORT/episodes/<episode_id>/v1`, so the calls of concurrent episodes are
recorded separately. Routes under that base URL:

- `POST /chat/completions` -- messages rendered with the model's chat template through `ChatFormat`
  (tools in the request are rendered exactly as the framework renders env tools; the reply's tool
  calls are parsed back into OpenAI `tool_calls`).
- `POST /completions` -- a text prompt (or a list of token ids) continued as is.
- `GET /models` -- the one served model (also at `/v1/models`).

Every successful call is recorded in its session as a `CallRecord`: the exact prompt token ids, the
generated ids exactly as the engine produced them (never re-tokenised), their logprobs and versions.
`rollout.agent_episode` turns the records into trajectories.

Token-exact continuation. Agents resend the whole conversation on every call, as text. Re-rendering it
would re-tokenise the model's earlier replies, which can give different ids than the ones generated.
So when a chat request's messages start with an earlier call's messages followed by that call's reply
(same content and tool calls, same tools), the prompt is built the way the env episode loop builds it:
the earlier call's prompt ids + its generated ids (+ the turn-end token if the reply did not end with
one) + `ChatFormat.delta_ids` of the new messages. Completions do the same when the prompt string
starts with an earlier prompt + the text returned for it (only when that text decodes the generated
ids completely, i.e. no special token skipped and no stop string cut). Anything else is rendered from
scratch. Either way the prompt ids are recorded exactly as sent to the engine.

Sampling: temperature, top_p, seed, stop and max_tokens / max_completion_tokens come from the request
(temperature and top_p default to the rollout config's); max_tokens is capped by
`rollout.max_tokens_per_turn` and by what is left of `rollout.max_total_tokens` after the prompt; a
prompt that leaves no room is rejected (400, code `context_length_exceeded`). Only n=1. Logprobs in
responses are the engine's: the temperature-1 log-probabilities the trainer recomputes; with
`top_logprobs` / `logprobs=k` only the sampled token is listed. `stream=true` is answered with the
finished reply as one chunk, then the finish chunk. Unsupported options that would change the
output (penalties, logit_bias, n>1, echo, best_of, structured output, forcing a named tool) get a
400 naming the option. Extension (as in vLLM): `return_token_ids=true` adds `prompt_token_ids` and
each choice's `token_ids` to the response.

An engine exception inside a call answers 500 to the agent and is kept on the session
(`EpisodeSession.engine_error`, `engine_failed`), so the episode runner can propagate it: engine
failures are the worker's to handle, not the agent's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

# FastAPI reads the handlers' annotations (Request) from this module's globals: import at module level.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from envs.base import check_tools
from rollout.chat import ChatFormat, parse_tool_calls, strip_tool_calls
from slime.config import RolloutConfig
from slime.types import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "slime-policy"
_ROLES = {"system", "developer", "user", "assistant", "tool"}
# Request options that change what is generated and that this server cannot honour: rejected, not ignored.
_UNSUPPORTED_IF_SET = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "functions": None,
    "function_call": None,
    "audio": None,
    "prediction": None,
    "suffix": None,
}

# Canonical message: (role, content, ((tool name, arguments JSON), ...), tool_call_id, name).
CanonMessage = tuple[str, str, tuple[tuple[str, str], ...], str, str]


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI-style error response."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


@dataclass
class CallRecord:
    """One model call of an episode, token-exact.

    prompt_ids: the ids sent to the engine; completion_ids / logprobs / versions: what the engine
    returned, unchanged. reused_prefix: how many leading prompt ids were taken verbatim from an earlier
    call's prompt + completion (0 when the prompt was rendered from scratch).
    """

    index: int
    kind: str  # "chat" | "completion"
    request_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # the engine's: "stop" | "length" | "abort"
    reused_prefix: int
    sampling: dict[str, Any]
    generate_s: float
    tool_calls: int = 0  # tool calls returned to the agent
    malformed_tool_call: bool = False  # the reply tried to call a tool but could not be parsed
    # Matching state for token-exact continuation (see the module docstring).
    messages: tuple[CanonMessage, ...] = ()
    tools_key: str = ""
    reply: CanonMessage | None = None
    prompt_text: str | None = None
    continuation_text: str | None = None  # prompt_text + completion text, when the text is exact


@dataclass
class EpisodeSession:
    """The calls of one agent episode. `calls` is in completion order."""

    episode_id: str
    base_url: str
    calls: list[CallRecord] = field(default_factory=list)
    closed: bool = False
    engine_error: BaseException | None = None
    engine_failed: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: set[str] = field(default_factory=set)
    _next_index: int = 0

    def next_request_id(self) -> tuple[int, str]:
        i = self._next_index
        self._next_index += 1
        return i, f"agent-{self.episode_id}-{i}"


# ------------------------------------------------------------------------------ request parsing


def _error_body(message: str, param: str | None, code: str | None, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _text_content(content: Any, where: str) -> str:
    """OpenAI message content (None, a string, or text parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"{where}.content[{j}]: only text parts are supported", param=f"{where}.content"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(
        f"{where}.content must be a string, a list of text parts or null", param=f"{where}.content"
    )


def _tool_call_arguments(raw: Any, where: str) -> dict[str, Any]:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RequestError(f"{where}.function.arguments is not JSON ({e.msg})", param=where) from None
    if not isinstance(raw, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object", param=where)
    return raw


def _parse_messages(raw: Any) -> list[dict[str, Any]]:
    """Validate request messages into a normal form: role, content (str), tool_calls as
    [(name, arguments dict)], tool_call_id, name. Raises RequestError naming the message."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"{where}.role must be one of {sorted(_ROLES)}, got {role!r}", param=f"{where}.role"
            )
        calls: list[tuple[str, dict[str, Any]]] = []
        if role == "assistant" and m.get("tool_calls"):
            if not isinstance(m["tool_calls"], list):
                raise RequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
            for j, tc in enumerate(m["tool_calls"]):
                cw = f"{where}.tool_calls[{j}]"
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise RequestError(f"{cw} needs function.name", param=cw)
                calls.append((fn["name"], _tool_call_arguments(fn.get("arguments"), cw)))
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _text_content(m.get("content"), where),
                "tool_calls": calls,
                "tool_call_id": str(m.get("tool_call_id") or ""),
                "name": str(m.get("name") or ""),
            }
        )
    return out


def _canon(m: dict[str, Any]) -> CanonMessage:
    # Whitespace around content and tool-call ids are not significant for "is this the same message".
    calls = tuple((name, json.dumps(args, sort_keys=True)) for name, args in m["tool_calls"])
    return (m["role"], m["content"].strip(), calls, m["tool_call_id"], m["name"])


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, neutral in _UNSUPPORTED_IF_SET.items():
        value = body.get(key)
        if value is not None and value != neutral and value != {}:
            raise RequestError(f"{key} is not supported by the slime rollout endpoint", param=key)
    if int(body.get("n") or 1) != 1:
        raise RequestError("only n=1 is supported (run the agent several times for a group)", param="n")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format other than text is not supported", param="response_format")


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{key} must be a number", param=key)
    if not lo <= value <= hi:
        raise RequestError(f"{key} must be in [{lo}, {hi}], got {value}", param=key)
    return float(value)


def _stop_list(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise RequestError("stop must be a string or a list of strings", param="stop")


def _sampling(body: dict[str, Any], cfg: RolloutConfig, prompt_len: int) -> SamplingParams:
    """Request sampling options, max_tokens capped by the rollout config (see the module docstring)."""
    limit = min(cfg.max_tokens_per_turn, cfg.max_total_tokens - prompt_len)
    if limit <= 0:
        raise RequestError(
            f"the prompt has {prompt_len} tokens; rollout.max_total_tokens={cfg.max_total_tokens} leaves no "
            "room to generate",
            param="messages",
            code="context_length_exceeded",
        )
    requested = body.get("max_completion_tokens", body.get("max_tokens"))
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise RequestError("max_tokens must be a positive integer", param="max_tokens")
        limit = min(limit, requested)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("seed must be an integer", param="seed")
    top_k = body.get("top_k", -1)
    if top_k is None:
        top_k = -1
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise RequestError("top_k must be an integer", param="top_k")
    return SamplingParams(
        max_tokens=limit,
        temperature=_number(body, "temperature", cfg.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", cfg.top_p, 1e-6, 1.0),
        top_k=top_k,
        stop=_stop_list(body),
        seed=seed,
    )


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded), and whether it was cut."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def assistant_message(
    text: str, parse_tools: bool
) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]], bool]:
    """The OpenAI assistant message for a reply `text`: (message, parsed calls, malformed).

    With `parse_tools`, `<tool_call>` blocks become `tool_calls` (fresh ids, arguments as JSON strings)
    and are removed from the content (None when nothing else is left). A reply whose tool call cannot
    be parsed is returned as plain text with malformed=True, as vLLM does.
    """
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if not parse_tools:
        return message, [], False
    calls, problem = parse_tool_calls(text)
    if problem is not None:
        return message, [], True
    if not calls:
        return message, [], False
    parsed = [(c.name, c.arguments) for c in calls]
    message["content"] = strip_tool_calls(text) or None
    message["tool_calls"] = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
        }
        for name, args in parsed
    ]
    return message, parsed, False


# ------------------------------------------------------------------------------ the server


class AgentServer:
    """OpenAI-compatible endpoint of one rollout worker (see the module docstring).

    Lifecycle (all on the worker's event loop, the one the engine runs on):

        server = await AgentServer.start(engine, chat, cfg)
        session = server.open_episode()          # session.base_url for the agent
        ...                                      # the agent calls the endpoint
        await server.close_episode(session)      # aborts its in-flight calls; later calls get 404
        await server.stop()
    """

    def __init__(self, engine: Any, chat: ChatFormat, cfg: RolloutConfig, model_name: str) -> None:
        self.engine = engine
        self.chat = chat
        self.cfg = cfg
        self.model_name = model_name
        self.host = "127.0.0.1"
        self.port = 0
        self.sessions: dict[str, EpisodeSession] = {}
        self._server: Any = None
        self._main_loop: asyncio.Task | None = None
        self._sockets: list[socket.socket] = []
        self.app = self._build_app()

    # ---------------------------------------------------------------- lifecycle
    @classmethod
    async def start(
        cls,
        engine: Any,
        chat: ChatFormat,
        cfg: RolloutConfig,
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> AgentServer:
        """Serve on `host`:`port` (0 = a free port) in the running event loop; returns when listening."""
        import uvicorn

        self = cls(engine, chat, cfg, model_name)
        # Bind the socket ourselves: the port is known before serving and there is no bind race.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        self.host, self.port = host, sock.getsockname()[1]
        self._sockets = [sock]
        config = uvicorn.Config(
            self.app,
            host=host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        # Server.serve() would also install signal handlers in the main thread, taking SIGINT/SIGTERM
        # away from the worker; start the listening part and uvicorn's tick loop only.
        try:
            config.load()
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=self._sockets)
        except BaseException:
            sock.close()
            raise
        self._server = server
        self._main_loop = asyncio.create_task(server.main_loop(), name="agent-server-main-loop")
        logger.info("agent endpoint listening on %s", self.url)
        return self

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Close every session (aborting their engine requests) and stop serving. Idempotent."""
        for session in list(self.sessions.values()):
            await self.close_episode(session)
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._main_loop is not None:
            await self._main_loop
            self._main_loop = None
        await server.shutdown(sockets=self._sockets)

    def open_episode(self, episode_id: str | None = None) -> EpisodeSession:
        """Register a session; its base_url routes calls to it."""
        eid = episode_id or uuid.uuid4().hex[:16]
        if eid in self.sessions:
            raise ValueError(f"episode {eid!r} is already open")
        if "/" in eid or not eid:
            raise ValueError(f"episode id {eid!r} must be a non-empty path segment")
        session = EpisodeSession(episode_id=eid, base_url=f"{self.url}/episodes/{eid}/v1")
        self.sessions[eid] = session
        return session

    async def close_episode(self, session: EpisodeSession) -> None:
        """Unregister the session and abort its in-flight engine requests (their calls are not recorded)."""
        session.closed = True
        self.sessions.pop(session.episode_id, None)
        abort = getattr(self.engine, "abort", None)
        if abort is not None:
            for rid in list(session.inflight):
                await abort(rid)

    # ---------------------------------------------------------------- app
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="slime rollout endpoint", docs_url=None, redoc_url=None, openapi_url=None)

        def error(e: RequestError) -> Response:
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            return JSONResponse(_error_body(e.message, e.param, e.code, kind), status_code=e.status)

        async def body_of(request: Request) -> dict[str, Any]:
            try:
                body = await request.json()
            except Exception:
                raise RequestError("the request body is not JSON") from None
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            return body

        def session_of(episode_id: str) -> EpisodeSession:
            session = self.sessions.get(episode_id)
            if session is None or session.closed:
                raise RequestError(
                    f"episode {episode_id!r} is not open", status=404, code="episode_not_found"
                )
            return session

        @app.get("/v1/models")
        async def models_root() -> Response:
            return JSONResponse(self._models())

        @app.get("/episodes/{episode_id}/v1/models")
        async def models(episode_id: str) -> Response:
            try:
                session_of(episode_id)
            except RequestError as e:
                return error(e)
            return JSONResponse(self._models())

        @app.post("/episodes/{episode_id}/v1/chat/completions")
        async def chat_completions(episode_id: str, request: Request) -> Response:
            try:
                session = session_of(episode_id)
                return await self._chat(session, await body_of(request))
            except RequestError as e:
                return error(e)

        @app.post("/episodes/{episode_id}/v1/completions")
        async def completions(episode_id: str, request: Request) -> Response:
            try:
                session = session_of(episode_id)
                return await self._completion(session, await body_of(request))
            except RequestError as e:
                return error(e)

        return app

    def _models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "slime",
                    "max_model_len": self.cfg.max_total_tokens,
                }
            ],
        }

    # ---------------------------------------------------------------- generation
    async def _generate(
        self, session: EpisodeSession, kind: str, prompt_ids: list[int], sampling: SamplingParams
    ) -> CallRecord:
        index, rid = session.next_request_id()
        session.inflight.add(rid)
        t0 = time.perf_counter()
        try:
            out = await self.engine.generate(list(prompt_ids), sampling, request_id=rid)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            session.engine_error = e
            session.engine_failed.set()
            logger.exception("engine failed on agent call %s", rid)
            raise RequestError(f"the inference engine failed: {type(e).__name__}", status=500) from e
        finally:
            session.inflight.discard(rid)
        if session.closed:
            raise RequestError(
                f"episode {session.episode_id!r} was closed", status=404, code="episode_not_found"
            )
        n = len(out.token_ids)
        if len(out.logprobs) != n or len(out.versions) != n:
            err = RuntimeError(
                f"engine returned {n} tokens, {len(out.logprobs)} logprobs, {len(out.versions)} versions"
            )
            session.engine_error = err
            session.engine_failed.set()
            raise RequestError(str(err), status=500)
        return CallRecord(
            index=index,
            kind=kind,
            request_id=rid,
            prompt_ids=list(prompt_ids),
            completion_ids=[int(t) for t in out.token_ids],
            logprobs=[float(x) for x in out.logprobs],
            versions=[int(v) for v in out.versions],
            finish_reason=out.finish_reason,
            reused_prefix=0,
            sampling={
                "max_tokens": sampling.max_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k,
                "stop": list(sampling.stop),
                "seed": sampling.seed,
            },
            generate_s=time.perf_counter() - t0,
        )

    def _ended_cleanly(self, ids: list[int]) -> bool:
        return bool(ids) and ids[-1] in self.chat.stop_ids

    # ---------------------------------------------------------------- chat
    def _template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Normal-form messages as the chat template wants them. Templates that render tools natively get
        `tool_calls`; the others get the calls as `<tool_call>` text, the format the parser reads back."""
        out = []
        for m in messages:
            msg: dict[str, Any] = {"role": m["role"], "content": m["content"]}
            if m["tool_calls"]:
                if self.chat.tools_in_template:
                    msg["tool_calls"] = [
                        {"type": "function", "function": {"name": n, "arguments": a}}
                        for n, a in m["tool_calls"]
                    ]
                else:
                    msg["content"] = self.chat.call_text(m["content"], list(m["tool_calls"]))
            if m["role"] == "tool":
                if m["tool_call_id"]:
                    msg["tool_call_id"] = m["tool_call_id"]
                if m["name"]:
                    msg["name"] = m["name"]
            out.append(msg)
        return out

    def _chat_prompt(
        self,
        session: EpisodeSession,
        messages: list[dict[str, Any]],
        canon: tuple[CanonMessage, ...],
        tools: list[dict[str, Any]] | None,
        tools_key: str,
    ) -> tuple[list[int], int]:
        """(prompt ids, reused prefix length): continue the longest matching earlier call, else render."""
        best: CallRecord | None = None
        for rec in session.calls:
            k = len(rec.messages)
            if (
                rec.kind == "chat"
                and rec.tools_key == tools_key
                and rec.reply is not None
                and len(canon) > k
                and canon[:k] == rec.messages
                and canon[k] == rec.reply
                and (best is None or k > len(best.messages))
            ):
                best = rec
        if best is not None:
            prefix = best.prompt_ids + best.completion_ids
            if not self._ended_cleanly(best.completion_ids):
                # The reply stopped on a stop string or length: close the turn as the template does.
                prefix = prefix + [self.chat.turn_end_id]
            new = messages[len(best.messages) + 1 :]
            try:
                return prefix + self.chat.delta_ids(self._template_messages(new)), len(best.prompt_ids) + len(
                    best.completion_ids
                )
            except ValueError:
                logger.debug("delta rendering failed; rendering the conversation from scratch", exc_info=True)
        try:
            return self.chat.initial_prompt_ids(self._template_messages(messages), tools), 0
        except Exception as e:
            raise RequestError(
                f"cannot render the messages with the chat template: {e}", param="messages"
            ) from e

    async def _chat(self, session: EpisodeSession, body: dict[str, Any]) -> Response:
        _check_unsupported(body)
        messages = _parse_messages(body.get("messages"))
        tools = body.get("tools") or None
        if tools is not None:
            try:
                check_tools(tools, owner="tools")
            except (TypeError, ValueError) as e:
                raise RequestError(str(e), param="tools") from None
        tool_choice = body.get("tool_choice")
        if isinstance(tool_choice, dict) or tool_choice not in (None, "auto", "none", "required"):
            # The model cannot be forced to call one particular tool here.
            raise RequestError("tool_choice must be 'auto', 'none' or 'required'", param="tool_choice")
        parse_tools = tools is not None and tool_choice != "none"
        canon = tuple(_canon(m) for m in messages)
        tools_key = json.dumps(tools, sort_keys=True) if tools else ""
        prompt_ids, reused = self._chat_prompt(session, messages, canon, tools, tools_key)
        sampling = _sampling(body, self.cfg, len(prompt_ids))
        rec = await self._generate(session, "chat", prompt_ids, sampling)
        rec.reused_prefix = reused

        text = self.chat.decode(rec.completion_ids)
        if rec.finish_reason == "stop" and not self._ended_cleanly(rec.completion_ids):
            text, _ = _cut_at_stop(text, sampling.stop)
        message, parsed, malformed = assistant_message(text, parse_tools)
        tool_calls = message.get("tool_calls", [])
        content = message["content"]
        finish_reason = "tool_calls" if tool_calls and rec.finish_reason == "stop" else rec.finish_reason
        rec.malformed_tool_call = malformed
        rec.tool_calls = len(tool_calls)
        rec.messages = canon
        rec.tools_key = tools_key
        rec.reply = _canon(
            {
                "role": "assistant",
                "content": content or "",
                "tool_calls": parsed,
                "tool_call_id": "",
                "name": "",
            }
        )
        session.calls.append(rec)

        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": finish_reason,
            "logprobs": None,
        }
        if body.get("logprobs"):
            top = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {"content": self._chat_logprobs(rec, top)}
        response: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": self._usage(rec),
        }
        if body.get("return_token_ids"):
            response["prompt_token_ids"] = rec.prompt_ids
            choice["token_ids"] = rec.completion_ids
        if body.get("stream"):
            return self._stream_chat(response, body)
        return JSONResponse(response)

    def _token_text(self, token_id: int) -> str:
        return self.chat.tokenizer.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, rec: CallRecord, top: int) -> list[dict[str, Any]]:
        entries = []
        for tok, lp in zip(rec.completion_ids, rec.logprobs, strict=True):
            text = self._token_text(tok)
            entry = {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
            # Only the sampled token's logprob is known: it stands in for the top list.
            entry["top_logprobs"] = [dict(entry)] if top > 0 else []
            entries.append(entry)
        return entries

    @staticmethod
    def _usage(rec: CallRecord) -> dict[str, int]:
        p, c = len(rec.prompt_ids), len(rec.completion_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _stream_chat(self, response: dict[str, Any], body: dict[str, Any]) -> Response:
        choice = response["choices"][0]
        delta = dict(choice["message"])
        if "tool_calls" in delta:
            delta["tool_calls"] = [dict(tc, index=i) for i, tc in enumerate(delta["tool_calls"])]
        head = {k: response[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        chunks = [
            head
            | {
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None}
                ]
            },
            head
            | {
                "choices": [
                    {"index": 0, "delta": {}, "logprobs": None, "finish_reason": choice["finish_reason"]}
                ]
            },
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            chunks.append(head | {"choices": [], "usage": response["usage"]})
        return _sse(chunks)

    # ---------------------------------------------------------------- completions
    def _completion_prompt(self, session: EpisodeSession, prompt: Any) -> tuple[list[int], int, str | None]:
        """(prompt ids, reused prefix length, prompt text or None for token-id prompts)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, list):
            if not prompt or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt
            ):
                raise RequestError(
                    "prompt must be a string or a non-empty list of token ids (one prompt)", param="prompt"
                )
            vocab = len(self.chat.tokenizer)
            if max(prompt) >= vocab:
                raise RequestError(
                    f"prompt token id {max(prompt)} is outside the vocabulary ({vocab})", param="prompt"
                )
            return list(prompt), 0, None
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string or a list of token ids", param="prompt")
        best: CallRecord | None = None
        for rec in session.calls:
            cont = rec.continuation_text
            if (
                rec.kind == "completion"
                and cont is not None
                and prompt.startswith(cont)
                and (best is None or len(cont) > len(best.continuation_text or ""))
            ):
                best = rec
        if best is not None and best.continuation_text is not None:
            rest = prompt[len(best.continuation_text) :]
            prefix = best.prompt_ids + best.completion_ids
            suffix = self.chat.tokenizer.encode(rest, add_special_tokens=False) if rest else []
            return prefix + list(suffix), len(prefix), prompt
        return list(self.chat.tokenizer.encode(prompt)), 0, prompt

    async def _completion(self, session: EpisodeSession, body: dict[str, Any]) -> Response:
        _check_unsupported(body)
        if body.get("echo"):
            raise RequestError("echo is not supported", param="echo")
        if int(body.get("best_of") or 1) != 1:
            raise RequestError("best_of is not supported", param="best_of")
        prompt_ids, reused, prompt_text = self._completion_prompt(session, body.get("prompt"))
        sampling = _sampling(body, self.cfg, len(prompt_ids))
        rec = await self._generate(session, "completion", prompt_ids, sampling)
        rec.reused_prefix = reused
        skip_special = body.get("skip_special_tokens", True) is not False
        raw = self.chat.tokenizer.decode(rec.completion_ids, skip_special_tokens=False)
        text = self.chat.tokenizer.decode(rec.completion_ids, skip_special_tokens=skip_special)
        cut = False
        if rec.finish_reason == "stop" and sampling.stop:
            text, cut = _cut_at_stop(text, sampling.stop)
        rec.prompt_text = prompt_text
        if prompt_text is not None and not cut and text == raw:
            # The text stands for exactly the generated ids: a prompt continuing it can reuse them.
            rec.continuation_text = prompt_text + text
        session.calls.append(rec)

        choice: dict[str, Any] = {
            "index": 0,
            "text": text,
            "finish_reason": rec.finish_reason,
            "logprobs": None,
        }
        if body.get("logprobs") is not None and body.get("logprobs") is not False:
            choice["logprobs"] = self._completion_logprobs(rec, int(body["logprobs"]))
        response: dict[str, Any] = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [choice],
            "usage": self._usage(rec),
        }
        if body.get("return_token_ids"):
            response["prompt_token_ids"] = rec.prompt_ids
            choice["token_ids"] = rec.completion_ids
        if body.get("stream"):
            head = {k: response[k] for k in ("id", "created", "model")} | {"object": "text_completion"}
            chunks = [
                head | {"choices": [dict(choice, finish_reason=None)]},
                head
                | {
                    "choices": [
                        {"index": 0, "text": "", "logprobs": None, "finish_reason": rec.finish_reason}
                    ]
                },
            ]
            if (body.get("stream_options") or {}).get("include_usage"):
                chunks.append(head | {"choices": [], "usage": response["usage"]})
            return _sse(chunks)
        return JSONResponse(response)

    def _completion_logprobs(self, rec: CallRecord, top: int) -> dict[str, Any]:
        tokens = [self._token_text(t) for t in rec.completion_ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": list(rec.logprobs),
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, rec.logprobs, strict=True)]
            if top > 0
            else None,
            "text_offset": offsets,
        }


def _sse(chunks: list[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
