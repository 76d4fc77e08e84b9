"""Structured JSON logging with the request id of the current request.

Log calls pass values as `extra` fields or lazy `%s` arguments, never as f-strings, and never a
token or secret.
"""

import logging
import random
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_LENGTH = 128


def valid_request_id(value: str | None) -> str:
    """Return `value` if it is a safe request id to echo and log, or a new one."""
    if value and len(value) <= MAX_REQUEST_ID_LENGTH and value.isascii() and value.isprintable():
        return value
    # Unique, not secret: the id only correlates log lines, so the fast non-cryptographic
    # generator is enough. CPython reseeds it in a forked child.
    return f"{random.getrandbits(128):032x}"


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        request_id = request_id_var.get()
        if request_id is not None:
            record.request_id = request_id
        return True


def configure_logging(service: str, level: str = "INFO") -> None:
    """Send every log record to stderr as one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601 in UTC
        )
    )
    handler.addFilter(_ContextFilter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's access log repeats what the request middleware logs, in plain text.
    logging.getLogger("uvicorn.access").handlers[:] = []
    logging.getLogger("uvicorn.access").propagate = False
    # httpx logs every request at INFO, which would repeat each probe and token fetch.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
