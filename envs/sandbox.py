"""Run model-written Python in a subprocess with time, memory and output limits.

Not a security boundary against a determined attacker (same user, same filesystem view); it keeps
runaway or careless code from hurting the rollout worker: a fresh interpreter in isolated mode (`-I`:
no user site, no PYTHON* env vars, no cwd on sys.path) in an empty temporary directory that is removed
afterwards, a minimal environment, rlimits on address space, CPU seconds, file size and core dumps set
inside the child before the code runs, a wall-clock timeout that kills the child's whole process group,
and capped stdout/stderr (the child is killed once it exceeds the cap).

The limits are applied by a small bootstrap run in the child rather than `preexec_fn`, which is unsafe
in threaded parents such as a vLLM worker.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass

from envs.base import ToolCall, function_tool

# Seconds to wait for the pipes to close once the child has finished or been killed.
_DRAIN_GRACE_S = 5.0

_BOOTSTRAP = """\
import resource, runpy, sys
mem, cpu, fsize = {mem}, {cpu}, {fsize}
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass
class SandboxResult:
    """Outcome of one run. exit_code is None when the child was killed by the sandbox."""

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool = False
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def as_tool_output(self, max_chars: int = 2000) -> str:
        """What a tool call returns to the model: stdout (cut to fit), then the error tail or the
        limit that hit, which is never cut off."""
        if self.timed_out:
            note = "Error: time limit exceeded"
        elif self.output_truncated:
            note = "Error: output limit exceeded"
        elif self.exit_code != 0:
            tail = self.stderr.strip().splitlines()[-3:]
            note = "Error: " + (" | ".join(tail) if tail else f"exit code {self.exit_code}")
        else:
            note = ""
        note = note[: max_chars // 2]
        room = max_chars - len(note) - 1
        out = self.stdout.rstrip()
        if len(out) > room:
            out = out[: max(0, room - 16)] + "\n...(truncated)"
        text = "\n".join(p for p in (out, note) if p)
        return text or "(no output)"


async def _read_capped(stream: asyncio.StreamReader, cap: int, over: asyncio.Event) -> bytes:
    """Read to EOF, keeping the first `cap` bytes. Past the cap it keeps draining and discarding:
    on Python 3.11 `Process.wait()` resolves only once every pipe has seen EOF, and a reader that
    stops early leaves its transport paused, so `wait()` would never return."""
    buf = bytearray()
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return bytes(buf[:cap])
        if len(buf) <= cap:
            buf.extend(chunk)
            if len(buf) > cap:
                over.set()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session: this ends it and its children
    except (ProcessLookupError, PermissionError):
        pass


async def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 65536,
    python: str = sys.executable,
) -> SandboxResult:
    """Run `code` as a script in a fresh sandboxed interpreter and return what it printed.

    timeout_s: wall-clock limit (CPU time is limited to the same, rounded up). memory_mb: address-space
    limit of the child. max_output_bytes: cap per stream; exceeding it kills the child. Never raises
    for anything the code does.
    """
    workdir = tempfile.mkdtemp(prefix="slime-sandbox-")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        bootstrap = _BOOTSTRAP.format(
            mem=int(memory_mb) << 20, cpu=max(1, int(timeout_s + 0.999)), fsize=int(max_output_bytes) * 4
        )
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": workdir}
        proc = await asyncio.create_subprocess_exec(
            python,
            "-I",
            "-B",
            "-c",
            bootstrap,
            cwd=workdir,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        over = asyncio.Event()
        assert proc.stdout is not None and proc.stderr is not None
        readers = asyncio.gather(
            _read_capped(proc.stdout, max_output_bytes, over),
            _read_capped(proc.stderr, max_output_bytes, over),
        )
        over_wait = asyncio.ensure_future(over.wait())
        timed_out = False
        try:
            done, _ = await asyncio.wait(
                {readers, over_wait}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if readers not in done:
                timed_out = not over.is_set()
                _kill_group(proc.pid)
            try:
                # EOF follows the kill at once unless a grandchild left the process group holding
                # the pipes; then give up on the rest of the output rather than hang the episode.
                out, err = await asyncio.wait_for(asyncio.shield(readers), _DRAIN_GRACE_S)
            except TimeoutError:
                readers.cancel()
                out, err = b"", b"(output lost: the pipes stayed open after the process ended)"
                proc._transport.close()  # noqa: SLF001 -- the only way to drop pipes a stranger holds
            exit_code = await proc.wait()
        finally:
            over_wait.cancel()
            if proc.returncode is None:
                _kill_group(proc.pid)
                await proc.wait()
        killed = timed_out or over.is_set()
        return SandboxResult(
            stdout=out.decode("utf-8", errors="replace"),
            stderr=err.decode("utf-8", errors="replace"),
            exit_code=None if killed else exit_code,
            timed_out=timed_out,
            output_truncated=over.is_set(),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


PYTHON_TOOL = function_tool(
    "python",
    "Run a Python 3 script and return what it prints (stdout). Use print() to show results.",
    {"code": {"type": "string", "description": "the Python source code to run"}},
    ["code"],
)


async def python_tool(call: ToolCall, timeout_s: float = 5.0, memory_mb: int = 512) -> str:
    """Execute a `python` tool call; returns the text for the tool message (errors included)."""
    code = call.arguments.get("code")
    if not isinstance(code, str) or not code.strip():
        return "Error: the python tool needs a non-empty string argument 'code'"
    result = await run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
    return result.as_tool_output()
