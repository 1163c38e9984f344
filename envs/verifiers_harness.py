"""The verifiers harness `slime-chat`: verifiers' own chat program, run inside this process.

verifiers' `null` harness (a plain chat loop over the OpenAI API, with the task's MCP tools) and `bash`
harness run their program as a `uv` script, which re-resolves its dependencies against PyPI in every
fresh process: with no network it fails even with a warm cache. `slime-chat` runs the *same* program
text (`verifiers.v1.harnesses.utils.launch.CHAT_PROGRAM_SOURCE`: verifiers' MCP client, compaction and
chat loop) with the libraries already installed here, in the calling process, so an episode starts no
interpreter and needs no network. Its model calls still go through verifiers' interception endpoint
(which records verifiers' trace and forwards them to slime's per-episode endpoint), its tool calls to
the task's MCP servers, exactly as the `null` harness's do.

verifiers resolves harness ids by importing a top-level module of that name (`slime-chat` ->
`slime_chat`); `envs/verifiers_env.py` registers this module under that name before it loads an
environment. The program needs a local runtime (`agent.runtime.type=subprocess`): the MCP servers'
URLs must be reachable from this process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import traceback

from verifiers.v1.clients import ModelContext
from verifiers.v1.dialects.chat import message_to_wire
from verifiers.v1.harnesses.null.harness import NullHarness
from verifiers.v1.harnesses.utils.launch import CHAT_PROGRAM_SOURCE
from verifiers.v1.runtimes import ProgramResult, Runtime
from verifiers.v1.task import TaskData
from verifiers.v1.trace import Trace

__all__ = ["SlimeChatHarness"]  # verifiers takes the one Harness subclass exported here

HARNESS_ID = "slime-chat"
MODULE_NAME = "slime_chat"  # what verifiers imports for HARNESS_ID

# Compiled once; each episode executes it into a namespace of its own (its module-level state, the
# argument parser it reads, stays per episode).
_PROGRAM = compile(CHAT_PROGRAM_SOURCE, "<verifiers chat program>", "exec")


class SlimeChatHarness(NullHarness):
    """The `null` harness's chat program, in process (see the module docstring)."""

    async def setup(self, runtime: Runtime) -> None:
        return None  # nothing to install: the program runs with this process's libraries

    async def launch(
        self,
        ctx: ModelContext,
        trace: Trace,
        runtime: Runtime,
        endpoint: str,
        secret: str,
        mcp_urls: dict[str, str],
        data: TaskData,
        tool_interception_url: str | None = None,
    ) -> ProgramResult:
        system_prompt, prompt = self.resolve_prompt(data)
        messages_file = ""
        if prompt is not None and not isinstance(prompt, str):
            # The program reads (and deletes) a Messages prompt from a file, as when it runs as a script.
            fd, messages_file = tempfile.mkstemp(prefix="slime-chat-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump([message_to_wire(m) for m in prompt], f)
        mcp_config = (
            json.dumps(
                {
                    "mcpServers": {
                        name: {"url": url, "timeout": self.config.tool_timeout}
                        for name, url in mcp_urls.items()
                    }
                }
            )
            if mcp_urls
            else ""
        )
        args = argparse.Namespace(
            base_url=endpoint,
            api_key=secret,
            model=ctx.model,
            system_prompt=system_prompt or "",
            prompt=prompt if isinstance(prompt, str) else "",
            initial_messages_file=messages_file,
            mcp_config=mcp_config,
            tool_interception_url=tool_interception_url or "",
            bash=False,
            compaction=False,
            summarize_at_tokens=None,
            edit=False,
            search=False,
            serper_key="",
        )
        program: dict = {"__name__": "slime_chat_program"}
        exec(_PROGRAM, program)  # noqa: S102 - verifiers' own program text, as its harness runs it
        program["parse_args"] = lambda: args
        try:
            await program["main"]()
        except SystemExit as e:  # the program's own exit codes (97: the model connection failed)
            code = e.code if isinstance(e.code, int) else 1
            return ProgramResult(exit_code=code, stdout="", stderr=_cause(e))
        except Exception as e:  # noqa: BLE001 - reported as the program's failure, as a script's would be
            return ProgramResult(exit_code=1, stdout="", stderr="".join(traceback.format_exception(e)))
        finally:
            if messages_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(messages_file)
        return ProgramResult(exit_code=0, stdout="", stderr="")


def _cause(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__
    return "".join(traceback.format_exception(cause)) if cause is not None else f"exit {e.code}"
