"""Entry point of the `ztcqrs` command."""

import argparse
import importlib
import os
import sys

from services.shared.logs import configure_logging

from .processes import SERVICES, WORKERS, run_worker, serve
from .runner import LocalPlatform, PlatformConfig, StartInterrupted, StartupError

WALKTHROUGH = """\
ztcqrs is running. Logs: {logs}/<process>.log   Rules (edit live): {rules}

  router (public API)  {router}
  auth server          {auth}     JWKS: {auth}/.well-known/jwks.json
  monolith             {monolith}
  cqrs service         {cqrs}
  redis                {redis}

Try it (alice is a beta tester and goes to the CQRS side, bob stays on the monolith):

  token() {{ curl -s -d grant_type=password -d username=$1 -d password=demo-pass {auth}/token |
      python3 -c 'import json,sys;r=json.load(sys.stdin);print(r.get("access_token")or sys.exit(r))'
  }}
  ALICE=$(token alice); BOB=$(token bob)
  curl -s -H "Authorization: Bearer $ALICE" {router}/products
  curl -si -H "Authorization: Bearer $ALICE" -H 'Content-Type: application/json' \\
      -d '{{"items": [{{"product_id": "prod-keyboard", "quantity": 1}}]}}' {router}/orders
  curl -si -H "Authorization: Bearer $BOB" -H 'Content-Type: application/json' \\
      -d '{{"items": [{{"product_id": "prod-mouse", "quantity": 2}}]}}' {router}/orders
  curl -s -H "Authorization: Bearer $BOB" {router}/orders

Look at X-Gray-Target in each response. To move more users to the CQRS side, raise `percent` of
the `canary` rule in the rules file (bob moves at 31). The router applies the change without a
restart; an invalid edit keeps the last good rules, and router.log gives the reason.

Press Ctrl-C to stop every process.
"""


def _up() -> int:
    configure_logging("runner", os.environ.get("ZTCQRS_LOG_LEVEL", "INFO"))
    try:
        config = PlatformConfig.from_env(os.environ)
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    platform = LocalPlatform(config)
    platform.stop_on_signals()
    try:
        platform.start()
        print(
            WALKTHROUGH.format(
                logs=config.data_dir / "logs",
                rules=platform.rules_file,
                router=config.url("router"),
                auth=config.url("auth"),
                monolith=config.url("monolith"),
                cqrs=config.url("cqrs"),
                redis=platform.redis_url,
            ),
            flush=True,
        )
        platform.supervise(platform.stop_requested)
    except StartInterrupted:
        return 0
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        platform.stop()
    return 0


def _serve(args: argparse.Namespace) -> int:
    serve(args.service)
    return 0


def _worker(args: argparse.Namespace) -> int:
    run_worker(args.worker)
    return 0


# Modules that add operator subcommands. Each defines `register(commands)`, which adds its parsers
# with `set_defaults(handler=...)`; a handler takes the parsed arguments and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = (
    "services.cli.dlq",
    "services.cli.projections",
    "services.cli.keys",
    "services.cli.reconcile",
    "services.cli.conflicts",
    "services.cli.rollout",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztcqrs", description="Zero-trust gray migration from a monolith to a CQRS service."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the whole platform locally until Ctrl-C").set_defaults(
        handler=lambda _args: _up()
    )
    serve_parser = commands.add_parser("serve", help="run one HTTP service")
    serve_parser.add_argument("service", choices=sorted(SERVICES))
    serve_parser.set_defaults(handler=_serve)
    worker_parser = commands.add_parser("worker", help="run one background worker")
    worker_parser.add_argument("worker", choices=sorted(WORKERS))
    worker_parser.set_defaults(handler=_worker)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


# Commands that run a part of the platform, whose settings come only from their environment.
_PLATFORM_COMMANDS = frozenset({"up", "serve", "worker"})


def _default_to_local_platform() -> None:
    """Point an operator command at the platform `ztcqrs up` would run with this environment.

    Only settings that are not set are filled in, so a deployment's explicit settings win.
    """
    try:
        config = PlatformConfig.from_env(os.environ)
    except StartupError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for name, value in LocalPlatform(config).address_env().items():
        os.environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in _PLATFORM_COMMANDS:
        _default_to_local_platform()
    sys.exit(args.handler(args))
