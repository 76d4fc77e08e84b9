"""The router's per-client rate limit and the client address behind trusted proxies."""

import ipaddress

from services.router.limits import RateLimiter, forwarded_for_chain


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_burst_then_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(2.0, 3, 100, clock=clock)

    allowed = [limiter.retry_after("198.51.100.1") for _ in range(4)]
    other = limiter.retry_after("198.51.100.2")
    clock.now += 0.5
    refilled = limiter.retry_after("198.51.100.1")

    assert allowed[:3] == [None, None, None]
    assert allowed[3] == 0.5
    assert other is None
    assert refilled is None


def test_rate_limit_forgets_oldest() -> None:
    limiter = RateLimiter(1.0, 1, 2, clock=Clock())
    limiter.retry_after("a")
    limiter.retry_after("b")
    limiter.retry_after("c")

    # "a" was dropped, so it starts again with a full bucket; "c" is still empty.
    assert limiter.retry_after("a") is None
    assert limiter.retry_after("c") is not None


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def test_chain_untrusted_peer() -> None:
    assert forwarded_for_chain(["203.0.113.9"], "198.51.100.7", TRUSTED) == (
        ["198.51.100.7"], "198.51.100.7"
    )


def test_chain_trusted_peer() -> None:
    chain, client = forwarded_for_chain(["203.0.113.9, 10.1.1.1"], "10.0.0.2", TRUSTED)

    assert chain == ["203.0.113.9", "10.1.1.1", "10.0.0.2"]
    assert client == "203.0.113.9"


def test_chain_client_forged_left_part() -> None:
    # The client sent "1.2.3.4"; the proxy appended the address it saw, which is the client.
    chain, client = forwarded_for_chain(["1.2.3.4, 198.51.100.8"], "10.0.0.2", TRUSTED)

    assert chain[-1] == "10.0.0.2"
    assert client == "198.51.100.8"


def test_chain_garbage_entry() -> None:
    _, client = forwarded_for_chain(["not-an-ip, 10.2.2.2"], "10.0.0.2", TRUSTED)

    assert client == "10.2.2.2"


def test_chain_without_peer() -> None:
    assert forwarded_for_chain(["203.0.113.9"], None, TRUSTED) == ([], None)
