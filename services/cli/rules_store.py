"""Where `ztcqrs rollout` reads and writes the rules, and the read-edit-write loop over them.

FileStore is here; ConfigMapStore is in rules_configmap.py, so that only commands that use
--configmap import the Kubernetes client.

Both stores use optimistic concurrency. `read` returns the text with a token, which is the file's
content hash or the ConfigMap's resourceVersion. `write` raises EditConflict when the rules changed
since that read. `apply_edit` then reads again and re-applies the edit, instead of overwriting
another operator's change unseen.
"""

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .rules_edit import Change, RolloutError, RulesDocument, edit_rules

log = logging.getLogger(__name__)

# Read-edit-write rounds before giving up when other writers keep changing the rules.
EDIT_ATTEMPTS = 3


class EditConflict(Exception):
    """The rules changed between our read and our write."""


@dataclass(frozen=True)
class Snapshot:
    text: str
    # Content hash of a file, or resourceVersion of a ConfigMap.
    token: str


class RulesStore(Protocol):
    @property
    def location(self) -> str: ...

    def read(self) -> Snapshot: ...

    def write(self, text: str, token: str) -> None: ...


@dataclass(frozen=True)
class EditResult:
    location: str
    changes: list[Change]
    written: bool
    old_text: str
    new_text: str
    # Rounds that lost to a concurrent writer before this one succeeded.
    conflicts: int


def apply_edit(
    store: RulesStore,
    edit: Callable[[RulesDocument], list[Change]],
    *,
    attempts: int = EDIT_ATTEMPTS,
) -> EditResult:
    """Read the rules, apply `edit`, validate and write them if anything changed.

    On a conflict the edit is applied again to the rules just read, so the changes it reports
    are the ones made to what is now stored. Raise RolloutError after `attempts` conflicts.
    """
    for attempt in range(attempts):
        snapshot = store.read()
        new_text, changes = edit_rules(snapshot.text, edit)
        if not changes:
            return EditResult(store.location, [], False, snapshot.text, snapshot.text, attempt)
        try:
            store.write(new_text, snapshot.token)
        except EditConflict:
            log.warning(
                "rules changed during the edit; reading them again",
                extra={"location": store.location, "token": snapshot.token,
                       "attempt": attempt + 1, "attempts": attempts},
            )
            continue
        return EditResult(store.location, changes, True, snapshot.text, new_text, attempt)
    raise RolloutError(
        f"{store.location} changed {attempts} times while this command edited it, so nothing "
        "was written. Another operator or job is editing the rules; check with "
        "`ztcqrs rollout status` and run the command again."
    )


class FileStore:
    """A rules file on disk, replaced atomically so the router never reads half a file."""

    def __init__(self, path: Path) -> None:
        # A symlinked rules file keeps its link, and the replacement lands next to the target.
        self.path = path.resolve()

    @property
    def location(self) -> str:
        return f"rules file {self.path}"

    def read(self) -> Snapshot:
        content = self._read_bytes()
        try:
            text = content.decode()
        except UnicodeDecodeError as error:
            raise RolloutError(
                f"The {self.location} is not UTF-8 text ({error}); save it as UTF-8."
            ) from error
        return Snapshot(text, hashlib.sha256(content).hexdigest())

    def write(self, text: str, token: str) -> None:
        # NOTE: an editor that saves between this check and os.replace is still overwritten.
        # The check narrows that window to microseconds, but only file locks could close it.
        if hashlib.sha256(self._read_bytes()).hexdigest() != token:
            raise EditConflict(self.location)
        mode = self.path.stat().st_mode & 0o7777
        handle, temp_name = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        try:
            with os.fdopen(handle, "wb") as temp:
                temp.write(text.encode())
                temp.flush()
                os.fsync(temp.fileno())
            os.chmod(temp_name, mode)
            os.replace(temp_name, self.path)
        except OSError as error:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise RolloutError(
                f"Writing the {self.location} failed ({error}); the file is unchanged. Check "
                "that its folder is writable and has free space."
            ) from error

    def _read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as error:
            raise RolloutError(
                f"Reading the {self.location} failed ({error}). Pass the router's rules file "
                "with --file, or set ROUTER_RULES_FILE."
            ) from error
