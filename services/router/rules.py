"""Gray routing rules: parse and validate the rules file, compile it, and pick a target per request.

Rules are tried top-down, and the first rule whose `match` conditions are all true decides. A rule
either names a `target` or splits users. A user's bucket is
`int(sha256(salt + ":" + subject)[:8], 16) % 10000`, and buckets below `percent * 100` go to the
split target, the rest to `otherwise`. Because the bucket depends only on the salt and the
subject, raising a percentage keeps every user who already moved on the split target.
"""

import functools
import hashlib
import math
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from .expressions import Expression, ExpressionError, compile_expression

TARGETS = ("monolith", "cqrs")
DEFAULT_RULE = "default"
BUCKETS = 10_000
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

_TOP_LEVEL_FIELDS = (
    "version", "salt", "split_key_header", "default_target", "rules", "guard", "shadow", "gate",
)
_RULE_FIELDS = ("name", "match", "target", "split", "otherwise", "fallback")
_MATCH_FIELDS = ("methods", "paths", "headers", "claims", "expr")
_SPLIT_FIELDS = ("target", "percent")

# Rule names appear in the X-Gray-Rule header and in metric labels, so they stay header-safe.
_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD = re.compile(r"[A-Za-z]+")


class RulesError(ValueError):
    """Invalid rules file. The message names the rule and the field."""


@dataclass(frozen=True)
class RequestFacts:
    """Request attributes that rules match on: the verified token and the normalised request."""

    method: str
    path: str
    # Lower-case header names, each with every value the request sent for it.
    headers: Mapping[str, tuple[str, ...]]
    subject: str | None
    claims: Mapping[str, Any]


@dataclass(frozen=True)
class Decision:
    rule_name: str
    target: str
    # Target that a safe request is retried on when `target` fails. Never equal to `target`.
    fallback: str | None


@dataclass(frozen=True)
class PathGlob:
    glob: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class Match:
    """Conditions of a rule. Every condition given must be true; `None` or empty is not checked."""

    methods: frozenset[str] | None = None
    paths: tuple[PathGlob, ...] | None = None
    headers: tuple[tuple[str, frozenset[str]], ...] = ()
    # Claim name with the allowed `(JSON kind, value)` pairs, so `true` never equals `1`.
    claims: tuple[tuple[str, frozenset[tuple[str, Any]]], ...] = ()
    # A CEL condition, checked last because it is the most expensive.
    expression: Expression | None = None

    def matches(self, facts: RequestFacts) -> bool:
        if self.methods is not None and facts.method not in self.methods:
            return False
        if self.paths is not None and not any(
            glob.pattern.fullmatch(facts.path) for glob in self.paths
        ):
            return False
        for name, allowed_values in self.headers:
            if not any(value in allowed_values for value in facts.headers.get(name, ())):
                return False
        for name, allowed_claims in self.claims:
            if name not in facts.claims:
                return False
            kind = json_kind(facts.claims[name])
            if kind is None or (kind, facts.claims[name]) not in allowed_claims:
                return False
        if self.expression is not None:
            return self.expression.evaluate(
                method=facts.method, path=facts.path, headers=facts.headers,
                claims=facts.claims, subject=facts.subject,
            )
        return True


@dataclass(frozen=True)
class Split:
    target: str
    percent: float


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    # Exactly one of `target` and `split` is set.
    target: str | None
    split: Split | None
    otherwise: str
    fallback: str | None


@dataclass(frozen=True)
class GuardThresholds:
    """Limits of the guard; crossing any one that is set trips it. `None` does not check."""

    drift_entities: int | None = None
    lag_seconds: float | None = None
    dead_letters: int | None = None
    cqrs_error_rate: float | None = None
    error_window_seconds: int = 60
    min_requests: int = 20

    @property
    def any_set(self) -> bool:
        return any(
            limit is not None
            for limit in (
                self.drift_entities, self.lag_seconds, self.dead_letters, self.cqrs_error_rate
            )
        )


@dataclass(frozen=True)
class GuardConfig:
    """The `guard` section: when requests that rules send to `cqrs` go to `monolith` instead."""

    frozen: bool = False
    # Epoch seconds. A trip that happened before it is cleared, and evidence from before it
    # (reconcile runs, CQRS errors) no longer trips the guard.
    reset_at: float | None = None
    check_interval_seconds: float = 1.0
    thresholds: GuardThresholds = GuardThresholds()


