"""Rules file validation, matching and the sticky split of the gray router."""

import hashlib
import random
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from services.router.rules import (
    BUCKETS,
    Decision,
    RequestFacts,
    RulesError,
    RuleSet,
    bucket,
    compile_glob,
    parse_rules,
)

EXAMPLE_RULES = Path(__file__).resolve().parent.parent / "services/router/default_rules.yaml"

HEADER = """\
version: 1
salt: test-salt
split_key_header: X-Client-ID
default_target: monolith
"""


def rules_of(body: str) -> RuleSet:
    return parse_rules(HEADER + textwrap.dedent(body))


def facts(
    path: str = "/orders",
    *,
    method: str = "GET",
    subject: str | None = "alice",
    headers: dict[str, tuple[str, ...]] | None = None,
    claims: dict[str, Any] | None = None,
) -> RequestFacts:
    return RequestFacts(method, path, headers or {}, subject, claims or {})


def split_rules(percent: float, salt: str = "test-salt") -> RuleSet:
    return parse_rules(
        f"""
version: 1
salt: {salt}
split_key_header: X-Client-ID
default_target: monolith
rules:
  - name: canary
    split: {{target: cqrs, percent: {percent}}}
    otherwise: monolith
"""
    )


def one_rule(rule: str) -> str:
    """Return a rules file with one rule, written in YAML flow style."""
    return f"{HEADER}rules:\n  - {rule}\n"


TOP = "version: 1\ndefault_target: monolith\n"

INVALID_FILES = [
    ("- a list", "must be a YAML mapping, got list"),
    ("version: [unclosed", "not valid YAML"),
    ("version: 2\ndefault_target: monolith\n", "version must be 1, got 2"),
    ("version: 1\n", "default_target is missing"),
    (
        "version: 1\ndefault_target: legacy\n",
        "default_target must be 'monolith' or 'cqrs', got 'legacy'",
    ),
    (TOP + "salt: 5\n", "salt must be a string, got 5"),
    (TOP + "colour: red\n", "unknown field 'colour'"),
    (TOP + "split_key_header: 'bad header'\n", "split_key_header must be an HTTP header name"),
    (TOP + "rules: {a: 1}\n", "rules must be a list, got dict"),
    (one_rule("{target: cqrs}"), "rule #1: name must be"),
    (one_rule("{name: 'has space', target: cqrs}"), "rule #1: name must be"),
    (
        HEADER + "rules:\n  - {name: a, target: cqrs}\n  - {name: a, target: monolith}\n",
        "rule 'a': name is used by an earlier rule",
    ),
    (
        one_rule("{name: a, target: legacy}"),
        "rule 'a': target must be 'monolith' or 'cqrs', got 'legacy'",
    ),
    (one_rule("{name: a}"), "rule 'a': set exactly one of target and split"),
    (
        one_rule("{name: a, target: cqrs, split: {target: cqrs, percent: 5}}"),
        "rule 'a': set exactly one of target and split",
    ),
    (
        one_rule("{name: canary, split: {target: cqrs, percent: 120}}"),
        "rule 'canary': split.percent must be between 0 and 100, got 120",
    ),
    (
        one_rule("{name: canary, split: {target: cqrs, percent: -1}}"),
        "rule 'canary': split.percent must be between 0 and 100, got -1",
    ),
    (
        one_rule("{name: canary, split: {target: cqrs, percent: '10%'}}"),
        "rule 'canary': split.percent must be a number",
    ),
    (
        one_rule("{name: canary, split: {target: cqrs, percent: true}}"),
        "rule 'canary': split.percent must be a number",
    ),
    (
        one_rule("{name: canary, split: {target: cqrs, percent: .nan}}"),
        "rule 'canary': split.percent must be between 0 and 100",
    ),
    (one_rule("{name: canary, split: {percent: 5}}"), "rule 'canary': split.target is missing"),
    (
        one_rule("{name: canary, split: {target: cqrs, percentage: 5}}"),
        "rule 'canary': unknown field 'percentage' in split",
    ),
    (
        one_rule("{name: canary, split: {target: cqrs, percent: 5}, otherwise: legacy}"),
        "rule 'canary': otherwise must be 'monolith' or 'cqrs'",
    ),
    (
        one_rule("{name: a, target: cqrs, otherwise: monolith}"),
        "rule 'a': otherwise is only valid with split",
    ),
    (
        one_rule("{name: a, target: cqrs, fallback: cqrs}"),
        "rule 'a': fallback 'cqrs' is the same as target",
    ),
    (
        one_rule("{name: a, target: cqrs, fallback: legacy}"),
        "rule 'a': fallback must be 'monolith' or 'cqrs'",
    ),
    (one_rule("{name: a, target: cqrs, weight: 3}"), "rule 'a': unknown field 'weight'"),
    (one_rule("{name: a, target: cqrs, match: [1]}"), "rule 'a': match must be a mapping"),
    (
        one_rule("{name: a, target: cqrs, match: {hosts: [x]}}"),
        "rule 'a': unknown field 'hosts' in match",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {methods: GET}}"),
        "rule 'a': match.methods must be a list",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {methods: []}}"),
        "rule 'a': match.methods must not be empty",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {methods: ['G T']}}"),
        "rule 'a': match.methods entries must be HTTP method names",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {paths: [orders]}}"),
        "rule 'a': match.paths glob 'orders' must start with '/'",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {paths: ['/orders**']}}"),
        "rule 'a': match.paths glob '/orders**' uses '**' inside a segment",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {paths: ['/orders//x']}}"),
        "rule 'a': match.paths glob '/orders//x' has an empty segment",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {paths: [5]}}"),
        "rule 'a': match.paths entries must be strings",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {headers: {X-Beta: 1}}}"),
        "rule 'a': match.headers.X-Beta values must be strings, got 1",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {headers: {'X Beta': '1'}}}"),
        "rule 'a': match.headers.X Beta must be an HTTP header name",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {headers: {X-Beta: []}}}"),
        "rule 'a': match.headers.X-Beta must not be empty",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {claims: {beta_tester: {x: 1}}}}"),
        "rule 'a': match.claims.beta_tester must be a value or a list of values",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {claims: {groups: [[a]]}}}"),
        "rule 'a': match.claims.groups values must be strings, numbers or booleans",
    ),
    (
        one_rule("{name: a, target: cqrs, match: {claims: {beta_tester: null}}}"),
        "rule 'a': match.claims.beta_tester must be a value or a list of values",
    ),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID_FILES)
def test_rules_invalid_file(text: str, fragment: str) -> None:
    with pytest.raises(RulesError) as caught:
        parse_rules(text)
    assert fragment in str(caught.value)


def test_rules_example_file_is_valid() -> None:
    rules = parse_rules(EXAMPLE_RULES.read_bytes())
    assert rules.names == ["beta-testers", "canary", "default"]
    assert rules.default_target == "monolith"
    assert rules.split_key_header == "x-client-id"


def test_rules_empty_list_uses_default_target() -> None:
    rules = parse_rules("version: 1\ndefault_target: cqrs\n")
    assert rules.select(facts()) == Decision("default", "cqrs", None)


def test_rules_first_match_wins() -> None:
    rules = rules_of(
        """
        rules:
          - name: writes
            match: {methods: [post]}
            target: cqrs
          - name: everything
            target: monolith
        """
    )
    assert rules.select(facts(method="POST")).rule_name == "writes"
    assert rules.select(facts(method="POST")).target == "cqrs"
    assert rules.select(facts(method="GET")).rule_name == "everything"
    assert rules.select(facts(method="GET")).target == "monolith"


def test_rules_no_match_is_default() -> None:
    rules = rules_of(
        """
        rules:
          - name: products
            match: {paths: ["/products"]}
            target: cqrs
        """
    )
    assert rules.select(facts("/orders")) == Decision("default", "monolith", None)


def test_rules_methods_uppercased() -> None:
    rules = rules_of(
        """
        rules:
          - name: reads
            match: {methods: [get, Head]}
            target: cqrs
        """
    )
    assert rules.rules[0].match.methods == frozenset({"GET", "HEAD"})
    assert rules.select(facts(method="HEAD")).target == "cqrs"
    assert rules.select(facts(method="DELETE")).target == "monolith"


GLOB_CASES = [
    ("/orders", "/orders", True),
    ("/orders", "/orders/1", False),
    ("/orders/*", "/orders/1", True),
    ("/orders/*", "/orders", False),
    ("/orders/*", "/orders/1/pay", False),
    ("/orders/*/pay", "/orders/1/pay", True),
    ("/orders/*/pay", "/orders/1/ship", False),
    ("/orders/**", "/orders", True),
    ("/orders/**", "/orders/1", True),
    ("/orders/**", "/orders/1/pay", True),
    ("/orders/**", "/ordersx", False),
    ("/orders/**", "/products/1", False),
    ("/orders/**/pay", "/orders/pay", True),
    ("/orders/**/pay", "/orders/a/b/pay", True),
    ("/orders/**/pay", "/orders/a/b/ship", False),
    ("/files/*.json", "/files/a.json", True),
    ("/files/*.json", "/files/a.jsonx", False),
    ("/files/*.json", "/files/sub/a.json", False),
    ("/a.b", "/aXb", False),
    ("/**", "/", True),
    ("/**", "/anything/at/all", True),
    ("/", "/", True),
    ("/", "/orders", False),
]


@pytest.mark.parametrize(("glob", "path", "expected"), GLOB_CASES)
def test_glob_match(glob: str, path: str, expected: bool) -> None:
    assert (compile_glob(glob).fullmatch(path) is not None) is expected


def test_rules_paths_any_glob() -> None:
    rules = rules_of(
        """
        rules:
          - name: api
            match: {paths: ["/orders", "/products/**"]}
            target: cqrs
        """
    )
    assert rules.select(facts("/orders")).rule_name == "api"
    assert rules.select(facts("/products/p1")).rule_name == "api"
    assert rules.select(facts("/users/me")).rule_name == "default"


def test_rules_headers_match() -> None:
    rules = rules_of(
        """
        rules:
          - name: beta-header
            match:
              headers:
                X-Beta: ["yes", "on"]
            target: cqrs
        """
    )
    assert rules.rules[0].match.headers == (("x-beta", frozenset({"yes", "on"})),)
    assert rules.select(facts(headers={"x-beta": ("on",)})).target == "cqrs"
    assert rules.select(facts(headers={"x-beta": ("other", "yes")})).target == "cqrs"
    assert rules.select(facts(headers={"x-beta": ("YES",)})).target == "monolith"
    assert rules.select(facts(headers={})).target == "monolith"


def test_rules_claims_json_typed() -> None:
    rules = rules_of(
        """
        rules:
          - name: beta
            match:
              claims:
                beta_tester: true
            target: cqrs
        """
    )
    assert rules.select(facts(claims={"beta_tester": True})).target == "cqrs"
    assert rules.select(facts(claims={"beta_tester": 1})).target == "monolith"
    assert rules.select(facts(claims={"beta_tester": "true"})).target == "monolith"
    assert rules.select(facts(claims={"beta_tester": False})).target == "monolith"
    assert rules.select(facts(claims={})).target == "monolith"


def test_rules_claims_value_list() -> None:
    rules = rules_of(
        """
        rules:
          - name: tenants
            match:
              claims:
                client_id: [web, mobile]
                tier: 2
            target: cqrs
        """
    )
    both = {"client_id": "mobile", "tier": 2}
    assert rules.select(facts(claims=both)).target == "cqrs"
    assert rules.select(facts(claims={**both, "tier": 2.0})).target == "cqrs"
    assert rules.select(facts(claims={**both, "tier": "2"})).target == "monolith"
    assert rules.select(facts(claims={**both, "client_id": "cli"})).target == "monolith"
    assert rules.select(facts(claims={"client_id": "web"})).target == "monolith"


