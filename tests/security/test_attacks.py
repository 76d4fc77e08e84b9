"""The attack table: every input here must be stopped by the router with the status given, and
the router's upstreams must not see a request. Token attacks also run against the monolith and
the CQRS service directly, because each service verifies every token itself.

Requests are sent as raw bytes, so what reaches the router is exactly what the table lists.
"""

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from .conftest import (
    Forge,
    RecordingRouter,
    SecurityPlatform,
    b64url_json,
    raw_http,
    request_bytes,
)

ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_JWK = {"kty": "RSA", "n": "sXch", "e": "AQAB"}


@dataclass(frozen=True)
class TokenAttack:
    name: str
    build: Callable[[Forge], str]


def now() -> int:
    return int(time.time())


def tampered_scope(forge: Forge) -> str:
    header, _, signature = forge.token(scope="products:read").split(".")
    return f"{header}.{b64url_json(forge.claims(scope='sync:write gray:admin'))}.{signature}"


TOKEN_ATTACKS = [
    # alg "none" in any spelling, with an empty or a junk signature.
    TokenAttack("alg none, empty signature", lambda f: f.unsigned("none")),
    TokenAttack("alg None, empty signature", lambda f: f.unsigned("None")),
    TokenAttack("alg NONE, empty signature", lambda f: f.unsigned("NONE")),
    TokenAttack("alg nOnE, junk signature", lambda f: f.unsigned("nOnE", "c2lnbmF0dXJl")),
    TokenAttack("alg none, no signature part", lambda f: f.unsigned("none").rstrip(".")),
    TokenAttack("alg missing", lambda f: ".".join(
        [b64url_json({"typ": "at+jwt", "kid": f.kid}), b64url_json(f.claims()), "eA"]
    )),
    # HMAC with our public key as the secret, in each text form an attacker can get it in.
    TokenAttack("HS256 with public key PEM", lambda f: f.hmac_with(f.public_pem())),
    TokenAttack("HS256 with PKCS#1 PEM", lambda f: f.hmac_with(f.public_pkcs1_pem())),
    TokenAttack("HS256 with ssh-rsa key", lambda f: f.hmac_with(f.public_ssh())),
    TokenAttack("HS512 with public key PEM", lambda f: f.hmac_with(f.public_pem(), "HS512")),
    TokenAttack("PS256 signed with our key", lambda f: f.token(algorithm="PS256")),
    # Headers that point the verifier at key material the token chooses.
    TokenAttack("jku header", lambda f: f.token(header={"jku": "http://127.0.0.1:9/jwks"})),
    TokenAttack("x5u header", lambda f: f.token(header={"x5u": "http://127.0.0.1:9/cert"})),
    TokenAttack("embedded jwk header", lambda f: f.token(
        header={"jwk": ATTACKER_JWK}, key=ATTACKER_KEY
    )),
    TokenAttack("x5c header", lambda f: f.token(header={"x5c": ["MIIB"]})),
    TokenAttack("unknown crit header", lambda f: f.token(
        header={"crit": ["exp-ext"], "exp-ext": 1}
    )),
    # Token type.
    TokenAttack("typ JWT", lambda f: f.token(header={"typ": "JWT"})),
    TokenAttack("typ missing", lambda f: f.token(header={"typ": None})),
    TokenAttack("typ id token", lambda f: f.token(header={"typ": "id_token+jwt"})),
    # Issuer.
    TokenAttack("iss empty", lambda f: f.token(iss="")),
    TokenAttack("iss prefix of ours", lambda f: f.token(iss=f.issuer[:-1])),
    TokenAttack("iss ours with a suffix", lambda f: f.token(iss=f.issuer + ".evil.example")),
    TokenAttack("iss another issuer", lambda f: f.token(iss="https://evil.example")),
    TokenAttack("iss missing", lambda f: f.token(iss=None)),
    TokenAttack("iss as a list", lambda f: f.signed_raw(f.header(), f.claims(iss=[f.issuer]))),
    # Audience.
    TokenAttack("aud missing", lambda f: f.token(aud=None)),
    TokenAttack("aud another audience", lambda f: f.token(aud="other-api")),
    TokenAttack("aud list without ours", lambda f: f.token(aud=["other-api", "admin-api"])),
    # Lifetime, beyond the 5 s leeway.
    TokenAttack("expired 60 s ago", lambda f: f.token(iat=now() - 400, exp=now() - 60)),
    TokenAttack("nbf 2 min ahead", lambda f: f.token(nbf=now() + 120)),
    TokenAttack("iat 2 min ahead", lambda f: f.token(iat=now() + 120, nbf=None)),
    TokenAttack("exp missing", lambda f: f.token(exp=None)),
    # Key id: only ever a dictionary key.
    TokenAttack("kid path traversal", lambda f: f.token(header={"kid": "../../../etc/passwd"})),
    TokenAttack("kid SQL injection", lambda f: f.token(header={"kid": "' OR '1'='1' --"})),
    TokenAttack("kid URL", lambda f: f.token(header={"kid": "http://127.0.0.1:9/key"})),
    TokenAttack("kid unknown", lambda f: f.token(header={"kid": uuid.uuid4().hex})),
    TokenAttack("kid missing", lambda f: f.token(header={"kid": None})),
    TokenAttack("kid not a string", lambda f: f.signed_raw(f.header(kid=7), f.claims())),
    TokenAttack("kid of 200 characters", lambda f: f.token(header={"kid": "k" * 200})),
    # Signature and claims.
    TokenAttack("other key, our kid", lambda f: f.token(key=ATTACKER_KEY)),
    TokenAttack("signature stripped", lambda f: f.token().rsplit(".", 1)[0] + "."),
    TokenAttack("scope tampered after signing", tampered_scope),
    TokenAttack("sub missing", lambda f: f.token(sub=None)),
    TokenAttack("jti missing", lambda f: f.token(jti=None)),
    TokenAttack("token over 8 KiB", lambda f: f.token(padding="p" * 6500)),
    TokenAttack("not a JWT", lambda f: "not-a-token"),
]


