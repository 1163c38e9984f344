"""Where a run's logs go, and the redirection every actor process applies to itself.

    <run_dir>/train.log                  the driver: everything slime logs (the console shows a part)
    <run_dir>/logs/rollout-worker<i>.log a rollout worker: its vLLM engine (both processes), episodes
    <run_dir>/logs/trainer-rank<r>.log   a trainer rank: DeepSpeed, transformers, torch.distributed
    <run_dir>/logs/ray.log               Ray's messages in the driver, and where Ray's session logs are

An actor process calls `send_output_to` first thing in its constructor. Its file descriptors 1 and 2
then point at its log file, so what C++ code writes, what vLLM's logger writes and what child
processes inherit (vLLM's engine-core process, environment processes) lands there too; a Ray actor
restarted after a crash appends to the same file, under a new header line.
"""

from __future__ import annotations

import logging
import os
import sys
import time

LOGS_DIR = "logs"

# The top-level packages whose loggers are slime's own (the actors' warnings that need action).
SLIME_LOGGERS = ("slime", "rollout", "trainer", "envs")

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_file(run_dir: str, name: str) -> str:
    """The log file of process `name` (e.g. "rollout-worker0") of the run in `run_dir`."""
    return os.path.join(run_dir, LOGS_DIR, f"{name}.log")


def send_output_to(path: str) -> None:
    """Redirect this process's stdout and stderr (file descriptors 1 and 2) to `path`, appended.

    slime's own loggers (`SLIME_LOGGERS`) then write INFO and above to the file, and WARNING and
    above also to the stderr the process had before: in a Ray actor that is the stream Ray forwards
    to the driver's console (`log_to_driver`), so a warning that needs action is still seen there,
    while the engines' and libraries' output is not. Meant for actor processes, never for a driver
    or a test process: it takes their console. Calling it again re-points both at the new file.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    console = getattr(send_output_to, "_console", None)
    if console is None:  # the first call keeps the original stderr for the warnings
        console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        send_output_to._console = console  # type: ignore[attr-defined]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(2, f"==== {os.path.basename(path)}: pid {os.getpid()} started {stamp} ====\n".encode())

    to_file = logging.StreamHandler(sys.stderr)  # fd 2: the file now
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    to_console = logging.StreamHandler(console)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in SLIME_LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_slime_actor", False)]:
            logger.removeHandler(old)
        for handler in (to_file, to_console):
            handler._slime_actor = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # a handler on the root (a library's) would write each line twice
