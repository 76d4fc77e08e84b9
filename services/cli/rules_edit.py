"""Edit the rollout fields of a rules document in place, keeping its comments and layout.

The rollout commands change only `split.percent` of split rules, `guard.frozen` and
`guard.reset_at`. ruamel.yaml's round-trip mode writes every other line back as it was read,
comments included. An edited document is checked with the router's own parser before anyone
writes it, so an edit never hands the router a file it would reject.
"""

import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import YAMLError
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from services.router.rules import RulesError, parse_rules

GUARD = "guard"
FROZEN = "frozen"
RESET_AT = "reset_at"


class RolloutError(Exception):
    """A rollout command cannot run. The message names the value and what to do."""


@dataclass(frozen=True)
class Change:
    """One field an edit changed, as dotted path with the rule name in brackets."""

    field: str
    old: Any
    new: Any

    def describe(self) -> str:
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class SplitState:
    rule: str
    target: str
    # As written in the file, so `status` can show a value that the router would reject.
    percent: Any


@dataclass(frozen=True)
class RolloutState:
    """Rollout fields of a rules document: its splits, the freeze flag and the guard reset time."""

    version: str
    splits: tuple[SplitState, ...]
    frozen: bool
    reset_at: str | None


def rules_version(text: str) -> str:
    """Return the version the router reports for this content: the first 12 hex digits of its
    SHA-256, as services/router/reloader.py computes it."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def parse_percent(text: str) -> float | int:
    """Parse a split percentage from 0 to 100, returned as int when it is a whole number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise RolloutError(
            f"Invalid percent {text!r}: give a number from 0 to 100, such as 10 or 12.5."
        )
    return int(value) if value.is_integer() else value


class RulesDocument:
    """A rules document loaded for a round-trip edit."""

    def __init__(self, text: str) -> None:
        self._yaml = _round_trip_yaml(text)
        try:
            data = self._yaml.load(text)
        except DuplicateKeyError as error:
            raise RolloutError(
                f"The rules file repeats a key on line {_line_of(error)}: {error.problem}. Merge "
                "the two sections into one and run the command again."
            ) from error
        except YAMLError as error:
            raise RolloutError(
                f"The rules are not valid YAML: {error}. Fix the file and run the command again."
            ) from error
        if not isinstance(data, CommentedMap):
            raise RolloutError(
                f"The rules must be a YAML mapping, got {type(data).__name__}. Fix the file and "
                "run the command again."
            )
        self.data = data

    def dump(self) -> str:
        output = io.StringIO()
        self._yaml.dump(self.data, output)
        return output.getvalue()

    def split_rules(self) -> list[tuple[str, CommentedMap]]:
        """Return (name, split mapping) of every rule that splits users, in file order."""
        rules = self.data.get("rules") or []
        if not isinstance(rules, list):
            raise RolloutError("The rules field must be a list; fix the file and run again.")
        return [
            (str(rule.get("name")), rule["split"])
            for rule in rules
            if isinstance(rule, CommentedMap) and isinstance(rule.get("split"), CommentedMap)
        ]

    def state(self, version: str) -> RolloutState:
        guard = self._guard(create=False)
        splits = tuple(
            SplitState(name, str(split.get("target")), _plain(split.get("percent")))
            for name, split in self.split_rules()
        )
        frozen = bool(guard.get(FROZEN, False)) if guard is not None else False
        reset_at = guard.get(RESET_AT) if guard is not None else None
        return RolloutState(version, splits, frozen, None if reset_at is None else str(reset_at))

    def set_percent(self, percent: float | int, rule: str | None) -> list[Change]:
        name, split = self._select_split(rule)
        return _assign(split, "percent", percent, f"rules[{name}].split.percent")

    def rollback(self) -> list[Change]:
        splits = self.split_rules()
        if not splits:
            raise RolloutError(
                "The rules have no split rule, so no user is on a percentage to roll back. "
                "Rules with `target: cqrs` send their users there whatever the percent; edit "
                "those rules or freeze the rollout with `ztcqrs rollout freeze`."
            )
        changes: list[Change] = []
        for name, split in splits:
            changes += _assign(split, "percent", 0, f"rules[{name}].split.percent")
        return changes

    def freeze(self) -> list[Change]:
        guard = self._guard(create=True)
        assert guard is not None
        return _assign(guard, FROZEN, True, f"{GUARD}.{FROZEN}")

    def unfreeze(self, now: str) -> list[Change]:
        """Unfreeze and set `reset_at`, which also clears a guard trip from before `now`."""
        guard = self._guard(create=True)
        assert guard is not None
        changes = _assign(guard, FROZEN, False, f"{GUARD}.{FROZEN}")
        # Quoted, so YAML loaders read a string and not a timestamp object.
        return changes + _assign(
            guard, RESET_AT, DoubleQuotedScalarString(now), f"{GUARD}.{RESET_AT}"
        )

    def _select_split(self, rule: str | None) -> tuple[str, CommentedMap]:
        splits = self.split_rules()
        names = ", ".join(name for name, _ in splits)
        if rule is not None:
            for name, split in splits:
                if name == rule:
                    return name, split
            hint = f"the split rules are: {names}" if splits else "the rules have no split rule"
            raise RolloutError(f"No split rule named {rule!r}; {hint}. Pass one of them to --rule.")
        if not splits:
            raise RolloutError(
                "The rules have no split rule, so there is no percent to set. Add a rule with "
                "`split: {target: cqrs, percent: 0}` first."
            )
        if len(splits) > 1:
            raise RolloutError(
                f"The rules have several split rules ({names}); choose one with --rule NAME."
            )
        return splits[0]

    def _guard(self, *, create: bool) -> CommentedMap | None:
        guard = self.data.get(GUARD)
        if isinstance(guard, CommentedMap):
            return guard
        if guard is not None:
            raise RolloutError(
                f"The guard field must be a mapping, got {guard!r}. Fix the file and run again."
            )
        if not create:
            return None
        # A `guard:` line with no value loads as None; it is replaced in place.
        existed = GUARD in self.data
        self.data[GUARD] = CommentedMap()
        if not existed:
            self.data.yaml_set_comment_before_after_key(
                GUARD, before="\nSet by `ztcqrs rollout freeze` and `ztcqrs rollout unfreeze`."
            )
        created: CommentedMap = self.data[GUARD]
        return created