@dataclass(frozen=True)
class ShadowConfig:
    """The `shadow` section: which safe reads the router also sends to the other side."""

    percent: float = 0.0
    # Recent mismatches kept for the status page.
    max_samples: int = 20
    # JSON object keys dropped at any depth before the two bodies are compared.
    ignore_fields: frozenset[str] = frozenset()


@dataclass(frozen=True)
class GateConfig:
    """The `gate` section: users move to `cqrs` only once their monolith changes are replicated."""

    enabled: bool = False


@dataclass(frozen=True)
class RuleSet:
    salt: str
    split_key_header: str | None
    default_target: str
    rules: tuple[Rule, ...]
    guard: GuardConfig = GuardConfig()
    shadow: ShadowConfig = ShadowConfig()
    gate: GateConfig = GateConfig()

    @property
    def names(self) -> list[str]:
        return [rule.name for rule in self.rules]

    def select(self, facts: RequestFacts) -> Decision:
        """Return the first matching rule's decision, or `default_target` under rule "default"."""
        for rule in self.rules:
            if rule.match.matches(facts):
                target = self._target_of(rule, facts)
                fallback = rule.fallback if rule.fallback != target else None
                return Decision(rule.name, target, fallback)
        return Decision(DEFAULT_RULE, self.default_target, None)

    def _target_of(self, rule: Rule, facts: RequestFacts) -> str:
        if rule.split is None:
            assert rule.target is not None
            return rule.target
        key = facts.subject
        if not key and self.split_key_header is not None:
            values = facts.headers.get(self.split_key_header, ())
            key = values[0] if values else None
        if not key:
            return self.default_target
        if bucket(self.salt, key) < rule.split.percent * 100:
            return rule.split.target
        return rule.otherwise


@functools.lru_cache(maxsize=10_000)
def bucket(salt: str, key: str) -> int:
    """Return the sticky split bucket of `key`, in 0..9999.

    Cached because every request of a user computes the same SHA-256.
    """
    digest = hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()
    return int(digest[:8], 16) % BUCKETS


