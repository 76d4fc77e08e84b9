"""Map public API routes to the paths each target serves them on.

The monolith serves the public API as is. The CQRS service serves commands under `/commands` and
queries under `/queries`. A route that the CQRS service has no mapping for stays on the monolith.
"""

import re

MONOLITH = "monolith"
CQRS = "cqrs"

_SEGMENT = "[^/]+"
# (methods, public path pattern, prefix the CQRS service puts before the public path)
_CQRS_ROUTES: tuple[tuple[frozenset[str], re.Pattern[str], str], ...] = (
    (frozenset({"POST"}), re.compile("/orders"), "/commands"),
    (frozenset({"POST"}), re.compile(f"/orders/{_SEGMENT}/{_SEGMENT}"), "/commands"),
    # Starlette serves HEAD on every GET route, so HEAD follows GET.
    (frozenset({"GET", "HEAD"}), re.compile(f"/orders(?:/{_SEGMENT})?"), "/queries"),
    (frozenset({"GET", "HEAD"}), re.compile(f"/products(?:/{_SEGMENT})?"), "/queries"),
)


def cqrs_path(method: str, path: str) -> str | None:
    """Return the CQRS service's path for a public route, or None when it has no such route."""
    for methods, pattern, prefix in _CQRS_ROUTES:
        if method in methods and pattern.fullmatch(path):
            return prefix + path
    return None


def upstream_route(target: str, method: str, path: str) -> tuple[str, str]:
    """Return the target that serves `method path` and the path to send it to.

    A request sent to the CQRS service on a route it does not serve goes to the monolith.
    """
    if target == CQRS:
        mapped = cqrs_path(method, path)
        if mapped is not None:
            return CQRS, mapped
    return MONOLITH, path
