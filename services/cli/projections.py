"""`ztcqrs projections rebuild`: refill the Redis read model from the CQRS write model.

The projector keeps running; queries see the old read model until the new one replaces it in one
step. `services.cqrs.rebuild` describes how.
"""

import argparse
import asyncio
import logging
import sys
from typing import Any

from services.cqrs.rebuild import RebuildError, rebuild_read_model
from services.cqrs.schema import open_write_model
from services.cqrs.settings import Settings
from services.shared.logs import configure_logging
from services.shared.streams import connect


def _rebuild(args: argparse.Namespace) -> int:
    settings = Settings()
    if not logging.getLogger().handlers:  # a caller that configured logging keeps its own
        configure_logging("ztcqrs-projections", "WARNING")

    async def main() -> int:
        engine = open_write_model(settings)
        client = connect(settings.redis_url)
        try:
            result = await rebuild_read_model(
                engine, client, authority=settings.phase.authority,
                ingest_wait_seconds=args.ingest_wait_seconds,
            )
        except RebuildError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            await client.aclose()
            engine.dispose()
        print(
            f"read model rebuilt in {result.seconds:.2f} s: {result.orders} orders and "
            f"{result.products} products from the write model; {result.keys_switched} keys "
            f"switched in, {result.live_keys_deleted} old keys removed"
        )
        return 0

    return asyncio.run(main())


def register(commands: Any) -> None:
    """Add `ztcqrs projections rebuild` to the `ztcqrs` parser."""
    projections = commands.add_parser("projections", help="manage the Redis read model")
    actions = projections.add_subparsers(dest="projections_command", required=True)
    rebuild = actions.add_parser(
        "rebuild",
        help="rebuild the read model from the write model while the projector runs, then "
        "switch to it atomically",
    )
    rebuild.add_argument(
        "--ingest-wait-seconds", type=float, default=60.0,
        help="maximum seconds to wait for CDC ingest to catch up with the projector (default 60)",
    )
    rebuild.set_defaults(handler=_rebuild)
