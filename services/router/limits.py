"""Per-client limits of the router: the request rate per client address, and which address a
request comes from when trusted proxies stand in front of the router."""

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RateLimiter:
    """Token buckets per client address: `rate` requests per second on average, `burst` at once.

    At most `max_clients` buckets are kept; the least recently used is dropped first, which
    hands a forgotten client a full bucket again. That bounds memory under a flood of addresses.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        max_clients: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        # Client address: (tokens left, time they were counted).
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def retry_after(self, client: str) -> float | None:
        """Take one request from the client's bucket; return None, or seconds until one is free."""
        now = self.clock()
        tokens, counted_at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted_at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.rate


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def is_trusted(address: str | None, trusted: Sequence[IPNetwork]) -> bool:
    if not address or not trusted:
        return False
    parsed = parse_address(address)
    return parsed is not None and any(parsed in network for network in trusted)


def forwarded_for_chain(
    values: Sequence[str], peer: str | None, trusted: Sequence[IPNetwork]
) -> tuple[list[str], str | None]:
    """Return the X-Forwarded-For chain to send upstream and the client's address.

    A peer outside `trusted` is the client, and whatever X-Forwarded-For it sent is dropped. A
    trusted peer's chain is kept and the peer appended; the client is then the rightmost address
    that no trusted proxy added, because every address left of it could be forged by the client.
    """
    if peer is None:
        return [], None
    if not is_trusted(peer, trusted):
        return [peer], peer
    chain = [part.strip() for value in values for part in value.split(",") if part.strip()]
    chain.append(peer)
    client = peer
    for address in reversed(chain):
        if parse_address(address) is None:
            break
        client = address
        if not is_trusted(address, trusted):
            break
    return chain, client
