"""`ztcqrs dlq list|show|replay|drop`: the entries that consumers moved to dead-letter streams.

An entry of `<stream>.dlq` contains the original entry's fields plus `dlq_stream`, `dlq_entry_id`,
`dlq_group`, `dlq_consumer`, `dlq_tries`, `dlq_error` and `dlq_time`. A replay appends the original
fields to the source stream with `replay_group` set to the group that failed, and deletes the
dead-letter entry in the same MULTI/EXEC, so an entry is never both replayed and kept, nor lost.
The other groups on the source stream acknowledge a replayed entry without handling it, so only
the group that failed applies it again.
"""

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from services.shared.logs import configure_logging
from services.shared.names import CDC_STREAM, CQRS_STREAM, DEAD_LETTER_SUFFIX, dead_letter_stream
from services.shared.settings import ServiceSettings
from services.shared.streams import (
    DLQ_FIELD_PREFIX,
    REPLAY_GROUP_FIELD,
    REPLAYED_FROM_FIELD,
    connect,
)

SOURCE_STREAMS = (CDC_STREAM, CQRS_STREAM)
MAX_ERROR_IN_LIST = 80


@dataclass(frozen=True)
class DeadLetter:
    dlq_stream: str
    entry_id: str
    fields: dict[str, str]

    @property
    def source_stream(self) -> str:
        return self.fields.get("dlq_stream") or self.dlq_stream.removesuffix(DEAD_LETTER_SUFFIX)

    @property
    def group(self) -> str:
        return self.fields.get("dlq_group", "")

    def replay_fields(self) -> dict[str, str]:
        """Return the original entry's fields, marked for the group that failed."""
        original = {
            name: value
            for name, value in self.fields.items()
            if not name.startswith(DLQ_FIELD_PREFIX)
            and name not in (REPLAY_GROUP_FIELD, REPLAYED_FROM_FIELD)
        }
        return {
            **original,
            REPLAY_GROUP_FIELD: self.group,
            REPLAYED_FROM_FIELD: f"{self.dlq_stream}/{self.entry_id}",
        }


class AmbiguousId(Exception):
    """An entry id names entries in more than one dead-letter stream."""

    def __init__(self, entry_id: str, matches: list[DeadLetter]) -> None:
        streams = ", ".join(dead.source_stream for dead in matches)
        super().__init__(
            f"Entry id {entry_id} exists in the dead letters of {streams}; choose one with "
            "--stream."
        )


def dead_letter_streams(source: str | None) -> list[str]:
    return [dead_letter_stream(stream) for stream in ((source,) if source else SOURCE_STREAMS)]


async def list_dead_letters(
    client: "redis.Redis", streams: list[str], *, limit: int | None = None
) -> list[DeadLetter]:
    """Return the entries of `streams`, oldest first, at most `limit` per stream."""
    found: list[DeadLetter] = []
    for stream in streams:
        found.extend(_dead_letters(stream, await client.xrange(stream, count=limit)))
    return found


def _dead_letters(stream: str, reply: Any) -> list[DeadLetter]:
    """Convert an XRANGE reply of a client that decodes responses."""
    return [DeadLetter(stream, str(entry_id), dict(fields)) for entry_id, fields in reply or []]


async def find_dead_letters(
    client: "redis.Redis", streams: list[str], entry_id: str
) -> list[DeadLetter]:
    """Return the entries with id `entry_id` in `streams`.

    Entry ids are unique within a stream only, so two dead-letter streams can each contain one.
    """
    found: list[DeadLetter] = []
    for stream in streams:
        found.extend(
            _dead_letters(stream, await client.xrange(stream, min=entry_id, max=entry_id))
        )
    return found


async def replay(client: "redis.Redis", dead: DeadLetter) -> str:
    """Append `dead` to its source stream for its group and delete it; return the new entry id."""
    if not dead.group:
        raise ValueError(
            f"Entry {dead.entry_id} of {dead.dlq_stream} names no dlq_group, so no group would "
            "handle a replay; inspect it with `ztcqrs dlq show` and drop it."
        )
    async with client.pipeline(transaction=True) as pipe:
        pipe.xadd(dead.source_stream, dead.replay_fields())  # type: ignore[arg-type]
        pipe.xdel(dead.dlq_stream, dead.entry_id)
        new_id, _deleted = await pipe.execute()
    return str(new_id)


async def drop(client: "redis.Redis", dead: DeadLetter) -> None:
    await client.xdel(dead.dlq_stream, dead.entry_id)