def test_rules_all_conditions_required() -> None:
    rules = rules_of(
        """
        rules:
          - name: beta-reads
            match:
              methods: [GET]
              paths: ["/orders/**"]
              claims: {beta_tester: true}
            target: cqrs
        """
    )
    beta = {"beta_tester": True}
    assert rules.select(facts("/orders/1", claims=beta)).target == "cqrs"
    assert rules.select(facts("/orders/1", method="POST", claims=beta)).target == "monolith"
    assert rules.select(facts("/products", claims=beta)).target == "monolith"
    assert rules.select(facts("/orders/1")).target == "monolith"


def test_rules_fallback_only_when_different() -> None:
    rules = parse_rules(
        """
version: 1
salt: s
default_target: monolith
rules:
  - name: canary
    split: {target: cqrs, percent: 100}
    otherwise: monolith
    fallback: monolith
  - name: none-moved
    split: {target: cqrs, percent: 0}
    fallback: monolith
"""
    )
    assert rules.select(facts()) == Decision("canary", "cqrs", "monolith")
    only_second = RuleSet(rules.salt, None, "monolith", rules.rules[1:])
    assert only_second.select(facts()) == Decision("none-moved", "monolith", None)


def test_bucket_formula() -> None:
    digest = hashlib.sha256(b"salt-1:alice").hexdigest()
    assert bucket("salt-1", "alice") == int(digest[:8], 16) % 10000
    assert 0 <= bucket("salt-1", "alice") < BUCKETS


def test_split_sticky_per_subject() -> None:
    rules = split_rules(50)
    for subject in (uuid.uuid4().hex for _ in range(200)):
        first = rules.select(facts(subject=subject)).target
        for _ in range(3):
            assert rules.select(facts(subject=subject)).target == first


def test_split_threshold_uses_percent_times_100() -> None:
    rules = split_rules(0.5)
    subjects = [uuid.uuid4().hex for _ in range(2000)]
    for subject in subjects:
        expected = "cqrs" if bucket("test-salt", subject) < 50 else "monolith"
        assert rules.select(facts(subject=subject)).target == expected


def test_split_raise_keeps_moved_users() -> None:
    generator = random.Random(20260131)
    subjects = [f"user-{generator.getrandbits(64):016x}" for _ in range(10_000)]
    at_10 = split_rules(10)
    at_20 = split_rules(20)
    on_cqrs_10 = {s for s in subjects if at_10.select(facts(subject=s)).target == "cqrs"}
    on_cqrs_20 = {s for s in subjects if at_20.select(facts(subject=s)).target == "cqrs"}

    assert on_cqrs_10 <= on_cqrs_20
    assert 800 <= len(on_cqrs_10) <= 1200
    moved = len(on_cqrs_20) - len(on_cqrs_10)
    assert 800 <= moved <= 1200


def test_split_salt_reshuffles() -> None:
    subjects = [uuid.uuid4().hex for _ in range(2000)]
    salt_a = split_rules(50, "salt-a")
    salt_b = split_rules(50, "salt-b")
    first = {s for s in subjects if salt_a.select(facts(subject=s)).target == "cqrs"}
    second = {s for s in subjects if salt_b.select(facts(subject=s)).target == "cqrs"}
    assert first != second


def test_split_key_header_without_subject() -> None:
    rules = split_rules(100)
    with_header = facts(subject=None, headers={"x-client-id": ("device-1",)})
    assert rules.select(with_header).target == "cqrs"
    assert rules.select(facts(subject=None)).target == "monolith"
    assert rules.select(facts(subject=None)).rule_name == "canary"


def test_split_otherwise_defaults_to_default_target() -> None:
    rules = parse_rules(
        """
version: 1
salt: s
default_target: cqrs
rules:
  - name: back
    split: {target: monolith, percent: 0}
"""
    )
    assert rules.rules[0].otherwise == "cqrs"
    assert rules.select(facts()).target == "cqrs"


def test_repeated_key_rejected() -> None:
    text = HEADER + "guard:\n  frozen: false\nguard:\n  frozen: true\n"

    with pytest.raises(RulesError) as raised:
        parse_rules(text)

    assert "key 'guard'" in str(raised.value)
    assert "merge the two into one" in str(raised.value)
