"""The router's access log: one JSON line per request, written to stderr in small batches.

The lines carry the same keys as those of `services.shared.logs.configure_logging` (level,
logger, message, then the request's fields, service and time). Through `logging` and
python-json-logger a line cost about 20 us of CPU and one write(2) per request (measured on a
busy 2-vCPU VM, Python 3.11). Here each line is one `json.dumps`, and the lines of up to
`FLUSH_SECONDS` go out together. Each write(2) contains whole lines and at most `PIPE_BUF`
bytes, so lines from several router processes that share a pipe do not interleave (except a
single line longer than `PIPE_BUF`, written alone).

NOTE: a process that is killed (SIGKILL, crash) loses the lines of its last `FLUSH_SECONDS`; a
normal stop flushes them.
"""

import asyncio
import json
import logging
import os
import select
import sys
from datetime import UTC, datetime
from typing import Any

ACCESS_LOGGER = "ztcqrs.access"
MESSAGE = "request served"
# Maximum age of a buffered line, in seconds.
FLUSH_SECONDS = 0.1
# Lines buffered before a write whatever their age, so a burst does not grow the buffer.
MAX_BUFFERED_LINES = 512
# POSIX guarantees that pipe writes up to this size are atomic.
PIPE_BUF = getattr(select, "PIPE_BUF", 512)

log = logging.getLogger(__name__)
# One encoder for every line: json.dumps builds a new one per call when `default` is given.
_ENCODER = json.JSONEncoder(default=str)


class AccessLog:
    """Buffered JSON access lines of one router process.

    The lines are written when the `ztcqrs.access` logger is enabled for INFO at construction,
    so `LOG_LEVEL=WARNING` turns them off like any other INFO line.
    """

    def __init__(self, service: str, *, enabled: bool, fd: int | None = None) -> None:
        self.service = service
        self.enabled = enabled and logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
        self._fd = _stderr_fd() if fd is None else fd
        self._lines: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None

    def write(self, fields: dict[str, Any]) -> None:
        """Buffer one access line with `fields` after the standard keys."""
        line = {
            "level": "INFO", "logger": ACCESS_LOGGER, "message": MESSAGE, **fields,
            "service": self.service, "time": datetime.now(UTC).isoformat(),
        }
        self._lines.append(_ENCODER.encode(line).encode() + b"\n")
        if len(self._lines) >= MAX_BUFFERED_LINES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write every buffered line now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        lines, self._lines = self._lines, []
        batch = bytearray()
        for line in lines:
            if batch and len(batch) + len(line) > PIPE_BUF:
                self._write(bytes(batch))
                batch.clear()
            batch += line
        if batch:
            self._write(bytes(batch))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as error:
            # Not an access line, so the message cannot loop back into this buffer.
            log.error(
                "access log write failed; dropping the lines", extra={"error": str(error)}
            )


def _stderr_fd() -> int:
    # An in-process capture (pytest's capsys, an embedding application) may replace sys.stderr
    # with an object that has no descriptor; the process's own stderr is still descriptor 2.
    try:
        return sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):
        return 2