def json_kind(value: Any) -> str | None:
    """Return the JSON type of a scalar claim value, or None for arrays, objects and null."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def compile_glob(glob: str) -> re.Pattern[str]:
    """Compile a path glob to an anchored regex: `*` is one segment, `**` any number of segments.

    `*` inside a segment (`/files/*.json`) matches any characters but `/`. A trailing `/**`
    also matches the path without it, so `/orders/**` matches `/orders`. Raise ValueError for a
    glob that does not start with `/`, has an empty segment, or uses `**` inside a segment.
    """
    if not glob.startswith("/"):
        raise ValueError("must start with '/'")
    if glob == "/":
        return re.compile("/")
    segments = glob[1:].split("/")
    if all(segment == "**" for segment in segments):
        return re.compile("/.*")
    parts: list[str] = []
    for segment in segments:
        if segment == "**":
            parts.append("(?:/[^/]+)*")
        elif "**" in segment:
            raise ValueError("uses '**' inside a segment; '**' must be a whole segment")
        elif not segment:
            raise ValueError("has an empty segment; remove the doubled or trailing '/'")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return re.compile("".join(parts))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key repeated in one mapping.

    PyYAML keeps the last of two equal keys without a word, so a second `guard:` section would
    silently replace the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # the base class rejects an unhashable key with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"key {key!r} on line {line} repeats the key on line {seen[key]}; "
                    "merge the two into one",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


def parse_rules(text: str | bytes) -> RuleSet:
    """Parse and validate a rules document, or raise RulesError naming the first invalid field."""
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise RulesError(f"the file is not valid YAML: {error}") from error
    if not isinstance(document, dict):
        raise RulesError(f"the file must be a YAML mapping, got {_type_name(document)}")
    _check_fields(document, _TOP_LEVEL_FIELDS, "")

    if document.get("version") != 1:
        raise RulesError(f"version must be 1, got {document.get('version')!r}")
    salt = document.get("salt", "")
    if not isinstance(salt, str):
        raise RulesError(f"salt must be a string, got {salt!r}")
    split_key_header = document.get("split_key_header")
    if split_key_header is not None:
        split_key_header = _header_name(split_key_header, "split_key_header")
    if "default_target" not in document:
        raise RulesError("default_target is missing; set it to 'monolith' or 'cqrs'")
    default_target = _target(document["default_target"], "default_target")

    raw_rules = document.get("rules", [])
    if not isinstance(raw_rules, list):
        raise RulesError(f"rules must be a list, got {_type_name(raw_rules)}")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw_rule in enumerate(raw_rules):
        rule = _parse_rule(raw_rule, index, default_target)
        if rule.name in seen:
            raise RulesError(
                f"rule {rule.name!r}: name is used by an earlier rule; names must be unique"
            )
        seen.add(rule.name)
        rules.append(rule)
    guard = _parse_guard(document.get("guard"))
    return RuleSet(
        salt, split_key_header, default_target, tuple(rules), guard=guard,
        shadow=_parse_shadow(document.get("shadow")), gate=_parse_gate(document.get("gate")),
    )


def _parse_rule(raw: Any, index: int, default_target: str) -> Rule:
    label = f"rule #{index + 1}"
    if not isinstance(raw, dict):
        raise RulesError(f"{label}: must be a mapping, got {_type_name(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _RULE_NAME.fullmatch(name):
        raise RulesError(
            f"{label}: name must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, got {name!r}"
        )
    prefix = f"rule {name!r}: "
    _check_fields(raw, _RULE_FIELDS, prefix)

    match = _parse_match(raw.get("match"), prefix)
    has_target = raw.get("target") is not None
    has_split = raw.get("split") is not None
    if has_target == has_split:
        raise RulesError(f"{prefix}set exactly one of target and split")
    target = _target(raw["target"], "target", prefix) if has_target else None
    split = _parse_split(raw["split"], prefix) if has_split else None
    if "otherwise" in raw and split is None:
        raise RulesError(f"{prefix}otherwise is only valid with split")
    otherwise = _target(raw.get("otherwise", default_target), "otherwise", prefix)
    fallback = None
    if raw.get("fallback") is not None:
        fallback = _target(raw["fallback"], "fallback", prefix)
        if fallback == target:
            raise RulesError(f"{prefix}fallback {fallback!r} is the same as target; remove it")
    return Rule(name, match, target, split, otherwise, fallback)


def _parse_split(raw: Any, prefix: str) -> Split:
    if not isinstance(raw, dict):
        raise RulesError(f"{prefix}split must be a mapping with target and percent")
    _check_fields(raw, _SPLIT_FIELDS, prefix, "split")
    if "target" not in raw:
        raise RulesError(f"{prefix}split.target is missing")
    target = _target(raw["target"], "split.target", prefix)
    percent = raw.get("percent")
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise RulesError(
            f"{prefix}split.percent must be a number between 0 and 100, got {percent!r}"
        )
    if not math.isfinite(percent) or not 0 <= percent <= 100:
        raise RulesError(f"{prefix}split.percent must be between 0 and 100, got {percent!r}")
    return Split(target, float(percent))


def _parse_match(raw: Any, prefix: str) -> Match:
    if raw is None:
        return Match()
    if not isinstance(raw, dict):
        raise RulesError(f"{prefix}match must be a mapping, got {_type_name(raw)}")
    _check_fields(raw, _MATCH_FIELDS, prefix, "match")

    methods = None
    if raw.get("methods") is not None:
        methods = frozenset(
            _method(value, f"{prefix}match.methods")
            for value in _non_empty_list(raw["methods"], f"{prefix}match.methods")
        )
    paths = None
    if raw.get("paths") is not None:
        globs: list[PathGlob] = []
        for value in _non_empty_list(raw["paths"], f"{prefix}match.paths"):
            if not isinstance(value, str):
                raise RulesError(f"{prefix}match.paths entries must be strings, got {value!r}")
            try:
                globs.append(PathGlob(value, compile_glob(value)))
            except ValueError as error:
                raise RulesError(f"{prefix}match.paths glob {value!r} {error}") from error
        paths = tuple(globs)
    expression = None
    if raw.get("expr") is not None:
        try:
            expression = compile_expression(raw["expr"])
        except ExpressionError as error:
            raise RulesError(f"{prefix}match.expr {error}") from error
    return Match(
        methods=methods,
        paths=paths,
        headers=_parse_headers(raw.get("headers"), prefix),
        claims=_parse_claims(raw.get("claims"), prefix),
        expression=expression,
    )


def _parse_headers(raw: Any, prefix: str) -> tuple[tuple[str, frozenset[str]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise RulesError(f"{prefix}match.headers must be a mapping of header name to values")
    headers: list[tuple[str, frozenset[str]]] = []
    for name, value in raw.items():
        field = f"{prefix}match.headers.{name}"
        header = _header_name(name, field)
        values = _values(value, field)
        for item in values:
            if not isinstance(item, str):
                raise RulesError(
                    f"{field} values must be strings, got {item!r}; quote it in the YAML"
                )
        headers.append((header, frozenset(values)))
    return tuple(headers)


def _parse_claims(raw: Any, prefix: str) -> tuple[tuple[str, frozenset[tuple[str, Any]]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise RulesError(f"{prefix}match.claims must be a mapping of claim name to values")
    claims: list[tuple[str, frozenset[tuple[str, Any]]]] = []
    for name, value in raw.items():
        field = f"{prefix}match.claims.{name}"
        if not isinstance(name, str) or not name:
            raise RulesError(f"{prefix}match.claims names must be non-empty strings, got {name!r}")
        allowed: set[tuple[str, Any]] = set()
        for item in _values(value, field):
            kind = json_kind(item)
            if kind is None or (kind == "number" and not math.isfinite(item)):
                raise RulesError(
                    f"{field} values must be strings, numbers or booleans, got {item!r}"
                )
            allowed.add((kind, item))
        claims.append((name, frozenset(allowed)))
    return tuple(claims)


def _values(raw: Any, field: str) -> list[Any]:
    """Return a condition's allowed values: one value, or a non-empty list of values."""
    if isinstance(raw, list):
        return _non_empty_list(raw, field)
    if raw is None or isinstance(raw, dict):
        raise RulesError(f"{field} must be a value or a list of values, got {raw!r}")
    return [raw]


def _non_empty_list(raw: Any, field: str) -> list[Any]:
    if not isinstance(raw, list):
        raise RulesError(f"{field} must be a list, got {_type_name(raw)}")
    if not raw:
        raise RulesError(f"{field} must not be empty; remove the condition to match everything")
    return raw


def _method(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _METHOD.fullmatch(value):
        raise RulesError(f"{field} entries must be HTTP method names such as GET, got {value!r}")
    return value.upper()


def _header_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
        raise RulesError(f"{field} must be an HTTP header name, got {value!r}")
    return value.lower()


def _target(value: Any, field: str, prefix: str = "") -> str:
    if value not in TARGETS:
        raise RulesError(f"{prefix}{field} must be 'monolith' or 'cqrs', got {value!r}")
    return str(value)


def _check_fields(
    raw: dict[Any, Any], allowed: tuple[str, ...], prefix: str, section: str = ""
) -> None:
    where = f" in {section}" if section else ""
    for key in raw:
        if key not in allowed:
            raise RulesError(
                f"{prefix}unknown field {key!r}{where}; expected one of {', '.join(allowed)}"
            )


def _type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# The guard section

_GUARD_FIELDS = ("frozen", "reset_at", "check_interval_seconds", "thresholds")
_THRESHOLD_FIELDS = (
    "drift_entities", "lag_seconds", "dead_letters", "cqrs_error_rate", "error_window_seconds",
    "min_requests",
)
# The router keeps one counter slot per second of the error window, so the window is bounded.
MAX_ERROR_WINDOW_SECONDS = 600
MAX_CHECK_INTERVAL_SECONDS = 300


def _parse_guard(raw: Any) -> GuardConfig:
    if raw is None:
        return GuardConfig()
    if not isinstance(raw, dict):
        raise RulesError(f"guard must be a mapping, got {_type_name(raw)}")
    _check_fields(raw, _GUARD_FIELDS, "", "guard")

    frozen = raw.get("frozen", False)
    if not isinstance(frozen, bool):
        raise RulesError(f"guard.frozen must be true or false, got {frozen!r}")
    interval = _number(raw.get("check_interval_seconds", 1.0), "guard.check_interval_seconds")
    if not 0 < interval <= MAX_CHECK_INTERVAL_SECONDS:
        raise RulesError(
            f"guard.check_interval_seconds must be above 0 and at most "
            f"{MAX_CHECK_INTERVAL_SECONDS}, got {interval!r}"
        )
    return GuardConfig(
        frozen=frozen,
        reset_at=_parse_reset_at(raw.get("reset_at")),
        check_interval_seconds=float(interval),
        thresholds=_parse_thresholds(raw.get("thresholds")),
    )


def _parse_reset_at(raw: Any) -> float | None:
    """Return `guard.reset_at` as epoch seconds; a time without a zone is read as UTC."""
    if raw is None:
        return None
    moment = raw
    if isinstance(raw, str):
        try:
            moment = datetime.fromisoformat(raw)
        except ValueError as error:
            raise RulesError(
                f"guard.reset_at must be an ISO 8601 time such as 2025-01-31T12:00:00Z, "
                f"got {raw!r}"
            ) from error
    if not isinstance(moment, datetime):
        raise RulesError(
            f"guard.reset_at must be an ISO 8601 time such as 2025-01-31T12:00:00Z, got {raw!r}"
        )
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _parse_thresholds(raw: Any) -> GuardThresholds:
    if raw is None:
        return GuardThresholds()
    if not isinstance(raw, dict):
        raise RulesError(f"guard.thresholds must be a mapping, got {_type_name(raw)}")
    _check_fields(raw, _THRESHOLD_FIELDS, "", "guard.thresholds")

    def limit(name: str, *, integer: bool, maximum: float | None = None) -> Any:
        value = raw.get(name)
        if value is None:
            return None
        field = f"guard.thresholds.{name}"
        number = _number(value, field, integer=integer)
        if number < 0 or (maximum is not None and number > maximum):
            bounds = f"between 0 and {maximum:g}" if maximum is not None else "0 or more"
            raise RulesError(f"{field} must be {bounds}, got {value!r}")
        return number

    window = _number(
        raw.get("error_window_seconds", 60), "guard.thresholds.error_window_seconds", integer=True
    )
    if not 1 <= window <= MAX_ERROR_WINDOW_SECONDS:
        raise RulesError(
            f"guard.thresholds.error_window_seconds must be between 1 and "
            f"{MAX_ERROR_WINDOW_SECONDS}, got {window!r}"
        )
    min_requests = _number(
        raw.get("min_requests", 20), "guard.thresholds.min_requests", integer=True
    )
    if min_requests < 1:
        raise RulesError(f"guard.thresholds.min_requests must be 1 or more, got {min_requests!r}")
    lag = limit("lag_seconds", integer=False)
    rate = limit("cqrs_error_rate", integer=False, maximum=1)
    return GuardThresholds(
        drift_entities=limit("drift_entities", integer=True),
        lag_seconds=None if lag is None else float(lag),
        dead_letters=limit("dead_letters", integer=True),
        cqrs_error_rate=None if rate is None else float(rate),
        error_window_seconds=int(window),
        min_requests=int(min_requests),
    )


def _number(value: Any, field: str, *, integer: bool = False) -> int | float:
    """Return a finite YAML number (an integer when `integer`), or raise naming the field."""
    allowed = isinstance(value, int) or (not integer and isinstance(value, float))
    if isinstance(value, bool) or not allowed:
        kind = "an integer" if integer else "a number"
        raise RulesError(f"{field} must be {kind}, got {value!r}")
    assert isinstance(value, int | float)
    if not math.isfinite(value):
        raise RulesError(f"{field} must be a finite number, got {value!r}")
    return value


# The shadow and gate sections

_SHADOW_FIELDS = ("percent", "max_samples", "ignore_fields")
_GATE_FIELDS = ("enabled",)
# Samples are kept in memory and returned whole by the status page, so their number is bounded.
MAX_SHADOW_SAMPLES = 1000


def _parse_shadow(raw: Any) -> ShadowConfig:
    if raw is None:
        return ShadowConfig()
    if not isinstance(raw, dict):
        raise RulesError(f"shadow must be a mapping, got {_type_name(raw)}")
    _check_fields(raw, _SHADOW_FIELDS, "", "shadow")

    percent = _number(raw.get("percent", 0), "shadow.percent")
    if not 0 <= percent <= 100:
        raise RulesError(f"shadow.percent must be between 0 and 100, got {percent!r}")
    max_samples = _number(raw.get("max_samples", 20), "shadow.max_samples", integer=True)
    if not 0 <= max_samples <= MAX_SHADOW_SAMPLES:
        raise RulesError(
            f"shadow.max_samples must be between 0 and {MAX_SHADOW_SAMPLES}, got {max_samples!r}"
        )
    ignore_fields = raw.get("ignore_fields") or []
    if not isinstance(ignore_fields, list) or not all(
        isinstance(name, str) and name for name in ignore_fields
    ):
        raise RulesError(
            f"shadow.ignore_fields must be a list of JSON field names, got {ignore_fields!r}"
        )
    return ShadowConfig(float(percent), int(max_samples), frozenset(ignore_fields))


def _parse_gate(raw: Any) -> GateConfig:
    if raw is None:
        return GateConfig()
    if not isinstance(raw, dict):
        raise RulesError(f"gate must be a mapping, got {_type_name(raw)}")
    _check_fields(raw, _GATE_FIELDS, "", "gate")

    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise RulesError(f"gate.enabled must be true or false, got {enabled!r}")
    return GateConfig(enabled)
