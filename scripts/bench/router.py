"""Router throughput and added latency against nginx, on one fast upstream.

The same nginx upstream answers the direct runs, the nginx reverse proxy and the router. The
router verifies RS256 tokens signed by a key of our own, whose JWKS that upstream serves, checks
revocation against a real Redis, evaluates a rules file with a split rule and forwards. wrk sends
`GET /orders` with a bearer token; a Lua script sends the next of 1,000 distinct tokens on every
request ("rotate", what the benchmark uses), or keeps one token per wrk thread ("fixed").
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from services.cli.runner import ManagedProcess

from .common import QUICK, free_port, python, wait_until

ISSUER = "http://bench-issuer.test"
AUDIENCE = "ztcqrs-api"
TOKENS = 1_000
WRK_THREADS = 2
WRK_CONNECTIONS = 32
DURATION_SECONDS = 2 if QUICK else 10
WARMUP_SECONDS = 1

RULES = """\
version: 1
salt: "bench"
split_key_header: "X-Client-ID"
default_target: monolith
rules:
  - name: beta-testers
    match:
      claims:
        beta_tester: true
    target: cqrs
  - name: bench-split
    match:
      paths: ["/orders", "/orders/**", "/products", "/products/**"]
    split:
      target: cqrs
      percent: 50
    otherwise: monolith
    fallback: monolith
  - name: default
    target: monolith