def edit_rules(
    text: str, edit: Callable[[RulesDocument], list[Change]]
) -> tuple[str, list[Change]]:
    """Apply `edit` to the rules `text`; return the new text and the changes.

    The text comes back unchanged when the edit changes nothing. Raise RolloutError when the
    edited document is one the router would reject.
    """
    document = RulesDocument(text)
    changes = edit(document)
    if not changes:
        return text, []
    edited = document.dump()
    try:
        parse_rules(edited)
    except RulesError as error:
        raise RolloutError(
            f"The edited rules are invalid, so nothing was written: {error}. Fix the rules "
            "and run the command again."
        ) from error
    return edited, changes


def _assign(mapping: CommentedMap, key: str, value: Any, field: str) -> list[Change]:
    old = mapping.get(key)
    if key in mapping and _same(old, value):
        return []
    mapping[key] = value
    return [Change(field, _plain(old), _plain(value))]


def _same(old: Any, new: Any) -> bool:
    # bool is a subclass of int, so `percent: true` must not count as 1.
    if isinstance(old, bool) or isinstance(new, bool):
        return type(old) is type(new) and bool(old == new)
    return bool(old == new)


def _plain(value: Any) -> Any:
    """Return a YAML scalar as a plain Python value for printing and JSON."""
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _line_of(error: DuplicateKeyError) -> str:
    mark = error.problem_mark
    return "?" if mark is None else str(mark.line + 1)


def _round_trip_yaml(text: str) -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines such as CEL expressions
    # ruamel.yaml writes with one indentation style; use the one the file was written with.
    try:
        _, indent, offset = load_yaml_guess_indent(text)
    except YAMLError:
        indent, offset = None, None
    if indent is not None and offset is not None and indent > offset:
        yaml.indent(mapping=indent - offset, sequence=indent, offset=offset)
    else:
        yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml
