"""Keep the rules in force up to date with the rules file, without a restart.

The file is read through its path on every poll and compared by content hash, not by mtime.
That way a Kubernetes ConfigMap update is seen too. There `rules.yaml` links to
`..data/rules.yaml`, and `..data` is a symlink that the kubelet swaps by rename to a new
timestamped folder. A changed file is parsed and compiled completely before it replaces the rules
in force. An invalid file leaves the last good rules in force and is recorded in `last_error`.
"""

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from services.shared.clock import utc_now

from .rules import RulesError, RuleSet, parse_rules

log = logging.getLogger(__name__)

RULE_RELOADS = Counter(
    "ztcqrs_router_rule_reloads_total",
    "Changes of the rules file seen after start, by result (success or failure).",
    ["result"],
)


@dataclass(frozen=True)
class LoadedRules:
    """A compiled rule set with where and when it was loaded. Requests hold one for their life."""

    rules: RuleSet
    # First 12 hex digits of the SHA-256 of the file's bytes.
    version: str
    digest: str
    loaded_at: str
    source: Path


def load_rules_file(path: Path) -> LoadedRules:
    """Read, validate and compile the rules file, or raise RulesError naming the file."""
    try:
        content = path.read_bytes()
    except OSError as error:
        raise RulesError(
            f"The rules file {str(path)!r} cannot be read ({error}). Create it or set "
            "ROUTER_RULES_FILE to a readable rules file."
        ) from error
    try:
        return _compile(content, path)
    except RulesError as error:
        raise RulesError(
            f"The rules file {str(path)!r} is invalid: {error}. Fix the file and start again."
        ) from error


def _compile(content: bytes, path: Path) -> LoadedRules:
    digest = hashlib.sha256(content).hexdigest()
    return LoadedRules(parse_rules(content), digest[:12], digest, utc_now(), path)


class RulesReloader:
    """Current rules, the last reload error, and the task that polls the rules file."""

    def __init__(self, path: Path, poll_seconds: float) -> None:
        self.path = path
        self.poll_seconds = poll_seconds
        self._current = load_rules_file(path)
        self.last_error: str | None = None
        self.last_error_at: str | None = None
        # Content hash or read error of the last failure, so one bad file is logged and counted
        # once instead of once per poll.
        self._failed_key: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def current(self) -> LoadedRules:
        return self._current

    def reload(self) -> bool:
        """Read the file once and put a changed, valid rule set in force.

        Return True when the rules in force changed.
        """
        try:
            content = self.path.read_bytes()
        except OSError as error:
            self._record_failure(f"cannot read the file: {error}", f"read:{error}")
            return False
        digest = hashlib.sha256(content).hexdigest()
        if digest == self._current.digest:
            self._failed_key = None
            return False
        if digest == self._failed_key:
            return False
        try:
            loaded = _compile(content, self.path)
        except RulesError as error:
            self._record_failure(str(error), digest)
            return False
        previous = self._current
        self._current = loaded
        self._failed_key = None
        RULE_RELOADS.labels("success").inc()
        log.info(
            "rules reloaded",
            extra={
                "rules_file": str(self.path), "rules_version": loaded.version,
                "previous_version": previous.version, "rules": loaded.rules.names,
            },
        )
        return True

    def _record_failure(self, message: str, key: str) -> None:
        if key == self._failed_key:
            return
        self._failed_key = key
        self.last_error = message
        self.last_error_at = utc_now()
        RULE_RELOADS.labels("failure").inc()
        log.error(
            "rules reload failed; the previous rules stay in force",
            extra={
                "rules_file": str(self.path), "error": message,
                "rules_version": self._current.version,
            },
        )

    def start(self) -> None:
        """Start polling the file every `poll_seconds` on the running event loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="rules-reloader")
            log.info(
                "rules reloader started",
                extra={"rules_file": str(self.path), "poll_seconds": self.poll_seconds},
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        log.info("rules reloader stopped", extra={"rules_file": str(self.path)})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                # The read runs in a thread so a slow volume never stalls request handling.
                await asyncio.to_thread(self.reload)
            except Exception:
                # Keep polling, because the rules in force stay valid whatever broke this read.
                log.exception("rules reload crashed", extra={"rules_file": str(self.path)})
