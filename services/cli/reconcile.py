"""`ztcqrs reconcile`: compare the monolith, the CQRS write model and the read model, and repair.

`services.cqrs.reconcile` describes the comparison and the repair. Exit codes: 0 no drift (after a
repair: the repair brought drift to zero), 1 drift remains, 2 invalid settings or a side that
cannot be reached. With `--every`, runs repeat until SIGTERM or SIGINT, and the exit code is that
of the last run.
"""

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

from pydantic import ValidationError

from services.cqrs.reconcile import ReconcileError, ReconcileSettings, open_reconciler
from services.shared.logs import configure_logging
from services.shared.reconciliation import Report

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_DRIFT = 1
EXIT_ERROR = 2


def load_settings(args: argparse.Namespace) -> ReconcileSettings:
    """Read the settings from the environment, with the command line's overrides."""
    overrides: dict[str, Any] = {}
    for option, setting in (
        ("monolith_url", "monolith_url"), ("cqrs_url", "service_url"), ("redis_url", "redis_url"),
        ("wait", "reconcile_wait_seconds"),
    ):
        value = getattr(args, option, None)
        if value is not None:
            overrides[setting] = value
    return ReconcileSettings(**overrides)


def format_report(report: Report) -> str:
    """Render a report for people: a summary line, then one line per drifting entity."""
    counts = report.counts()
    lines = [
        f"drift: {report.drift_entities} entities (missing {counts['missing']}, stale "
        f"{counts['stale']}, conflicting {counts['conflicting']}); repaired {report.repaired}; "
        f"still changing {len(report.in_flight)}; authority {report.authority}; "
        f"{report.duration_seconds:.2f} s"
    ]
    if report.before_repair is not None:
        before = report.before_repair
        lines.append(
            f"before repair: missing {before['missing']}, stale {before['stale']}, conflicting "
            f"{before['conflicting']}"
        )
    for title, drifts in (("drift", report.drifts), ("still changing", report.in_flight)):
        for drift in drifts:
            entry = drift.to_json()
            sides = ", ".join(f"{side} {problem}" for side, problem in entry["problems"].items())
            versions = " ".join(
                f"{side}=v{'-' if version is None else version}"
                f"/{(entry['hashes'][side] or '-')[:12]}"
                for side, version in entry["versions"].items()
            )
            lines.append(
                f"  {title}: {entry['kind']} {entry['id']}  {entry['problem']}  ({sides}; newest "
                f"{entry['newest']})  {versions}"
            )
    return "\n".join(lines)


def _print(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_json(), sort_keys=True), flush=True)
    else:
        print(format_report(report), flush=True)


async def _run_once(settings: ReconcileSettings, args: argparse.Namespace) -> int:
    async with open_reconciler(settings) as reconciler:
        report = await reconciler.run(repair=args.repair)
    _print(report, args.json)
    return EXIT_DRIFT if report.drift_entities else EXIT_CLEAN


async def _run_every(settings: ReconcileSettings, args: argparse.Namespace) -> int:
    """Run every `args.every` seconds until SIGTERM or SIGINT, logging and retrying failed runs."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log.info("periodic reconcile started", extra={"every_s": args.every, "repair": args.repair})
    code = EXIT_CLEAN
    while not stop.is_set():
        try:
            code = await _run_once(settings, args)
        except ReconcileError as error:
            code = EXIT_ERROR
            log.error("reconcile run failed; retrying at the next interval",
                      extra={"error": str(error), "every_s": args.every})
        try:
            await asyncio.wait_for(stop.wait(), timeout=args.every)
        except TimeoutError:
            continue
    log.info("periodic reconcile stopped", extra={"last_exit_code": code})
    return code


def _reconcile(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args)
        settings.require_sync_client_secret()
    except (ValidationError, ValueError) as error:
        print(f"error: invalid reconcile settings: {error}", file=sys.stderr)
        return EXIT_ERROR
    if not logging.getLogger().handlers:  # a caller that configured logging keeps its own
        # A single run prints its report, so only problems are logged beside it; a periodic run
        # is a job whose log is the record.
        level = settings.log_level if args.every is not None else "WARNING"
        configure_logging("ztcqrs-reconcile", level)
    runner = _run_every if args.every is not None else _run_once
    try:
        return asyncio.run(runner(settings, args))
    except ReconcileError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0 seconds")
    return value


def _not_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 seconds or more")
    return value


def register(commands: Any) -> None:
    """Add `ztcqrs reconcile` to the `ztcqrs` parser."""
    parser = commands.add_parser(
        "reconcile",
        help="compare the monolith, the CQRS write model and the read model; report drift "
        "(exit 1) and optionally repair it",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--repair", action="store_true",
        help="re-emit the newest state to each lagging side, then compare again",
    )
    parser.add_argument(
        "--every", type=_positive, metavar="SECONDS",
        help="run again every SECONDS until SIGTERM or SIGINT (default: run once)",
    )
    parser.add_argument(
        "--wait", type=_not_negative, metavar="SECONDS",
        help="maximum seconds to wait for in-flight work on differing entities "
        "(default: CQRS_RECONCILE_WAIT_SECONDS, 5)",
    )
    parser.add_argument("--monolith-url", help="monolith base URL (default: CQRS_MONOLITH_URL)")
    parser.add_argument("--cqrs-url", help="CQRS service base URL (default: CQRS_SERVICE_URL)")
    parser.add_argument("--redis-url", help="Redis URL (default: the REDIS_URL setting)")
    parser.set_defaults(handler=_reconcile)
