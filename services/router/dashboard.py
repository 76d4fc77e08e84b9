"""The router's status page (`GET /_gray/dashboard`): the status body rendered as one HTML page.

The page loads nothing: the CSS is inline and allowed by its hash in the Content-Security-Policy,
the chart is server-rendered SVG, and there is no script. Every value from the status body is
HTML-escaped, because rule names, file paths and errors come from operators' files and Redis.
"""

import base64
import hashlib
import html
import re
from importlib import resources
from string import Template
from typing import Any

from services.shared.clock import utc_now

from .guard import HEALTH_UNREADABLE
from .rules import TARGETS

_TEMPLATE_TEXT = resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")
_TEMPLATE = Template(_TEMPLATE_TEXT)


def _style_hash(template: str) -> str:
    match = re.search(r"<style>(.*?)</style>", template, re.DOTALL)
    assert match is not None, "dashboard.html must contain one <style> element"
    digest = hashlib.sha256(match.group(1).encode()).digest()
    return "sha256-" + base64.b64encode(digest).decode()


# Nothing but the page's own inline style may load or run.
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src '{_style_hash(_TEMPLATE_TEXT)}'; img-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
DASHBOARD_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/html; charset=utf-8"),
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)

# Chart geometry in SVG user units.
CHART_WIDTH = 600
CHART_HEIGHT = 140
CHART_TOP = 10
CHART_BOTTOM = 20
COLORS = {"monolith": "#6b7a99", "cqrs": "#2f8f5b"}


def render_dashboard(status: dict[str, Any]) -> str:
    """Render the status body as the dashboard page.

    The body's times are already ISO 8601 UTC strings, so the page shows them unchanged.
    """
    guard = status.get("guard") or {}
    split = status.get("split") or {}
    health = status.get("health")
    buckets: list[dict[str, Any]] = split.get("buckets") or []
    totals = {target: sum(int(bucket.get(target, 0)) for bucket in buckets) for target in TARGETS}
    served = sum(totals.values())
    guard_class, guard_text = _guard_state(guard)
    values = {
        "generated_at": _escape(utc_now()),
        "phase": _escape(status.get("phase") or "unknown"),
        "rules_version": _escape(status.get("rules_version")),
        "loaded_at": _escape(status.get("loaded_at")),
        "rules_file": _escape(status.get("rules_file")),
        "rules": _escape(", ".join(status.get("rules") or []) or "none"),
        "rules_error": _escape(status.get("last_error") or "none"),
        "guard_class": guard_class,
        "guard_text": _escape(guard_text),
        "guard_action": _guard_action(guard),
        "guard_details": _guard_details(guard),
        "monolith_total": _escape(totals["monolith"]),
        "cqrs_total": _escape(totals["cqrs"]),
        "cqrs_share": _escape(f"{totals['cqrs'] / served:.1%}" if served else "n/a"),
        "bucket_seconds": _escape(split.get("bucket_seconds", 10)),
        "split_error": _error(split.get("error")),
        "split_chart": _split_chart(buckets),
        "health_error": _error(guard.get("error") and f"Last health read failed: {guard['error']}"),
        "groups_table": _groups_table(health),
        "relays_table": _relays_table(health),
        "drift": _drift(health),
        "dead_letters": _dead_letters(health),
        "shadow": _shadow(status.get("shadow") or {}),
        "shadow_samples": _shadow_samples(status.get("shadow") or {}),
        "gate": _gate(status.get("gate") or {}),
    }
    return _TEMPLATE.substitute(values)


def _guard_state(guard: dict[str, Any]) -> tuple[str, str]:
    """Return the CSS state name and the sentence that describes the guard."""
    if guard.get("tripped"):
        return "tripped", (
            f"Tripped: {guard.get('threshold')} is {_number(guard.get('value'))}, above the limit "
            f"of {_number(guard.get('limit'))}. Requests for cqrs go to the monolith."
        )
    if guard.get("frozen"):
        return "frozen", "Frozen: every request that the rules send to cqrs goes to the monolith."
    return "normal", "Not tripped: requests go where the rules send them."


# How a trip on each threshold is lifted, from services/router/guard.py. `$unfreeze` becomes the
# command. A trip is cleared when the rules' reset_at is later than its tripped_at, and unfreeze
# sets reset_at to now, but the guard trips again at its next check on evidence from after that.
_LIFT_TRIP = {
    "drift_entities": (
        "$unfreeze lifts the trip. The guard then ignores this reconcile run and trips again "
        "only when a later run reports drift above the limit."
    ),
    "lag_seconds": (
        "$unfreeze lifts the trip once the lag is back under the limit. Before that, the guard "
        "trips again at its next check."
    ),
    "dead_letters": (
        "Replay or delete the dead letters with $dlq, then $unfreeze lifts the trip. Before "
        "that, the guard trips again at its next check."
    ),
    "cqrs_error_rate": (
        "$unfreeze lifts the trip. Only calls to cqrs after that count, so the guard trips again "
        "if cqrs keeps failing."
    ),
    HEALTH_UNREADABLE: (
        "This router cannot read the migration health from Redis, and lifts the trip by itself "
        "once it reads Redis again. $unfreeze does not lift it."
    ),
}
_LIFT_OTHER = "$unfreeze lifts the trip once the value is back under the limit."
_LIFT_FREEZE = "$unfreeze ends the freeze."
_LIFT_FREEZE_TOO = "The rules are also frozen, and $unfreeze ends the freeze."
_COMMANDS = {
    "unfreeze": "<code>ztcqrs rollout unfreeze</code>",
    "dlq": "<code>ztcqrs dlq</code>",
}


