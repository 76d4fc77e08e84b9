"""`ztcqrs rollout status|set|freeze|unfreeze|rollback`: move users between the sides.

The commands edit the router's rules in place: a local rules file, or with --configmap the rules
ConfigMap through the Kubernetes API. The router polls its rules and applies a valid change
without a restart. `set` changes one split's percent, `rollback` sets every split to 0, `freeze`
sends every request that a rule would send to cqrs to the monolith instead, and `unfreeze` ends
that and clears a guard trip from before it. Every command prints each field it changed as
old -> new, or a JSON document with --json.
"""

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from services.router.rules import RulesError, parse_rules
from services.router.settings import Settings as RouterSettings
from services.shared.clock import format_epoch, utc_now
from services.shared.logs import configure_logging

from .rules_edit import (
    Change,
    RolloutError,
    RolloutState,
    RulesDocument,
    parse_percent,
    rules_version,
)
from .rules_store import EditResult, FileStore, RulesStore, apply_edit
from .runner import LocalPlatform, PlatformConfig, StartupError

log = logging.getLogger(__name__)

# Key of the chart's rules ConfigMap, from helm/ztcqrs/templates/router/configmap-rules.yaml.
DEFAULT_CONFIGMAP_KEY = "rules.yaml"
TOKEN_ENV = "ZTCQRS_TOKEN"  # noqa: S105 - the name of the variable, not a token
ROUTER_TIMEOUT_SECONDS = 10.0
_STATUS_PATH = "/_gray/status"


def default_rules_file() -> Path:
    """Return the rules file a local router reads.

    That is ROUTER_RULES_FILE when set, else the copy `ztcqrs up` keeps under ZTCQRS_DATA_DIR
    when it exists, else the router's default, the example file shipped with the package.
    """
    try:
        local_copy: Path | None = LocalPlatform(PlatformConfig.from_env(os.environ)).rules_file
    except StartupError:
        local_copy = None
    if local_copy is not None and local_copy.exists():
        return local_copy
    try:
        return RouterSettings().rules_file
    except ValidationError as error:
        raise RolloutError(
            f"The router settings are invalid ({error}); fix the ROUTER_* variables or pass "
            "--file."
        ) from error


@contextlib.contextmanager
def open_store(args: argparse.Namespace) -> Iterator[RulesStore]:
    if args.configmap is None:
        yield FileStore(Path(args.file) if args.file else default_rules_file())
        return
    from .rules_configmap import ConfigMapStore, connect_kubernetes

    api, config_namespace = connect_kubernetes(args.kubeconfig, args.context)
    try:
        namespace = args.namespace or config_namespace or "default"
        yield ConfigMapStore(api, args.configmap, namespace, args.key)
    finally:
        api.api_client.close()


# Edits


def _set(args: argparse.Namespace) -> Callable[[RulesDocument], list[Change]]:
    percent = parse_percent(args.percent)
    return lambda document: document.set_percent(percent, args.rule)


def _freeze(_args: argparse.Namespace) -> Callable[[RulesDocument], list[Change]]:
    return RulesDocument.freeze


def _unfreeze(_args: argparse.Namespace) -> Callable[[RulesDocument], list[Change]]:
    now = utc_now()
    return lambda document: document.unfreeze(now)


def _rollback(_args: argparse.Namespace) -> Callable[[RulesDocument], list[Change]]:
    return RulesDocument.rollback


EDITS: dict[str, Callable[[argparse.Namespace], Callable[[RulesDocument], list[Change]]]] = {
    "set": _set,
    "freeze": _freeze,
    "unfreeze": _unfreeze,
    "rollback": _rollback,
}


def _edit(store: RulesStore, args: argparse.Namespace) -> int:
    result = apply_edit(store, EDITS[args.rollout_command](args))
    if args.json:
        print(json.dumps(_edit_document(args.rollout_command, result), indent=2))
        return 0
    if result.conflicts:
        print(
            f"note: {result.location} changed while this command edited it; the edit was "
            "applied to the newest rules, so the old values below include the other change.",
            file=sys.stderr,
        )
    if not result.changes:
        print(f"{result.location}: no change, the rules already say this.")
        return 0
    print(f"{result.location}:")
    for change in result.changes:
        print(f"  {change.describe()}")
    print(f"  version: {rules_version(result.old_text)} -> {rules_version(result.new_text)}")
    return 0


