"""nginx run from a config file of our own: the fast upstream, and the reference reverse proxy.

Never the system's nginx service: each instance gets its own prefix folder, config, pid file and
loopback port, runs in the foreground under this process, and is stopped by its pid.
"""

import shutil
import signal
import subprocess
from pathlib import Path

from services.shared.subprocesses import stop_process

from .common import free_port, say

# The upstream's answer to every path but the JWKS: small fixed JSON, so it is never the bottleneck.
UPSTREAM_BODY = '{"orders": [], "served_by": "bench-upstream"}'

_COMMON = """
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    server_tokens off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{servers}
}}
"""

_UPSTREAM_SERVER = """
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location = /.well-known/jwks.json {{
            default_type application/json;
            alias {prefix}/jwks.json;
        }}
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
"""

_PROXY_SERVER = """
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx")
    if found is None:
        raise RuntimeError("nginx is not installed; run `apt-get install nginx`.")
    return found


class Nginx:
    """One nginx master with its workers, on a free loopback port."""

    def __init__(self, name: str, folder: Path, *, workers: int) -> None:
        self.name = name
        self.prefix = folder / name
        self.prefix.mkdir(parents=True, exist_ok=True)
        # nginx workers run as an unprivileged user when started by root; they must read here.
        self.prefix.chmod(0o755)
        self.workers = workers
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self, servers: str) -> Path:
        config = self.prefix / "nginx.conf"
        config.write_text(
            _COMMON.format(workers=self.workers, prefix=self.prefix, servers=servers)
        )
        return config

    def start(self, servers: str) -> None:
        config = self.write_config(servers)
        test = subprocess.run(  # noqa: S603
            [nginx_binary(), "-t", "-q", "-p", str(self.prefix), "-c", str(config)],
            capture_output=True, text=True, check=False,
        )
        if test.returncode != 0:
            raise RuntimeError(f"nginx rejected {config}: {test.stderr.strip()}")
        self.process = subprocess.Popen(  # noqa: S603
            [nginx_binary(), "-p", str(self.prefix), "-c", str(config)],
            stdout=subprocess.DEVNULL, stderr=(self.prefix / "stderr.log").open("wb"),
        )
        say(f"nginx {self.name} started on port {self.port} (pid {self.process.pid})")

    def stop(self) -> None:
        if self.process is None:
            return
        # SIGQUIT is nginx's graceful stop: the master stops its workers.
        stop_process(self.process, 10, stop_signal=signal.SIGQUIT)


def start_upstream(folder: Path, jwks: str, *, workers: int) -> Nginx:
    upstream = Nginx("upstream", folder, workers=workers)
    (upstream.prefix / "jwks.json").write_text(jwks)
    (upstream.prefix / "jwks.json").chmod(0o644)
    upstream.start(
        _UPSTREAM_SERVER.format(port=upstream.port, prefix=upstream.prefix, body=UPSTREAM_BODY)
    )
    return upstream


def start_proxy(folder: Path, upstream: Nginx) -> Nginx:
    proxy = Nginx("proxy", folder, workers=1)
    proxy.start(_PROXY_SERVER.format(port=proxy.port, upstream_port=upstream.port))
    return proxy