def _guard_action(guard: dict[str, Any]) -> str:
    """Return HTML sentences that describe how to lift the trip or the freeze, or "" for neither."""
    sentences: list[str] = []
    if guard.get("tripped"):
        threshold = guard.get("threshold")
        sentences.append(_LIFT_TRIP.get(str(threshold), _LIFT_OTHER))
        if guard.get("frozen"):
            sentences.append(_LIFT_FREEZE_TOO)
    elif guard.get("frozen"):
        sentences.append(_LIFT_FREEZE)
    if not sentences:
        return ""
    text = Template(" ".join(sentences)).substitute(_COMMANDS)
    return f'<span id="guard-action" class="guard-action">{text}</span>'


def _thresholds_text(thresholds: dict[str, Any]) -> str:
    """Describe the set thresholds. The error window applies to cqrs_error_rate only."""
    parts: list[str] = []
    for name in ("drift_entities", "lag_seconds", "dead_letters", "cqrs_error_rate"):
        value = thresholds.get(name)
        if value is None:
            continue
        part = f"{name} {_number(value)}"
        if name == "cqrs_error_rate":
            part += (
                f" (over the last {_number(thresholds.get('error_window_seconds'))} s, at "
                f"least {_number(thresholds.get('min_requests'))} calls)"
            )
        parts.append(part)
    return ", ".join(parts) or "none set"


def _guard_details(guard: dict[str, Any]) -> str:
    rows = [
        ("Frozen", "yes" if guard.get("frozen") else "no"),
        ("Tripped at", _time(guard.get("tripped_at"))),
        ("Tripped by", guard.get("tripped_by") or "none"),
        ("Reset at", _time(guard.get("reset_at"))),
        ("Thresholds", _thresholds_text(guard.get("thresholds") or {})),
        ("Last check", _time(guard.get("checked_at"))),
    ]
    return "\n".join(f"<dt>{_escape(name)}</dt><dd>{_escape(value)}</dd>" for name, value in rows)


def _split_chart(buckets: list[dict[str, Any]]) -> str:
    """Return a stacked bar chart of requests per target per bucket as inline SVG."""
    plot_height = CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    peak = max((sum(int(b.get(t, 0)) for t in TARGETS) for b in buckets), default=0)
    scale = plot_height / peak if peak else 0.0
    bar = CHART_WIDTH / max(len(buckets), 1)
    base = CHART_TOP + plot_height
    shapes: list[str] = []
    for index, bucket in enumerate(buckets):
        x = index * bar
        y = float(base)
        label = ", ".join(f"{target} {int(bucket.get(target, 0))}" for target in TARGETS)
        title = f"{_time(bucket.get('start'))}: {label}"
        for target in TARGETS:
            height = int(bucket.get(target, 0)) * scale
            if height <= 0:
                continue
            y -= height
            shapes.append(
                f'<rect class="bar-{target}" x="{x + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" '
                f'height="{height:.1f}" fill="{COLORS[target]}"><title>{_escape(title)}</title>'
                "</rect>"
            )
    axis = (
        f'<line x1="0" y1="{base}" x2="{CHART_WIDTH}" y2="{base}" stroke="#9aa3b0"/>'
        f'<text x="0" y="{CHART_HEIGHT - 4}" font-size="11" fill="#5b6472">10 min ago</text>'
        f'<text x="{CHART_WIDTH}" y="{CHART_HEIGHT - 4}" font-size="11" fill="#5b6472" '
        'text-anchor="end">now</text>'
        f'<text x="0" y="{CHART_TOP}" font-size="11" fill="#5b6472">{peak} per bucket</text>'
    )
    return (
        f'<svg id="split-chart" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" width="{CHART_WIDTH}" '
        f'height="{CHART_HEIGHT}" role="img" aria-label="Requests per target per bucket">'
        f"{axis}{''.join(shapes)}</svg>"
    )


def _groups_table(health: dict[str, Any] | None) -> str:
    if health is None:
        return '<p class="muted">No health snapshot read yet.</p>'
    rows = [
        (group.get("stream"), group.get("group"), group.get("pending"),
         group.get("lag_entries"), _number(group.get("lag_seconds")))
        for group in health.get("groups") or []
    ]
    header = ("Stream", "Group", "Pending", "Undelivered", "Lag (s)")
    read_at = (
        f'<p class="muted">Read at {_escape(_time(health.get("taken_at")))}; max lag '
        f'{_escape(_number(health.get("max_lag_seconds")))} s.</p>'
    )
    return read_at + _table("lag-table", header, rows)