@dataclass(frozen=True)
class RequestAttack:
    name: str
    status: int
    request: Callable[[str], bytes]  # given a valid bearer header value
    closes: bool = False  # the router must close the connection after its response
    error: str | None = None  # expected `error` code of the JSON body
    extra: dict[str, str] = field(default_factory=dict)


def get(target: str) -> Callable[[str], bytes]:
    return lambda bearer: request_bytes("GET", target, {"Authorization": bearer})


def put(target: str) -> Callable[[str], bytes]:
    return lambda bearer: request_bytes(
        "PUT", target, {"Authorization": bearer, "Content-Length": "2"}, b"{}"
    )


def post(
    headers: dict[str, str], body: bytes, version: str = "HTTP/1.1"
) -> Callable[[str], bytes]:
    def build(bearer: str) -> bytes:
        lines = [f"POST /orders {version}", "Host: router.test", f"Authorization: {bearer}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    return build


REQUEST_ATTACKS = [
    # Paths are decoded and normalised once; /internal is never forwarded.
    RequestAttack("internal route", 404, put("/internal/sync/orders/x"), error="not_found"),
    RequestAttack("encoded dot-dot to internal", 404,
                  put("/orders/%2e%2e/internal/sync/orders/x"), error="not_found"),
    RequestAttack("upper-case encoded dot-dot", 404,
                  put("/orders/%2E%2E/%2E%2E/internal/sync"), error="not_found"),
    RequestAttack("dot-dot and encoded slash", 400,
                  put("/orders/..%2Finternal/sync/orders/x"), error="invalid_path"),
    RequestAttack("encoded slash", 400, get("/orders%2finternal"), error="invalid_path"),
    RequestAttack("double slash to internal", 404, put("//internal/sync/orders/x"),
                  error="not_found"),
    RequestAttack("backslash traversal", 400, get("/orders\\..\\internal\\sync"),
                  error="invalid_path"),
    RequestAttack("encoded backslash", 400, get("/orders/%5c..%5cinternal"),
                  error="invalid_path"),
    RequestAttack("upper-case internal", 404, put("/INTERNAL/sync/orders/x"), error="not_found"),
    RequestAttack("encoded letter in internal", 404, put("/%69nternal/sync/orders/x"),
                  error="not_found"),
    RequestAttack("internal with parameters", 404, put("/internal;v=1/sync/orders/x"),
                  error="not_found"),
    RequestAttack("dot-dot with parameters", 400, put("/orders/..;/internal/sync"),
                  error="invalid_path"),
    RequestAttack("encoded NUL", 400, get("/orders/%00"), error="invalid_path"),
    RequestAttack("overlong UTF-8 dots", 400, get("/orders/%c0%ae%c0%ae/internal"),
                  error="invalid_path"),
    # httptools, uvicorn's parser when installed, keeps only the path of an absolute-form
    # target, so the router matches /internal/sync. Under h11 the whole URL arrives and gets 400.
    RequestAttack("absolute-form target", 404, get("http://evil.example/internal/sync"),
                  error="not_found"),
    # Body framing: smuggling needs two parsers to disagree on where a body ends.
    RequestAttack("Content-Length with Transfer-Encoding", 400,
                  post({"Content-Length": "5", "Transfer-Encoding": "chunked"},
                       b"0\r\n\r\nGET /internal/sync HTTP/1.1\r\n\r\n"), closes=True),
    RequestAttack("bad chunk size", 400,
                  post({"Transfer-Encoding": "chunked"}, b"zz\r\nabc\r\n0\r\n\r\n"),
                  closes=True),
    RequestAttack("chunk longer than its size", 400,
                  post({"Transfer-Encoding": "chunked"}, b"2\r\nabcdef\r\n0\r\n\r\n"),
                  closes=True),
    RequestAttack("Transfer-Encoding xchunked", 400,
                  post({"Transfer-Encoding": "xchunked"}, b"3\r\nabc\r\n0\r\n\r\n"),
                  closes=True),
    RequestAttack("Transfer-Encoding twice", 400,
                  post({"Transfer-Encoding": "chunked, chunked"}, b"3\r\nabc\r\n0\r\n\r\n"),
                  closes=True),
    RequestAttack("two Content-Length values", 400,
                  post({"Content-Length": "3", "X-A": "1\r\nContent-Length: 4"}, b"abcd"),
                  closes=True),
    RequestAttack("chunked in HTTP/1.0", 400,
                  post({"Transfer-Encoding": "chunked"}, b"3\r\nabc\r\n0\r\n\r\n", "HTTP/1.0"),
                  closes=True, error="invalid_request"),
    # Size limits (the attack router allows 4096 body bytes and 12 KiB of headers).
    RequestAttack("body over the limit", 413,
                  post({"Content-Length": "5000"}, b"x" * 5000), error="payload_too_large"),
    RequestAttack("chunked body over the limit", 413,
                  post({"Transfer-Encoding": "chunked"},
                       b"".join([b"800\r\n" + b"y" * 2048 + b"\r\n"] * 3) + b"0\r\n\r\n"),
                  error="payload_too_large"),
    RequestAttack("headers over the limit", 431,
                  lambda bearer: request_bytes(
                      "GET", "/orders", {"Authorization": bearer, "X-Pad": "p" * 13_000},
                      close=False,
                  ), error="headers_too_large", closes=True),
    RequestAttack("two Authorization headers", 401,
                  lambda bearer: request_bytes(
                      "GET", "/orders", {"Authorization": bearer, "authorization": bearer}
                  ), error="invalid_token"),
    RequestAttack("Basic credentials", 401,
                  lambda bearer: request_bytes(
                      "GET", "/orders", {"Authorization": "Basic Ym9iOmRlbW8tcGFzcw=="}
                  ), error="invalid_token"),
    RequestAttack("no credentials", 401, lambda bearer: request_bytes("GET", "/orders", {}),
                  error="invalid_token"),
]


def assert_upstream_untouched(router: RecordingRouter, marks: tuple[int, int]) -> None:
    seen = router.upstream_since(*marks)
    assert seen == [], [f"{r.method} {r.path}" for r in seen]


def marks_of(router: RecordingRouter) -> tuple[int, int]:
    return router.monolith.count(), router.cqrs.count()


@pytest.mark.parametrize("attack", TOKEN_ATTACKS, ids=lambda attack: attack.name)
def test_router_rejects_token(
    attack_router: RecordingRouter, forge: Forge, attack: TokenAttack
) -> None:
    marks = marks_of(attack_router)
    request = request_bytes("GET", "/orders", {"Authorization": f"Bearer {attack.build(forge)}"})

    response = raw_http(attack_router.url, request)

    assert response.status == 401, response.body
    assert response.json()["error"] == "invalid_token"
    assert response.headers["www-authenticate"][0].startswith("Bearer")
    assert response.headers["x-gray-target"] == ["router"]
    assert_upstream_untouched(attack_router, marks)


@pytest.mark.parametrize("service", ["monolith", "cqrs"])
@pytest.mark.parametrize("attack", TOKEN_ATTACKS, ids=lambda attack: attack.name)
def test_service_rejects_token(
    security_platform: SecurityPlatform, forge: Forge, attack: TokenAttack, service: str
) -> None:
    path = "/queries/orders" if service == "cqrs" else "/orders"
    request = request_bytes("GET", path, {"Authorization": f"Bearer {attack.build(forge)}"})

    response = raw_http(security_platform.url(service), request)

    assert response.status == 401, response.body
    assert response.json()["error"] == "invalid_token"


@pytest.mark.parametrize("attack", REQUEST_ATTACKS, ids=lambda attack: attack.name)
def test_router_stops_request(
    attack_router: RecordingRouter, forge: Forge, attack: RequestAttack
) -> None:
    marks = marks_of(attack_router)
    service = forge.token(sub="cqrs-reverse-sync", client_id="cqrs-reverse-sync",
                          username=None, scope="sync:write")

    response = raw_http(attack_router.url, attack.request(f"Bearer {service}"))

    assert response.status == attack.status, response.body
    if attack.error is not None:
        assert response.json()["error"] == attack.error
    if attack.closes:
        assert response.closed, "the connection stayed open after a framing error"
    assert_upstream_untouched(attack_router, marks)


def test_control_request_reaches_upstream(attack_router: RecordingRouter, forge: Forge) -> None:
    """The same router forwards a sound request, so the rejections above are not a dead route."""
    marks = marks_of(attack_router)

    response = raw_http(
        attack_router.url,
        request_bytes("GET", "/orders", {"Authorization": f"Bearer {forge.token()}"}),
    )

    assert response.status == 200, response.body
    assert [r.path for r in attack_router.upstream_since(*marks)] == ["/orders"]


def test_attack_table_size() -> None:
    assert len(TOKEN_ATTACKS) + len(REQUEST_ATTACKS) >= 50