"""

# wrk's Lua: init gets the script arguments (tokens file, "rotate" or "fixed").
_WRK_SCRIPT = """\
local tokens, index, mode, threads = {}, 1, "rotate", 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end
function init(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  mode = args[2]
  index = (thread_number * 7919) % #tokens + 1
end
function request()
  if mode == "rotate" then index = index % #tokens + 1 end
  return wrk.format("GET", "/orders", {["Authorization"] = "Bearer " .. tokens[index]})
end
"""
# The same with a pause before each request, which sets the rate: `connections / pause`. Each
# pause is drawn uniformly from 0 to twice the mean, so the 32 connections do not send in
# lockstep bursts (which a fixed pause keeps them in): the arrivals resemble independent clients.
_WRK_PACED_SCRIPT = _WRK_SCRIPT + """\
local pause = tonumber(os.getenv("BENCH_PAUSE_MS") or "0")
local seeded = false
function delay()
  if not seeded then math.randomseed(os.time() + thread_number); seeded = true end
  -- wrk takes whole milliseconds; rounding a uniform draw keeps a fractional mean.
  return math.floor(math.random() * 2 * pause + 0.5)
end
"""


class SigningKey:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex

    def jwks(self) -> str:
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return json.dumps({"keys": [jwk]})

    def token(self, subject: str, lifetime: int) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": subject, "username": subject,
            "client_id": "ztcqrs-web", "scope": "orders:read orders:write products:read",
            "iat": now, "nbf": now, "exp": now + lifetime, "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"typ": "at+jwt",
                                                                      "kid": self.kid})


@dataclass
class WrkResult:
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors plus non-2xx responses
    requests: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(text: str, label: str) -> float:
    found = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    return float(found.group(1)) * _UNITS[found.group(2)] if found else float("nan")


def parse_wrk(text: str) -> WrkResult:
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if socket_errors:
        errors += sum(int(value) for value in socket_errors.groups())
    if rate is None or total is None:
        raise RuntimeError(f"wrk printed no result:\n{text}")
    return WrkResult(
        float(rate.group(1)), _latency_ms(text, "50"), _latency_ms(text, "99"), errors,
        int(total.group(1)),
    )


class Wrk:
    def __init__(self, folder: Path, tokens_file: Path) -> None:
        self.folder = folder
        self.tokens_file = tokens_file
        self.script = folder / "tokens.lua"
        self.script.write_text(_WRK_SCRIPT)
        self.paced_script = folder / "tokens-paced.lua"
        self.paced_script.write_text(_WRK_PACED_SCRIPT)

    def run(
        self, url: str, *, mode: str, seconds: float, rate: float | None = None
    ) -> WrkResult:
        """Run wrk against `url`; with `rate`, each connection pauses so the total is about it.

        A connection sends its next request only after the response and the pause. So a first
        one-second run measures how long the responses add, and the pause is shortened by that.
        """
        if rate is None:
            return self._run(url, mode, seconds, None)
        pause = WRK_CONNECTIONS * 1000 / rate
        trial = self._run(url, mode, 1, pause)
        answer_ms = WRK_CONNECTIONS * 1000 / max(trial.requests_per_second, 1.0) - pause
        return self._run(url, mode, seconds, max(0.0, pause - max(0.0, answer_ms)))

    def _run(self, url: str, mode: str, seconds: float, pause_ms: float | None) -> WrkResult:
        env = dict(os.environ)
        script = self.script
        if pause_ms is not None:
            env["BENCH_PAUSE_MS"] = f"{pause_ms:.3f}"
            script = self.paced_script
        command = [
            shutil.which("wrk") or "wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}",
            f"-d{max(1, round(seconds))}s",
            "--latency", "-s", str(script), f"{url}/orders", "--", str(self.tokens_file), mode,
        ]
        result = subprocess.run(  # noqa: S603
            command, capture_output=True, text=True, env=env, check=False, timeout=seconds + 60
        )
        if result.returncode != 0:
            raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip()}")
        return parse_wrk(result.stdout)


class Router:
    """A `ztcqrs serve router` process in front of the bench upstream."""

    def __init__(
        self, folder: Path, upstream_url: str, redis_url: str, *, processes: int, cache: bool
    ) -> None:
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        rules = folder / "rules.yaml"
        rules.write_text(RULES)
        self.env = {
            **os.environ,
            "ZTCQRS_DATA_DIR": str(folder),
            "REDIS_URL": redis_url,
            "ZTCQRS_TOKEN_ISSUER": ISSUER,
            "ZTCQRS_TOKEN_AUDIENCE": AUDIENCE,
            "ZTCQRS_JWKS_URL": f"{upstream_url}/.well-known/jwks.json",
            "ROUTER_HOST": "127.0.0.1",
            "ROUTER_PORT": str(self.port),
            "ROUTER_MONOLITH_URL": upstream_url,
            "ROUTER_CQRS_URL": upstream_url,
            "ROUTER_RULES_FILE": str(rules),
            "ROUTER_RATE_LIMIT_PER_SECOND": "0",
            "ROUTER_PROCESSES": str(processes),
            "PYTHONUNBUFFERED": "1",
        }
        if not cache:
            self.env["ROUTER_TOKEN_CACHE_SIZE"] = "0"  # noqa: S105 - a size
        name = f"router-p{processes}-{'cache' if cache else 'nocache'}"
        self.process = ManagedProcess(
            name, [python(), "-m", "services.cli", "serve", "router"], self.env,
            folder / f"{name}.log", f"{self.url}/readyz",
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process.popen is not None
        return self.process.popen.pid

    def start(self, token: str) -> None:
        self.process.start()

        def ready() -> bool:
            if not self.process.alive:
                raise RuntimeError(f"the router exited:\n{self.process.log_tail()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=60, what="the router to be ready")
        # One real request proves that the token verifies and the split rule runs.
        response = httpx.get(
            f"{self.url}/orders", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        if response.status_code != 200 or response.headers.get("x-gray-rule") != "bench-split":
            raise RuntimeError(
                f"the router answered {response.status_code} with rule "
                f"{response.headers.get('x-gray-rule')!r}: {response.text[:300]}"
            )

    def stop(self) -> None:
        self.process.stop()


def write_tokens(key: SigningKey, folder: Path, lifetime: int) -> Path:
    """Sign TOKENS tokens for distinct users; they outlive the whole benchmark."""
    path = folder / "tokens.txt"
    path.write_text("\n".join(key.token(f"bench-user-{index}", lifetime)
                              for index in range(TOKENS)) + "\n")
    return path


if __name__ == "__main__":
    sys.exit("Run `python -m scripts.bench`.")