def _edit_document(action: str, result: EditResult) -> dict[str, Any]:
    return {
        "location": result.location,
        "action": action,
        "changes": [asdict(change) for change in result.changes],
        "written": result.written,
        "version_before": rules_version(result.old_text),
        "version": rules_version(result.new_text),
        "conflicts": result.conflicts,
    }


# Status


def _status(store: RulesStore, args: argparse.Namespace) -> int:
    snapshot = store.read()
    state = RulesDocument(snapshot.text).state(rules_version(snapshot.text))
    try:
        parse_rules(snapshot.text)
        invalid = None
    except RulesError as error:
        invalid = str(error)
    router = None
    if args.router_url:
        token = args.token or os.environ.get(TOKEN_ENV)
        if not token:
            raise RolloutError(
                f"--router-url needs an access token with scope gray:admin; pass --token or set "
                f"{TOKEN_ENV}."
            )
        router = fetch_router_status(args.router_url, token)
    if args.json:
        document: dict[str, Any] = {
            "location": store.location, **asdict(state), "invalid": invalid,
        }
        if router is not None:
            document["router"] = _router_summary(args.router_url, router)
        print(json.dumps(document, indent=2))
        return 1 if invalid else 0
    _print_state(store.location, state)
    if invalid:
        print(f"  invalid: {invalid}. The router keeps its last good rules until this is fixed.")
    if router is None:
        print(
            "  guard trip: not shown, because a trip is stored in Redis, not in the rules file. "
            "Pass --router-url URL with a token of scope gray:admin "
            f"(--token or ${TOKEN_ENV}) to show the live guard state."
        )
    else:
        _print_router(args.router_url, router, state.version)
    return 1 if invalid else 0


def fetch_router_status(url: str, token: str) -> dict[str, Any]:
    """GET the router's /_gray/status with `token`, or raise RolloutError saying why not."""
    status_url = url.rstrip("/") + _STATUS_PATH
    try:
        response = httpx.get(
            status_url, headers={"Authorization": f"Bearer {token}"},
            timeout=ROUTER_TIMEOUT_SECONDS,
        )
    except httpx.HTTPError as error:
        log.error("router status request failed", extra={"url": status_url, "error": str(error)})
        raise RolloutError(
            f"Fetching {status_url} failed ({error}); check --router-url and that the router is "
            "up."
        ) from error
    if response.status_code in (401, 403):
        raise RolloutError(
            f"The router rejected the token with status {response.status_code} on {status_url}; "
            "use a token with scope gray:admin."
        )
    if response.status_code != 200:
        raise RolloutError(
            f"{status_url} returned status {response.status_code}: {response.text[:200]}"
        )
    try:
        body = response.json()
    except ValueError as error:
        raise RolloutError(f"{status_url} did not return JSON; check --router-url.") from error
    if not isinstance(body, dict):
        raise RolloutError(f"{status_url} returned {type(body).__name__}, not a JSON object.")
    return body


def _router_summary(url: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"url": url, "rules_version": status.get("rules_version"), "guard": status.get("guard")}


def _print_state(location: str, state: RolloutState) -> None:
    print(f"{location} (version {state.version})")
    if not state.splits:
        print("  split rules: none")
    for split in state.splits:
        print(f"  split {split.rule}: {split.percent}% of users to {split.target}")
    print(f"  frozen: {'true' if state.frozen else 'false'}")
    print(f"  reset_at: {state.reset_at or '(unset)'}")