def _relays_table(health: dict[str, Any] | None) -> str:
    if health is None:
        return '<p class="muted">No health snapshot read yet.</p>'
    relays = health.get("relay_lag_seconds") or {}
    rows = [(name, _number(lag)) for name, lag in relays.items()]
    return _table("relay-table", ("Relay", "Oldest unrelayed row (s)"), rows)


def _drift(health: dict[str, Any] | None) -> str:
    reconcile = None if health is None else health.get("reconcile")
    if reconcile is None:
        return '<p class="muted" id="drift-summary">No reconcile run has finished yet.</p>'
    rows = [
        ("Finished at", _time(reconcile.get("finished_at"))),
        ("Missing", reconcile.get("missing")),
        ("Stale", reconcile.get("stale")),
        ("Conflicts", reconcile.get("conflicting")),
        ("Drift entities", reconcile.get("drift_entities")),
    ]
    items = "\n".join(f"<dt>{_escape(name)}</dt><dd>{_escape(value)}</dd>" for name, value in rows)
    return f'<dl id="drift-summary">\n{items}\n</dl>'


def _dead_letters(health: dict[str, Any] | None) -> str:
    if health is None:
        return '<p class="muted">No health snapshot read yet.</p>'
    counts = health.get("dead_letters") or {}
    rows = [(stream, count) for stream, count in counts.items()]
    total = (
        f'<p>Total: <span id="dead-letter-total">{_escape(health.get("dead_letter_total"))}'
        "</span></p>"
    )
    return total + _table("dead-letter-table", ("Stream", "Dead letters"), rows)


def _shadow(shadow: dict[str, Any]) -> str:
    matches = int(shadow.get("matches") or 0)
    compared = matches + int(shadow.get("mismatches") or 0)
    rows = [
        ("Sample rate", f"{_number(shadow.get('percent'))}% of 2xx GET and HEAD", "shadow-percent"),
        ("Matches", shadow.get("matches"), "shadow-matches"),
        ("Mismatches", shadow.get("mismatches"), "shadow-mismatches"),
        ("Errors", shadow.get("errors"), "shadow-errors"),
        ("Dropped", shadow.get("dropped"), "shadow-dropped"),
        ("In flight", shadow.get("in_flight"), "shadow-in-flight"),
        # Errors and dropped reads were never compared, so they are not part of the share.
        ("Match share", f"{matches / compared:.1%}" if compared else "n/a", "shadow-match-share"),
    ]
    return _definitions(rows)


def _shadow_samples(shadow: dict[str, Any]) -> str:
    """Return the recent mismatch samples as a table, newest first."""
    samples: list[dict[str, Any]] = shadow.get("samples") or []
    rows = [
        (
            _time(sample.get("at")),
            sample.get("request_id"),
            sample.get("method"),
            sample.get("path"),
            *(_sample_status(sample, target) for target in TARGETS),
            sample.get("diff"),
        )
        for sample in reversed(samples)
    ]
    header = ("Time", "Request ID", "Method", "Path",
              *(f"{target} status" for target in TARGETS), "Difference")
    legend = (
        '<p class="muted">Newest first. A difference reads '
        "<code>JSON path: serving side != shadow side</code>.</p>"
    )
    return legend + _table("shadow-samples", header, rows)


def _sample_status(sample: dict[str, Any], target: str) -> Any:
    side = sample.get(target)
    return side.get("status") if isinstance(side, dict) else None


def _gate(gate: dict[str, Any]) -> str:
    rows = [
        ("Enabled", "yes" if gate.get("enabled") else "no", "gate-enabled"),
        ("Held requests", gate.get("held"), "gate-held"),
        ("Users waiting", gate.get("users_waiting"), "gate-users-waiting"),
        ("Users allowed", gate.get("users_allowed"), "gate-users-allowed"),
        ("Checks in flight", gate.get("checks_in_flight"), "gate-checks-in-flight"),
        ("Failed checks", gate.get("check_failures"), "gate-check-failures"),
    ]
    return _definitions(rows)


def _definitions(rows: list[tuple[str, Any, str]]) -> str:
    """Return `<dt>`/`<dd>` pairs from (name, value, id of the `<dd>`) rows."""
    return "\n".join(
        f'<dt>{_escape(name)}</dt><dd id="{element_id}">{_escape(_number(value))}</dd>'
        for name, value, element_id in rows
    )


def _table(element_id: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{_escape(name)}</th>" for name in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_escape(value)}</td>" for value in row) + "</tr>" for row in rows
    )
    if not rows:
        body = f'<tr><td colspan="{len(header)}" class="muted">none</td></tr>'
    return f'<table id="{element_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _error(message: Any) -> str:
    return f'<p class="error">{_escape(message)}</p>' if message else ""


def _number(value: Any) -> str:
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.1f}"
    return "n/a" if value is None else str(value)


def _time(value: Any) -> str:
    """Return a time of the status body, which is already ISO 8601 text, or "never"."""
    return value if isinstance(value, str) and value else "never"


def _escape(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)