def _summary(dead: DeadLetter) -> str:
    error = dead.fields.get("dlq_error", "").replace("\n", " ")
    if len(error) > MAX_ERROR_IN_LIST:
        error = error[: MAX_ERROR_IN_LIST - 3] + "..."
    return "  ".join(
        (
            dead.entry_id,
            dead.dlq_stream,
            dead.group or "-",
            f"tries={dead.fields.get('dlq_tries', '?')}",
            dead.fields.get("subject", "-"),
            error,
        )
    )


async def _selected(
    client: "redis.Redis", args: argparse.Namespace
) -> tuple[list[DeadLetter], list[str]]:
    """Return the entries that `args` name, and the ids that no dead-letter stream contains."""
    streams = dead_letter_streams(args.stream)
    if args.all:
        return await list_dead_letters(client, streams), []
    found: list[DeadLetter] = []
    missing: list[str] = []
    for entry_id in args.ids:
        matches = await find_dead_letters(client, streams, entry_id)
        if len(matches) > 1:
            raise AmbiguousId(entry_id, matches)
        if matches:
            found.extend(matches)
        else:
            missing.append(entry_id)
    return found, missing


async def _list(client: "redis.Redis", args: argparse.Namespace) -> int:
    entries = await list_dead_letters(client, dead_letter_streams(args.stream), limit=args.limit)
    for dead in entries:
        print(_summary(dead))
    print(f"dead-lettered entries: {len(entries)}", file=sys.stderr)
    return 0


async def _show(client: "redis.Redis", args: argparse.Namespace) -> int:
    matches = await find_dead_letters(client, dead_letter_streams(args.stream), args.id)
    if len(matches) > 1:
        raise AmbiguousId(args.id, matches)
    if not matches:
        return _report_missing([args.id])
    dead = matches[0]
    document: dict[str, Any] = {"dlq_stream": dead.dlq_stream, "id": dead.entry_id,
                                "fields": dead.fields}
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0


async def _replay(client: "redis.Redis", args: argparse.Namespace) -> int:
    entries, missing = await _selected(client, args)
    for dead in entries:
        new_id = await replay(client, dead)
        print(f"replayed {dead.dlq_stream} {dead.entry_id} to {dead.source_stream} as {new_id} "
              f"for group {dead.group}")
    return _report_missing(missing)


async def _drop(client: "redis.Redis", args: argparse.Namespace) -> int:
    entries, missing = await _selected(client, args)
    for dead in entries:
        await drop(client, dead)
        print(f"dropped {dead.dlq_stream} {dead.entry_id}")
    return _report_missing(missing)


def _report_missing(missing: list[str]) -> int:
    for entry_id in missing:
        print(f"error: no dead-lettered entry {entry_id}; `ztcqrs dlq list` shows the ids.",
              file=sys.stderr)
    return 1 if missing else 0


def _run(args: argparse.Namespace) -> int:
    settings = ServiceSettings()
    if not logging.getLogger().handlers:  # a caller that configured logging keeps its own
        configure_logging("ztcqrs-dlq", "WARNING")

    async def main() -> int:
        client = connect(args.redis_url or settings.redis_url)
        try:
            code: int = await args.action(client, args)
            return code
        except AmbiguousId as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        finally:
            await client.aclose()

    return asyncio.run(main())


def _add_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID", help="dead-letter entry ids")
    parser.add_argument("--all", action="store_true", help="every entry of the selected streams")


def _check_selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if bool(args.ids) == bool(args.all):
        parser.error("name one or more entry ids, or --all")


def register(commands: Any) -> None:
    """Add `ztcqrs dlq` and its subcommands to the `ztcqrs` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--stream", choices=SOURCE_STREAMS,
        help="source stream whose dead letters to use (default: every stream)",
    )
    common.add_argument("--redis-url", help="Redis URL (default: the REDIS_URL setting)")
    dlq = commands.add_parser("dlq", help="inspect, replay or drop dead-lettered stream entries")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)

    list_parser = actions.add_parser(
        "list", parents=[common], help="list dead-lettered entries, oldest first"
    )
    list_parser.add_argument("--limit", type=int, help="at most this many entries per stream")
    list_parser.set_defaults(handler=_run, action=_list)

    show_parser = actions.add_parser(
        "show", parents=[common], help="print one entry with every field as JSON"
    )
    show_parser.add_argument("id", help="dead-letter entry id")
    show_parser.set_defaults(handler=_run, action=_show)

    for name, action, text in (
        ("replay", _replay, "append entries to their source stream again, for the failed group"),
        ("drop", _drop, "delete entries for good"),
    ):
        parser = actions.add_parser(name, parents=[common], help=text)
        _add_selection(parser)

        def handler(args: argparse.Namespace, parser: argparse.ArgumentParser = parser) -> int:
            _check_selection(parser, args)
            return _run(args)

        parser.set_defaults(handler=handler, action=action)
