"""Joining a Ray cluster (or starting a local one) for a stage, with one clear line when that fails, and
without Ray's own start-up noise on the user's terminal unless asked for (`segpipe --verbose`)."""

from __future__ import annotations

import os
import re
import sys
import threading

from pipeline.errors import SegpipeError

RAY_LOGS = "SEGPIPE_RAY_LOGS"
# A line of Ray's C++ core: "[2026-01-01 12:00:00,123 E 4242 4242] core_worker.cc:2465: ...". Fatal ones (F) stay.
_NATIVE_LINE = re.compile(rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWE] \d+ \d+\] ")


def ray_logs() -> bool:
    """Whether Ray's own logs reach this terminal: `segpipe --verbose`, or SEGPIPE_RAY_LOGS=1."""
    return os.environ.get(RAY_LOGS, "0") not in ("", "0")


def connect(address: str | None, log_to_driver: bool = False, runtime_env: dict | None = None) -> bool:
    """Join `address`, or start a local Ray for this run; True when this call started it.

    Ray's Python loggers say only errors (not the token-auth notice, not "Started a local Ray instance") and
    the workers' output stays in Ray's log files, unless `ray_logs()`."""
    import logging

    import ray

    if ray.is_initialized():
        return False
    verbose = ray_logs()
    try:
        ray.init(address=address, logging_level=logging.INFO if verbose else logging.ERROR, include_dashboard=False,
                 log_to_driver=log_to_driver or verbose, configure_logging=True, runtime_env=runtime_env)
    except (ConnectionError, ValueError, RuntimeError) as error:
        raise SegpipeError(f"cannot reach the Ray cluster at {address or 'a new local instance'} ({error})") from None
    return True


def quiet_native_logs() -> None:
    """Keep the lines Ray's C++ core writes straight to file descriptor 2 (e.g. its error-level note that an
    actor's constructor arguments live in the object store) off the terminal, unless `ray_logs()`.

    Ray has no switch for them short of RAY_BACKEND_LOG_LEVEL, which prints a line of its own and silences
    the raylet's log files too. So descriptor 2 becomes a pipe whose reader drops those lines and passes the
    rest on; Python's sys.stderr keeps writing to the terminal itself (a rich progress bar still sees one).
    For the `segpipe` command's process only: it rewires the process's descriptors."""
    import atexit

    try:
        terminal = os.dup(2)
    except OSError:  # no descriptor 2 at all (a daemon): nothing reaches a terminal anyway
        return
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward() -> None:
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if ray_logs() or not _NATIVE_LINE.match(line):
                    os.write(terminal, line)

    reader = threading.Thread(target=forward, name="segpipe-native-stderr", daemon=True)
    reader.start()

    def drain() -> None:  # at exit: whatever C code wrote last still reaches the terminal
        os.dup2(terminal, 2)
        reader.join(timeout=0.5)  # longer only while a child process still holds the pipe

    atexit.register(drain)