def _print_router(url: str, status: dict[str, Any], file_version: str) -> None:
    router_version = status.get("rules_version")
    if router_version == file_version:
        agreement = "the same rules"
    else:
        agreement = (
            "other rules: it has not loaded this version yet, rejected it (see last_error "
            f"{status.get('last_error')!r}), or reads another file"
        )
    print(f"router {url}: rules version {router_version}, {agreement}")
    guard = status.get("guard")
    if not isinstance(guard, dict):
        print("  guard: not reported by this router")
        return
    for name in ("frozen", "tripped", "threshold", "value", "limit"):
        print(f"  guard.{name}: {_text(guard.get(name))}")
    for name in ("tripped_at", "reset_at"):
        print(f"  guard.{name}: {_time_text(guard.get(name))}")


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _time_text(value: Any) -> str:
    """Return a status time as ISO 8601 UTC text.

    Routers from before the status body used ISO 8601 times send epoch seconds, which are
    converted so that every time prints in the rules file's format.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format_epoch(value)
    return _text(value)


# Command line


def _run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:  # a caller that configured logging keeps its own
        configure_logging("ztcqrs-rollout", "WARNING")
    try:
        with open_store(args) as store:
            code: int = args.action(store, args)
            return code
    except RolloutError as error:
        print(f"error: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(error)}, indent=2))
        return 1


def _check_source(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.configmap is not None:
        return
    for option in ("namespace", "kubeconfig", "context"):
        if getattr(args, option) is not None:
            parser.error(f"--{option} applies only with --configmap NAME")
    if args.key != DEFAULT_CONFIGMAP_KEY:
        parser.error("--key applies only with --configmap NAME")


def register(commands: Any) -> None:
    """Add `ztcqrs rollout` and its subcommands to the `ztcqrs` parser."""
    common = argparse.ArgumentParser(add_help=False)
    source = common.add_mutually_exclusive_group()
    source.add_argument(
        "--file", metavar="PATH",
        help="rules file to edit (default: ROUTER_RULES_FILE, else the file of `ztcqrs up`, "
        "else the router's example rules)",
    )
    source.add_argument(
        "--configmap", metavar="NAME",
        help="edit the rules ConfigMap NAME through the Kubernetes API instead of a file (the "
        "chart's is ztcqrs-rules for release ztcqrs)",
    )
    common.add_argument(
        "--namespace", help="namespace of the ConfigMap (default: the kubeconfig context's, "
        "the pod's inside a cluster, else default)",
    )
    common.add_argument(
        "--key", default=DEFAULT_CONFIGMAP_KEY,
        help=f"ConfigMap key that contains the rules (default: {DEFAULT_CONFIGMAP_KEY})",
    )
    common.add_argument(
        "--kubeconfig", metavar="PATH",
        help="kubeconfig file (default: the in-cluster ServiceAccount inside a pod, else "
        "$KUBECONFIG or ~/.kube/config)",
    )
    common.add_argument("--context", help="kubeconfig context (default: its current context)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")

    rollout = commands.add_parser(
        "rollout", help="show or change the share of users on the CQRS side, freeze or roll back"
    )
    actions = rollout.add_subparsers(dest="rollout_command", required=True)

    status = actions.add_parser(
        "status", parents=[common],
        help="print each split's percent, the freeze state and the rules version; exit 1 when "
        "the router would reject the rules",
    )
    status.add_argument(
        "--router-url", metavar="URL",
        help="also print the live guard state from this router's /_gray/status",
    )
    status.add_argument(
        "--token",
        help=f"access token with scope gray:admin for --router-url (default: ${TOKEN_ENV})",
    )
    _set_handler(status, _status)

    set_parser = actions.add_parser(
        "set", parents=[common],
        help="set the percent of users that a split rule sends to its target",
    )
    set_parser.add_argument(
        "--percent", required=True, metavar="N",
        help="share of users from 0 to 100, decimals allowed (such as 12.5)",
    )
    set_parser.add_argument(
        "--rule", metavar="NAME",
        help="split rule to change (required when the rules have more than one split rule)",
    )
    _set_handler(set_parser, _edit)

    for name, text in (
        ("freeze", "send every request to the monolith until unfreeze (sets guard.frozen)"),
        ("unfreeze", "end a freeze and clear an earlier guard trip (sets guard.reset_at to now)"),
        ("rollback", "set every split rule's percent to 0"),
    ):
        _set_handler(actions.add_parser(name, parents=[common], help=text), _edit)


def _set_handler(
    parser: argparse.ArgumentParser, action: Callable[[RulesStore, argparse.Namespace], int]
) -> None:
    def handler(args: argparse.Namespace) -> int:
        _check_source(parser, args)
        return _run(args)

    parser.set_defaults(handler=handler, action=action)
