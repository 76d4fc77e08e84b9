"""Changing a split's percent moves users only in the direction of the change.

A user's bucket depends on the salt and the subject alone, so raising a percentage keeps every
user who already moved on the split target, and lowering it moves back only users above the new
percentage. Each step below edits the rules the way `ztcqrs rollout set` does and routes 10,000
subjects through the RuleSet that the router's parser builds from the edited text.
"""

from services.cli.rules_edit import edit_rules
from services.router.rules import RequestFacts, RuleSet, parse_rules

RULES = """\
version: 1
salt: monotone-test
default_target: monolith
rules:
  - name: orders
    match:
      paths: ["/orders/**"]
    split:
      target: cqrs
      percent: 0
    otherwise: monolith
  - name: default
    target: monolith
"""

SUBJECTS = [f"user-{index}" for index in range(10_000)]
STEPS = [0, 1, 5, 10, 20, 10, 50, 12.5, 100, 0]
# Allowed gap between the share of subjects that moved and the percentage change, in percentage
# points: about three standard deviations of a binomial share at p = 0.5 over 10,000 subjects.
TOLERANCE_POINTS = 1.5


def rules_at(text: str, percent: float) -> tuple[str, RuleSet]:
    edited, _changes = edit_rules(text, lambda document: document.set_percent(percent, "orders"))
    return edited, parse_rules(edited)


def on_cqrs(rules: RuleSet) -> frozenset[str]:
    moved = set()
    for subject in SUBJECTS:
        facts = RequestFacts(
            method="GET", path="/orders/1", headers={}, subject=subject, claims={}
        )
        decision = rules.select(facts)
        assert decision.rule_name == "orders"
        if decision.target == "cqrs":
            moved.add(subject)
    return frozenset(moved)


def test_percent_steps_move_users_one_way() -> None:
    text = RULES
    previous_percent = 0.0
    previous: frozenset[str] = frozenset()
    seen: dict[float, frozenset[str]] = {}

    for percent in STEPS:
        text, rules = rules_at(text, percent)
        current = on_cqrs(rules)
        step = f"{previous_percent} -> {percent}"

        if percent >= previous_percent:
            assert previous <= current, f"{step}: a user left cqrs while the percent rose"
        if percent <= previous_percent:
            assert current <= previous, f"{step}: a user joined cqrs while the percent fell"
        moved_points = len(current ^ previous) * 100 / len(SUBJECTS)
        expected_points = abs(percent - previous_percent)
        assert abs(moved_points - expected_points) <= TOLERANCE_POINTS, (
            f"{step}: {moved_points:.2f}% of users moved, expected about {expected_points}%"
        )
        if percent in seen:
            assert current == seen[percent], f"{step}: not the same users as before at {percent}"
        seen[percent] = current
        previous_percent, previous = percent, current


def test_percent_bounds() -> None:
    _, none = rules_at(RULES, 0)
    _, everyone = rules_at(RULES, 100)

    assert on_cqrs(none) == frozenset()
    assert on_cqrs(everyone) == frozenset(SUBJECTS)
