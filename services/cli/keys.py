"""`ztcqrs keys`: rotate the auth server's signing keys and list them.

Both commands work on the key folder of `AUTH_SIGNING_KEY_FILE` (by default
`$ZTCQRS_DATA_DIR/keys/signing-key.pem`), which must be writable; running auth servers pick the
change up within `AUTH_KEYS_RELOAD_SECONDS`.
"""

import argparse
import datetime
import json
import sys
import time
from typing import Any

from services.auth.app import JWKS_MAX_AGE_SECONDS
from services.auth.keys import SigningKeyError, load_key_ring
from services.auth.rotation import rotate_keys
from services.auth.settings import Settings


def register(commands: Any) -> None:
    keys = commands.add_parser("keys", help="rotate or list the auth server's signing keys")
    actions = keys.add_subparsers(dest="keys_command", required=True)

    rotate = actions.add_parser(
        "rotate",
        help="add a signing key; it is published at once and signs after --activate-in seconds",
    )
    rotate.add_argument(
        "--activate-in",
        type=float,
        default=None,
        metavar="SECONDS",
        help=(
            "seconds until the new key starts signing (default: the verifiers' JWKS refresh "
            "interval plus the JWKS cache lifetime and the auth reload interval, so every "
            "verifier has the key before the first token uses it); 0 signs at once"
        ),
    )
    rotate.set_defaults(handler=_rotate)

    listing = actions.add_parser("list", help="print every key with its state as JSON lines")
    listing.set_defaults(handler=_list)


def default_activation_delay(settings: Settings) -> float:
    return settings.jwks_refresh_seconds + JWKS_MAX_AGE_SECONDS + settings.keys_reload_seconds


def _rotate(args: argparse.Namespace) -> int:
    settings = Settings()
    delay = args.activate_in if args.activate_in is not None else default_activation_delay(settings)
    if delay < 0:
        print(f"error: --activate-in must be 0 or more seconds, got {delay:g}.", file=sys.stderr)
        return 2
    try:
        result = rotate_keys(
            settings.resolved_signing_key_file,
            activate_in=delay,
            retention_seconds=settings.key_retention_seconds,
        )
    except (SigningKeyError, OSError) as error:
        print(f"error: the keys were not rotated: {error}", file=sys.stderr)
        return 1
    print(
        json.dumps({
            "kid": result.kid,
            "activates_at": _timestamp(result.activates_at),
            "key_file": str(result.key_file),
            "removed_kids": list(result.removed_kids),
        })
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    settings = Settings()
    try:
        ring = load_key_ring(
            settings.resolved_signing_key_file,
            create_if_missing=False,
            retention_seconds=settings.key_retention_seconds,
        )
    except SigningKeyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    now = time.time()
    active = ring.active_at(now).kid
    published = {key.kid for key in ring.published_at(now)}
    for key in ring.signing_keys:
        kid = key.active.kid
        if kid == active:
            state = "active"
        elif key.activates_at > now:
            state = "scheduled"
        else:
            state = "retired"
        print(
            json.dumps({
                "kid": kid,
                "state": state,
                "published": kid in published,
                "activates_at": _timestamp(key.activates_at),
                "key_file": str(key.active.source),
            })
        )
    for extra in ring.extra_published:
        print(json.dumps({"kid": extra.kid, "state": "public-only", "published": True,
                          "key_file": str(extra.source)}))
    return 0


def _timestamp(moment: float) -> str | None:
    if moment == float("-inf"):
        return None
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat().replace("+00:00", "Z")
