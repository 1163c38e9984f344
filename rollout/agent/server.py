"""An OpenAI- and Anthropic-compatible endpoint in front of the rollout engine, for black-box agents.

One `AgentServer` per rollout worker: a FastAPI app served by uvicorn inside the worker's event loop
(the same loop as the engine) on a free 127.0.0.1 port. Each agent episode gets its own session and
base URL, `http://127.0.0.1:PORT/episodes/<episode_id>/v1`, so the calls of concurrent episodes are
recorded separately. Routes under that base URL:

- `POST /chat/completions` -- messages rendered with the model's chat template through `ChatFormat`
  (tools in the request are rendered exactly as the framework renders env tools; the reply's tool
  calls are parsed back into OpenAI `tool_calls`).
- `POST /completions` -- a text prompt (or a list of token ids) continued as is.
- `POST /responses` -- the OpenAI Responses API (input items, function tools, previous_response_id).
- `POST /messages`, `POST /messages/count_tokens` -- Anthropic's Messages API; also under `/v1/v1`,
  since Anthropic's clients append `/v1/messages` to the base URL they are given.
- `GET /models` -- the one served model (also at `/v1/models`).

Request and response formats, one module per wire format: rollout/agent/protocol.py (Chat
Completions, Completions, and what the APIs share), responses.py, messages.py. Chat Completions,
Responses and Messages requests all become the same normal-form messages and go one way
(`AgentServer._chat_turn`): prompt ids, generation, the reply parsed for tool calls, the call
recorded; only the envelope differs. Refusals answer in the route's API's error format; the last one
is kept on the session (`EpisodeSession.refused`) for the episode's failure reason. Prompt ids
continue earlier calls token-exactly where the conversation does (rollout/agent/prefix.py); either
way they are recorded exactly as sent to the engine. Every successful call is recorded in its session as a `CallRecord`
(rollout/agent/session.py): the prompt ids, the generated ids exactly as the engine produced them
(never re-tokenised), their logprobs and versions; rollout/agent/runner.py turns them into
trajectories.

An engine exception inside a call answers 500 to the agent and is kept on the session
(`EpisodeSession.engine_error`, `engine_failed`), so the episode runner can propagate it: engine
failures are the worker's to handle, not the agent's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# FastAPI reads the handlers' annotations (Request) from this module's globals: import at module level.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rollout.agent import messages, prefix, protocol, responses
from rollout.agent.protocol import ChatRequest, RequestError
from rollout.agent.session import CallRecord, EpisodeSession
from rollout.chat import ChatFormat
from slime.core.config import RolloutConfig
from slime.core.types import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "slime-policy"


@dataclass
class Turn:
    """A recorded chat-shaped call and its reply: `text` (stop string cut), `content` and `calls` as
    protocol.parse_reply gives them, `stop_sequence` the stop string it was cut at (None otherwise)."""

    rec: CallRecord
    text: str
    content: str
    calls: list[tuple[str, dict[str, Any]]]
    stop_sequence: str | None


def _sse(events: list[tuple[str | None, dict[str, Any]]], done: bool = False) -> StreamingResponse:
    """Server-sent events: `event: NAME` (when named) and `data: JSON` each; `data: [DONE]` last with `done`."""

    async def lines() -> AsyncIterator[str]:
        for name, data in events:
            head = f"event: {name}\n" if name else ""
            yield f"{head}data: {json.dumps(data)}\n\n"
        if done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


class AgentServer:
    """The agent endpoint of one rollout worker (see the module docstring).

    Lifecycle (all on the worker's event loop, the one the engine runs on):

        server = await AgentServer.start(engine, chat, cfg)
        session = server.open_episode()          # session.base_url for the agent
        ...                                      # the agent calls the endpoint
        await server.close_episode(session)      # aborts its in-flight calls; later calls get 404
        await server.stop()
    """

    def __init__(self, engine: Any, chat: ChatFormat, cfg: RolloutConfig, model_name: str) -> None:
        self.engine, self.chat, self.cfg, self.model_name = engine, chat, cfg, model_name
        self.host, self.port = "127.0.0.1", 0
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

    # ---------------------------------------------------------------- routes
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="slime rollout endpoint", docs_url=None, redoc_url=None, openapi_url=None)
        Handler = Callable[[EpisodeSession, dict[str, Any]], Awaitable[Response]]

        def session_of(episode_id: str) -> EpisodeSession:
            session = self.sessions.get(episode_id)
            if session is None or session.closed:
                raise RequestError(
                    f"episode {episode_id!r} is not open", status=404, code="episode_not_found"
                )
            return session

        async def serve(
            episode_id: str,
            request: Request,
            handler: Handler,
            error_body: Callable[[RequestError], dict[str, Any]] = RequestError.body,
        ) -> Response:
            session = None
            try:
                session = session_of(episode_id)
                try:
                    body = await request.json()
                except Exception:
                    raise RequestError("the request body is not JSON") from None
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                return await handler(session, body)
            except RequestError as e:
                if session is not None and e.status < 500:
                    # Named in the episode's failure reason if the agent gives up after it.
                    route = request.url.path.split(f"/episodes/{episode_id}", 1)[-1].replace(
                        "/v1/v1/", "/v1/"
                    )
                    session.refused = f"{route} refused: {e.message}"
                return JSONResponse(error_body(e), status_code=e.status)

        @app.get("/v1/models")
        async def models_root() -> Response:
            return JSONResponse(protocol.models_list(self.model_name, self.cfg.max_total_tokens))

        @app.get("/episodes/{episode_id}/v1/models")
        async def models(episode_id: str) -> Response:
            try:
                session_of(episode_id)
            except RequestError as e:
                return JSONResponse(e.body(), status_code=e.status)
            return JSONResponse(protocol.models_list(self.model_name, self.cfg.max_total_tokens))

        @app.post("/episodes/{episode_id}/v1/chat/completions")
        async def chat_completions(episode_id: str, request: Request) -> Response:
            return await serve(episode_id, request, self._chat)

        @app.post("/episodes/{episode_id}/v1/completions")
        async def completions(episode_id: str, request: Request) -> Response:
            return await serve(episode_id, request, self._completion)

        @app.post("/episodes/{episode_id}/v1/responses")
        async def responses_route(episode_id: str, request: Request) -> Response:
            return await serve(episode_id, request, self._responses)

        # Anthropic's clients append /v1/messages to their base URL: the episode's base URL as given
        # (ending in /v1) and the same without /v1 both reach these.
        for root in ("/episodes/{episode_id}/v1", "/episodes/{episode_id}/v1/v1"):

            @app.post(f"{root}/messages")
            async def messages_route(episode_id: str, request: Request) -> Response:
                return await serve(episode_id, request, self._messages, messages.error_body)

            @app.post(f"{root}/messages/count_tokens")
            async def count_tokens(episode_id: str, request: Request) -> Response:
                return await serve(episode_id, request, self._count_tokens, messages.error_body)

        return app

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
            session.fail(e)
            logger.exception("engine failed on agent call %s", rid)
            raise RequestError(f"the inference engine failed: {type(e).__name__}", status=500) from e
        finally:
            session.inflight.discard(rid)
        if session.closed:
            raise RequestError(
                f"episode {session.episode_id!r} was closed", status=404, code="episode_not_found"
            )
        try:
            out.check_lengths()
        except RuntimeError as err:
            session.fail(err)
            raise RequestError(str(err), status=500) from None
        session.refused = None  # the agent got past any earlier refusal
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
            routed_experts=out.routed_experts,
            indexer_keys=out.indexer_keys,
            sample_kept=out.sample_kept,
        )

    def _token_texts(self, ids: list[int]) -> list[str]:
        return [self.chat.tokenizer.decode([t], skip_special_tokens=False) for t in ids]

    def _respond(self, kind: str, rec: CallRecord, choice: dict[str, Any], body: dict[str, Any]) -> Response:
        response = protocol.response_envelope(
            kind, self.model_name, choice, rec.prompt_ids, rec.completion_ids, body
        )
        if not body.get("stream"):
            return JSONResponse(response)
        return _sse([(None, chunk) for chunk in protocol.stream_chunks(kind, response, body)], done=True)

    async def _chat_turn(
        self, session: EpisodeSession, req: ChatRequest, sampling_of: Callable[[int], SamplingParams]
    ) -> Turn:
        """One chat-shaped call, whatever the API: prompt ids (continuing earlier calls token-exactly),
        generation, the reply parsed for tool calls, the call recorded. `sampling_of(prompt_len)` is the
        API's sampling check."""
        prompt_ids, reused = prefix.chat_prompt(self.chat, session.calls, req)
        sampling = sampling_of(len(prompt_ids))
        rec = await self._generate(session, "chat", prompt_ids, sampling)
        rec.reused_prefix = reused

        text, stop = self.chat.decode(rec.completion_ids), None
        if rec.finish_reason == "stop" and not prefix.ended_cleanly(self.chat, rec.completion_ids):
            stop = protocol.stop_match(text, sampling.stop)
            text, _ = protocol.cut_at_stop(text, sampling.stop)
        content, calls, malformed = protocol.parse_reply(text, req.parse_tools)
        rec.malformed_tool_call = malformed
        rec.tool_calls = len(calls)
        rec.messages = req.canon
        rec.tools_key = req.tools_key
        rec.reply = protocol.canon(protocol.normal_message("assistant", content, calls))
        session.calls.append(rec)
        return Turn(rec, text, content, calls, stop)

    async def _chat(self, session: EpisodeSession, body: dict[str, Any]) -> Response:
        req = protocol.parse_chat_request(body)
        turn = await self._chat_turn(session, req, lambda n: protocol.sampling_params(body, self.cfg, n))
        rec = turn.rec
        message, _, _ = protocol.assistant_message(turn.text, req.parse_tools)
        choice: dict[str, Any] = {
            "index": 0,
            "message": message,
            "finish_reason": "tool_calls"
            if turn.calls and rec.finish_reason == "stop"
            else rec.finish_reason,
            "logprobs": None,
        }
        if body.get("logprobs"):
            top = int(body.get("top_logprobs") or 0)
            choice["logprobs"] = {
                "content": protocol.chat_logprobs(self._token_texts(rec.completion_ids), rec.logprobs, top)
            }
        return self._respond("chat", rec, choice, body)

    async def _responses(self, session: EpisodeSession, body: dict[str, Any]) -> Response:
        req, conversation = responses.parse_responses_request(body, session.conversations)
        turn = await self._chat_turn(session, req, lambda n: responses.sampling(body, self.cfg, n))
        rec = turn.rec
        logprobs = None
        if responses.wants_logprobs(body):
            top = int(body.get("top_logprobs") or 0)
            logprobs = protocol.chat_logprobs(self._token_texts(rec.completion_ids), rec.logprobs, top)
        response = responses.response_object(
            model=self.model_name,
            body=body,
            content=turn.content,
            calls=turn.calls,
            finish_reason=rec.finish_reason,
            prompt_tokens=len(rec.prompt_ids),
            completion_tokens=len(rec.completion_ids),
            cached_tokens=rec.reused_prefix,
            logprobs=logprobs,
        )
        reply = protocol.normal_message("assistant", turn.content, turn.calls)
        session.conversations[response["id"]] = [*conversation, reply]
        if not body.get("stream"):
            return JSONResponse(response)
        return _sse([(e["type"], e) for e in responses.stream_events(response)])

    async def _messages(self, session: EpisodeSession, body: dict[str, Any]) -> Response:
        req = messages.parse_messages_request(body)
        turn = await self._chat_turn(session, req, lambda n: messages.sampling(body, self.cfg, n))
        message = messages.message_object(
            model=self.model_name,
            content=turn.content,
            calls=turn.calls,
            finish_reason=turn.rec.finish_reason,
            stop_sequence=turn.stop_sequence,
            prompt_tokens=len(turn.rec.prompt_ids),
            completion_tokens=len(turn.rec.completion_ids),
            cached_tokens=turn.rec.reused_prefix,
        )
        if not body.get("stream"):
            return JSONResponse(message)
        return _sse([(e["type"], e) for e in messages.stream_events(message)])

    async def _count_tokens(self, session: EpisodeSession, body: dict[str, Any]) -> Response:
        req = messages.parse_messages_request(body, count_only=True)
        prompt_ids, _ = prefix.chat_prompt(self.chat, session.calls, req)
        return JSONResponse({"input_tokens": len(prompt_ids)})

    async def _completion(self, session: EpisodeSession, body: dict[str, Any]) -> Response:
        prompt = protocol.parse_completion_request(body)
        prompt_ids, reused, prompt_text = prefix.completion_prompt(self.chat, session.calls, prompt)
        sampling = protocol.sampling_params(body, self.cfg, len(prompt_ids))
        rec = await self._generate(session, "completion", prompt_ids, sampling)
        rec.reused_prefix = reused
        skip_special = body.get("skip_special_tokens", True) is not False
        raw = self.chat.tokenizer.decode(rec.completion_ids, skip_special_tokens=False)
        text = self.chat.tokenizer.decode(rec.completion_ids, skip_special_tokens=skip_special)
        cut = False
        if rec.finish_reason == "stop" and sampling.stop:
            text, cut = protocol.cut_at_stop(text, sampling.stop)
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
            choice["logprobs"] = protocol.completion_logprobs(
                self._token_texts(rec.completion_ids), rec.logprobs, int(body["logprobs"])
            )
        return self._respond("completion", rec, choice, body)
