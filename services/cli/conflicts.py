"""`ztcqrs conflicts`: the conflicts each side recorded, newest first.

A conflict is a state that arrived with the version a side already held but with other content.
Each side stores both states and its resolution (`conflict_apply`: the incoming state replaced the
local one, `conflict_keep`: the local state stayed). The rows are read over the same internal API
as the reconciler uses. Exit codes: 0 listed, 2 invalid settings or a side that cannot be reached.
"""

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from pydantic import ValidationError

from services.cqrs.reconcile import ReconcileError, ReconcileSettings, open_internal_api
from services.shared.logs import configure_logging
from services.shared.reconciliation import Side

SIDES = {"monolith": Side.MONOLITH, "cqrs": Side.WRITE_MODEL}
EXIT_ERROR = 2


async def list_conflicts(
    settings: ReconcileSettings, sides: list[str], limit: int
) -> list[dict[str, Any]]:
    """Return up to `limit` conflicts of the named sides together, newest first."""
    rows: list[dict[str, Any]] = []
    async with open_internal_api(settings) as api:
        for name in sides:
            rows.extend({**row, "side": name} for row in await api.conflicts(SIDES[name], limit))
    rows.sort(key=lambda row: str(row["recorded_at"]), reverse=True)
    return rows[:limit]


def format_conflict(row: dict[str, Any]) -> str:
    def compact(state: Any) -> str:
        return json.dumps(state, sort_keys=True, separators=(",", ":"))

    return "\n".join((
        f"{row['recorded_at']}  {row['side']}  {row['kind']} {row['entity_id']}  "
        f"v{row['version']}  {row['resolution']}  (incoming from {row['incoming_origin']})",
        f"    local:    {compact(row['local'])}",
        f"    incoming: {compact(row['incoming'])}",
    ))


def _conflicts(args: argparse.Namespace) -> int:
    try:
        overrides = {
            setting: value
            for setting, value in (("monolith_url", args.monolith_url),
                                   ("service_url", args.cqrs_url))
            if value is not None
        }
        settings = ReconcileSettings(**overrides)
        settings.require_sync_client_secret()
    except (ValidationError, ValueError) as error:
        print(f"error: invalid settings: {error}", file=sys.stderr)
        return EXIT_ERROR
    if not logging.getLogger().handlers:  # a caller that configured logging keeps its own
        configure_logging("ztcqrs-conflicts", "WARNING")
    sides = [args.side] if args.side else list(SIDES)
    try:
        rows = asyncio.run(list_conflicts(settings, sides, args.limit))
    except ReconcileError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"conflicts": rows}, sort_keys=True))
        return 0
    for row in rows:
        print(format_conflict(row))
    print(f"conflicts listed: {len(rows)}", file=sys.stderr)
    return 0


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is outside 1 to 1000")
    return value


def register(commands: Any) -> None:
    """Add `ztcqrs conflicts` to the `ztcqrs` parser."""
    parser = commands.add_parser(
        "conflicts", help="list the conflicts each side recorded, with both states, newest first"
    )
    parser.add_argument("--side", choices=sorted(SIDES), help="one side only (default: both)")
    parser.add_argument(
        "--limit", type=_limit, default=50, help="at most this many conflicts (1-1000, default 50)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--monolith-url", help="monolith base URL (default: CQRS_MONOLITH_URL)")
    parser.add_argument("--cqrs-url", help="CQRS service base URL (default: CQRS_SERVICE_URL)")
    parser.set_defaults(handler=_conflicts)
