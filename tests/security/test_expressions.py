"""CEL rule expressions: what compiles, what is rejected at load, and how they evaluate."""

import pytest

from services.router.expressions import ExpressionError, compile_expression
from services.router.rules import RequestFacts, RulesError, parse_rules

FACTS = {
    "method": "GET",
    "path": "/orders/o1",
    "headers": {"x-tenant": ("acme",)},
    "claims": {"sub": "alice", "beta_tester": True, "tenant": "acme"},
    "subject": "alice",
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('claims.tenant == "acme"', True),
        ('method in ["POST", "PUT"]', False),
        ('path.startsWith("/orders/") && size(path) < 64', True),
        ('has(claims.beta_tester) && claims.beta_tester', True),
        ('"x-tenant" in headers && headers["x-tenant"].exists(v, v == "acme")', True),
        ('subject.matches("^a[a-z]+$")', True),
        ("claims.missing == 1", False),  # an evaluation error is false
        ('"not a boolean"', False),
    ],
)
def test_expression_evaluates(text: str, expected: bool) -> None:
    assert compile_expression(text).evaluate(**FACTS) is expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("claims.__class__", "names starting with '_'"),
        ('__import__("os")', "names starting with '_'"),
        ('claims["__globals__"]', "names a Python attribute"),
        ('os.system("id")', "method .system()"),
        ('open("/etc/passwd")', "open()"),
        ("secrets", "unknown variable 'secrets'"),
        ("google.protobuf.Any{}", "message construction"),
        (".claims", "leading-dot"),
        ("(" * 50 + "true" + ")" * 50, "nested too deeply"),
        ("a +", "not valid CEL"),
        ("x" * 1001, "limit of 1000"),
        ("", "non-empty string"),
    ],
)
def test_expression_rejected(text: str, reason: str) -> None:
    with pytest.raises(ExpressionError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        compile_expression(text)


def test_rules_reject_bad_expr() -> None:
    document = """\
version: 1
default_target: monolith
rules:
  - name: sneaky
    match: {expr: 'claims.__class__.__mro__'}
    target: cqrs
"""
    with pytest.raises(RulesError, match=r"rule 'sneaky': match.expr uses the name '__class__'"):
        parse_rules(document)


def test_rules_expr_selects() -> None:
    rules = parse_rules("""\
version: 1
default_target: monolith
rules:
  - name: tenant
    match: {methods: [GET], expr: 'claims.tenant == "acme"'}
    target: cqrs
""")
    acme = RequestFacts("GET", "/orders", {}, "alice", {"tenant": "acme"})
    other = RequestFacts("GET", "/orders", {}, "bob", {"tenant": "other"})

    assert rules.select(acme).target == "cqrs"
    assert rules.select(other).rule_name == "default"
