"""Run the compose stack and check it end to end.

Subcommands:

- `up`: start the stack from images built by `make images`, wait until every container is healthy
  and print the URLs.
- `e2e`: run the end-to-end suite against the running stack, with the URLs read back from Docker.
- `down`: remove the stack's containers and network, and its volumes with `--volumes`.
- `check`: what CI runs, as root. It installs Debian's docker.io, docker-compose and debootstrap
  when dockerd is missing, and starts dockerd when no engine is running. It builds a Debian base
  image with debootstrap (no registry needed), and a Redis image and the four service images on
  it. It starts the stack with Docker-picked loopback ports, runs the e2e suite against it, and
  removes the containers, networks and volumes again. `--remove-images` also removes the images
  it built. A dockerd it started is stopped by its pid.

Only the standard library is used, so `make compose-up` works before `make install`.
"""

# This script exists to run the tools it names (docker, dockerd, apt-get, debootstrap, tar, make),
# found on PATH, with arguments it builds itself.
# ruff: noqa: S603, S607

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Publishes Redis on a loopback port too, so that the e2e suite can read streams and the read model.
CI_COMPOSE_FILE = ROOT / "deploy" / "compose" / "ci.yml"
RULES_DIR = ROOT / "deploy" / "compose" / "rules"
REDIS_DOCKERFILE = ROOT / "deploy" / "compose" / "Dockerfile.redis"

SERVICES = {"auth": 8000, "monolith": 8001, "cqrs": 8002, "router": 8080}
WORKERS = ("cdc-relay", "outbox-relay", "cdc-ingest", "projector", "reverse-sync")
IMAGE_PREFIX = "ztcqrs-"
CI_IMAGE_TAG = "ci"
CI_PROJECT = "ztcqrs-ci"
USER_PROJECT = "ztcqrs"

# The base is Debian 12 because its python3 is 3.11, the version the pinned wheels are built for.
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_IMAGE = f"ztcqrs-ci/python:{DEBIAN_SUITE}"
REDIS_IMAGE = f"ztcqrs-ci/redis:{DEBIAN_SUITE}"
# Folders of the debootstrapped tree that a container never reads.
TRIMMED_PATHS = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
HOST_PACKAGES = ("docker.io", "docker-compose", "debootstrap", "debian-archive-keyring")
EXTRA_CA_DIR = Path("/usr/local/share/ca-certificates")

DOCKERD_START_TIMEOUT_SECONDS = 60
DOCKERD_STOP_TIMEOUT_SECONDS = 30
HEALTHY_TIMEOUT_SECONDS = 180
E2E_TIMEOUT_SECONDS = 900


class CheckFailed(RuntimeError):
    """A step of the compose check failed; the message names the step and where to look."""


def say(message: str) -> None:
    print(f"[compose] {message}", flush=True)


def run(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `command`, raising CheckFailed with its output when it fails and `check` is set."""
    result = subprocess.run(
        list(command),
        env=dict(env) if env is not None else None,
        cwd=ROOT,
        text=True,
        capture_output=capture,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        output = (result.stdout or "") + (result.stderr or "") if capture else ""
        raise CheckFailed(
            f"`{' '.join(command)}` exited with status {result.returncode}. {output.strip()}"
        )
    return result


def succeeds(command: Sequence[str]) -> bool:
    return run(command, capture=True, check=False).returncode == 0


@dataclass
class Compose:
    """One compose project: its command (v2 plugin or v1.29), files and environment."""

    command: list[str]
    project: str
    files: list[Path]
    env: dict[str, str]

    @classmethod
    def detect(cls, project: str, *, ci: bool) -> "Compose":
        configured = os.environ.get("ZTCQRS_COMPOSE")
        if configured:
            command = configured.split()
        elif succeeds(["docker", "compose", "version"]):
            command = ["docker", "compose"]
        elif shutil.which("docker-compose"):
            command = ["docker-compose"]
        else:
            raise CheckFailed(
                "Neither `docker compose` nor `docker-compose` is installed; install one of them "
                "or set ZTCQRS_COMPOSE to the command."
            )
        files = [COMPOSE_FILE, CI_COMPOSE_FILE] if ci else [COMPOSE_FILE]
        return cls(command=command, project=project, files=files, env=dict(os.environ))

    def run(self, *arguments: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
        options = ["--project-name", self.project]
        for path in self.files:
            options += ["--file", str(path)]
        return run([*self.command, *options, *arguments], env=self.env, capture=capture)

    def container(self, service: str) -> str:
        container_id = self.run("ps", "-q", service, capture=True).stdout.strip()
        if not container_id:
            raise CheckFailed(f"Service {service} of project {self.project} has no container.")
        return container_id

    def published(self, service: str, port: int) -> str:
        """Return the host address Docker published for `port` of `service`, as host:port."""
        address = self.run("port", service, str(port), capture=True).stdout.strip()
        if not address or address.endswith(":0"):
            raise CheckFailed(f"Port {port} of service {service} is not published.")
        return address.replace("0.0.0.0:", "127.0.0.1:")


def container_state(container_id: str) -> tuple[str, str | None, int]:
    """Return the status, the health (None without a healthcheck) and the restart count."""
    output = run(["docker", "inspect", container_id], capture=True).stdout
    details = json.loads(output)[0]
    health = details["State"].get("Health")
    return details["State"]["Status"], health["Status"] if health else None, details["RestartCount"]


def wait_until_healthy(compose: Compose, started: float) -> None:
    """Wait until every service is healthy and every worker runs, or raise with their states.

    `started` is the `time.monotonic()` value that the reported start-up time counts from.
    """
    containers = {name: compose.container(name) for name in ("redis", *SERVICES, *WORKERS)}

    while True:
        states = {name: container_state(cid) for name, cid in containers.items()}
        broken = [
            name
            for name, (status, health, restarts) in states.items()
            if status not in ("running", "created") or health == "unhealthy" or restarts > 0
        ]
        if broken:
            raise CheckFailed(f"Containers failed: {describe(states, broken)}.")
        waiting = [
            name
            for name, (status, health, _) in states.items()
            if status != "running" or health not in (None, "healthy")
        ]
        if not waiting:
            break
        if time.monotonic() - started > HEALTHY_TIMEOUT_SECONDS:
            raise CheckFailed(
                f"Containers not healthy after {HEALTHY_TIMEOUT_SECONDS} s: "
                f"{describe(states, waiting)}."
            )
        time.sleep(1)

    healthy = ", ".join(name for name, (_, health, _) in states.items() if health == "healthy")
    running = ", ".join(name for name, (_, health, _) in states.items() if health is None)
    say(
        f"compose stack healthy in {time.monotonic() - started:.1f} s: {healthy} healthy; "
        f"{running} running"
    )


def describe(states: Mapping[str, tuple[str, str | None, int]], names: Sequence[str]) -> str:
    return ", ".join(
        f"{name} ({states[name][0]}, health {states[name][1] or 'none'}, "
        f"{states[name][2]} restarts)"
        for name in names
    )


def service_urls(compose: Compose) -> dict[str, str]:
    return {name: f"http://{compose.published(name, port)}" for name, port in SERVICES.items()}


# Docker engine


@contextmanager
def docker_engine(work_dir: Path) -> Iterator[None]:
    """Use the running Docker engine, or start dockerd and stop it by its pid on exit."""
    if succeeds(["docker", "info"]):
        say("using the Docker engine that is already running")
        yield
        return

    if shutil.which("dockerd") is None:
        raise CheckFailed(
            "dockerd is not installed and no Docker engine is running; install docker.io or start "
            "an engine."
        )
    log_path = work_dir / "dockerd.log"
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            ["dockerd", "--pidfile", str(work_dir / "dockerd.pid")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + DOCKERD_START_TIMEOUT_SECONDS
        while not succeeds(["docker", "info"]):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(
                    f"dockerd (pid {daemon.pid}) did not start within "
                    f"{DOCKERD_START_TIMEOUT_SECONDS} s; see {log_path}:\n{tail(log_path)}"
                )
            time.sleep(0.5)
        say(f"started dockerd (pid {daemon.pid}), log {log_path}")
        yield
    finally:
        stop_dockerd(daemon)


def stop_dockerd(daemon: "subprocess.Popen[bytes]") -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=DOCKERD_STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            say(
                f"dockerd (pid {daemon.pid}) ignored SIGTERM for "
                f"{DOCKERD_STOP_TIMEOUT_SECONDS} s; killing it"
            )
            daemon.kill()
            daemon.wait()
    say(f"stopped dockerd (pid {daemon.pid}), exit status {daemon.returncode}")


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def install_host_packages() -> None:
    tools = ("dockerd", "docker-compose", "debootstrap")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise CheckFailed(
            f"{', '.join(missing)} missing; run as root so that apt-get can install "
            f"{' '.join(HOST_PACKAGES)}, or install them yourself."
        )
    started = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], env=env)
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *HOST_PACKAGES],
        env=env,
        capture=True,
    )
    say(f"installed {' '.join(HOST_PACKAGES)} with apt-get in {time.monotonic() - started:.1f} s")


# Images


def image_exists(name: str) -> bool:
    return succeeds(["docker", "image", "inspect", name])


def image_size_mb(name: str) -> float:
    size = run(["docker", "image", "inspect", "--format", "{{.Size}}", name], capture=True)
    return int(size.stdout.strip()) / 1e6


def build_base_image(work_dir: Path) -> None:
    """Import a minimal Debian tree with python3 as BASE_IMAGE, unless it exists already."""
    if image_exists(BASE_IMAGE):
        say(f"base image {BASE_IMAGE} exists; reusing it")
        return

    started = time.monotonic()
    tree = work_dir / "rootfs"
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            DEBIAN_SUITE,
            str(tree),
            DEBIAN_MIRROR,
        ],
        capture=True,
    )
    for relative in TRIMMED_PATHS:
        shutil.rmtree(tree / relative, ignore_errors=True)
    (tree / "var/lib/apt/lists/partial").mkdir(parents=True)
    (tree / "etc/apt/sources.list").write_text(
        f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
        f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
        f"deb {DEBIAN_SECURITY_MIRROR} {DEBIAN_SUITE}-security main\n"
    )

    archive = subprocess.Popen(["tar", "-C", str(tree), "-c", "."], stdout=subprocess.PIPE)
    try:
        run_import = subprocess.run(
            ["docker", "import", "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE],
            stdin=archive.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        if archive.stdout is not None:
            archive.stdout.close()
        archive.wait()
    shutil.rmtree(tree)
    if run_import.returncode != 0 or archive.returncode != 0:
        raise CheckFailed(f"docker import of the Debian tree failed: {run_import.stderr.strip()}")
    say(
        f"built base image {BASE_IMAGE} ({image_size_mb(BASE_IMAGE):.0f} MB) from Debian "
        f"{DEBIAN_SUITE} with debootstrap in {time.monotonic() - started:.1f} s"
    )


def extra_ca_certificates() -> str:
    """Return the PEM text of the extra CA certificates that the host trusts, or ''."""
    if not EXTRA_CA_DIR.is_dir():
        return ""
    return "".join(path.read_text() for path in sorted(EXTRA_CA_DIR.rglob("*.crt")))


def build_redis_image() -> None:
    started = time.monotonic()
    run(
        [
            "docker",
            "build",
            "--quiet",
            "--tag",
            REDIS_IMAGE,
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "--file",
            str(REDIS_DOCKERFILE),
            str(REDIS_DOCKERFILE.parent),
        ],
        capture=True,
    )
    say(
        f"built image {REDIS_IMAGE} ({image_size_mb(REDIS_IMAGE):.0f} MB) "
        f"in {time.monotonic() - started:.1f} s"
    )


def build_service_images() -> None:
    started = time.monotonic()
    run(
        [
            "make",
            "--no-print-directory",
            "images",
            f"BASE_IMAGE={BASE_IMAGE}",
            f"IMAGE_TAG={CI_IMAGE_TAG}",
        ],
        capture=True,
    )
    for name in SERVICES:
        image = f"{IMAGE_PREFIX}{name}:{CI_IMAGE_TAG}"
        say(f"built image {image} ({image_size_mb(image):.0f} MB)")
    say(f"built the four service images in {time.monotonic() - started:.1f} s")


def remove_images() -> None:
    images = [f"{IMAGE_PREFIX}{name}:{CI_IMAGE_TAG}" for name in SERVICES]
    images += [REDIS_IMAGE, BASE_IMAGE]
    run(["docker", "image", "rm", "--force", *images], capture=True, check=False)
    # The legacy builder keeps the untagged build stages as cache.
    run(["docker", "image", "prune", "--force"], capture=True, check=False)
    say(f"removed images {', '.join(images)} and the untagged build stages")


# Subcommands


def stack_up(compose: Compose) -> dict[str, str]:
    """Start the stack, wait until it is healthy and return the service URLs."""
    started = time.monotonic()
    compose.run("up", "--detach", "--no-build")
    wait_until_healthy(compose, started)
    urls = service_urls(compose)
    for name, url in urls.items():
        say(f"  {name:<9}{url}")
    return urls


def run_e2e(compose: Compose, work_dir: Path, *, pytest_args: Sequence[str]) -> None:
    """Run the e2e suite against the running stack, with every part it can reach."""
    urls = service_urls(compose)
    env = {
        **os.environ,
        "E2E_BASE_URL": urls["router"],
        "E2E_AUTH_URL": urls["auth"],
        "E2E_MONOLITH_URL": urls["monolith"],
        "E2E_CQRS_URL": urls["cqrs"],
    }
    try:
        env["E2E_REDIS_URL"] = f"redis://{compose.published('redis', 6379)}/0"
    except CheckFailed:
        say("Redis is not published; tests that read Redis will skip")
    rules_dir = compose.env.get("ZTCQRS_RULES_DIR")
    if rules_dir:
        env["E2E_RULES_FILE"] = str(Path(rules_dir) / "rules.yaml")

    # The development key, copied so that tests can sign tokens that differ only in their claims.
    key_file = work_dir / "signing-key.pem"
    source = f"{compose.container('auth')}:/data/keys/signing-key.pem"
    if run(["docker", "cp", source, str(key_file)], capture=True, check=False).returncode == 0:
        env["E2E_SIGNING_KEY_FILE"] = str(key_file)
    else:
        say("the auth server has no generated signing key; tests that sign tokens will skip")

    python = ROOT / ".venv" / "bin" / "python"
    command = [
        str(python if python.exists() else sys.executable),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "tests/e2e",
        *pytest_args,
    ]
    say(f"running the e2e suite against {urls['router']}: {' '.join(command)}")
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=ROOT, env=env, timeout=E2E_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise CheckFailed(
            f"The e2e suite did not finish within {E2E_TIMEOUT_SECONDS} s against the stack."
        ) from error
    if result.returncode != 0:
        raise CheckFailed(
            f"The e2e suite failed against the compose stack (status {result.returncode})."
        )
    say(f"e2e suite passed against the compose stack in {time.monotonic() - started:.1f} s")


def stack_down(compose: Compose, *, volumes: bool) -> None:
    arguments = ["down", "--remove-orphans", *(["--volumes"] if volumes else [])]
    compose.run(*arguments, capture=True)
    removed = "containers, networks and volumes" if volumes else "containers and networks"
    say(f"removed the {removed} of project {compose.project}")


def dump_logs(compose: Compose) -> None:
    say("last log lines of every container:")
    compose.run("logs", "--no-color", "--tail", "40")


def check(*, remove_built_images: bool, pytest_args: Sequence[str]) -> None:
    started = time.monotonic()
    install_host_packages()
    with ExitStack() as stack:
        work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ztcqrs-compose-")))
        stack.enter_context(docker_engine(work_dir))
        if remove_built_images:
            stack.callback(remove_images)

        build_base_image(work_dir)
        build_redis_image()
        build_service_images()

        # Rules in a copy, because the reload test edits them.
        rules_dir = work_dir / "rules"
        shutil.copytree(RULES_DIR, rules_dir)
        compose = Compose.detect(CI_PROJECT, ci=True)
        compose.env.update(
            {
                "ZTCQRS_IMAGE_TAG": CI_IMAGE_TAG,
                "ZTCQRS_REDIS_IMAGE": REDIS_IMAGE,
                "ZTCQRS_RULES_DIR": str(rules_dir),
                "ZTCQRS_RULES_POLL_SECONDS": "0.2",
                **{f"ZTCQRS_{name.upper()}_HOST_PORT": "" for name in SERVICES},
            }
        )
        say(f"starting project {compose.project} with {' '.join(compose.command)}")
        # Clear whatever an interrupted earlier run left behind, without reporting it.
        compose.run("down", "--remove-orphans", "--volumes", capture=True)
        stack.callback(stack_down, compose, volumes=True)
        try:
            stack_up(compose)
            run_e2e(compose, work_dir, pytest_args=pytest_args)
        except CheckFailed:
            dump_logs(compose)
            raise
    say(f"compose check passed in {time.monotonic() - started:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the stack and wait until it is healthy")
    commands.add_parser(
        "e2e", help="run the e2e suite against the running stack; other arguments go to pytest"
    )
    down = commands.add_parser("down", help="remove the stack's containers and network")
    down.add_argument("--volumes", action="store_true", help="remove its volumes too")
    check_parser = commands.add_parser(
        "check", help="the CI check, from no Docker to torn down; other arguments go to pytest"
    )
    check_parser.add_argument(
        "--remove-images", action="store_true", help="remove the images it built at the end"
    )
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args and args.command not in ("e2e", "check"):
        parser.error(f"unrecognized arguments: {' '.join(pytest_args)}")

    # SIGTERM unwinds like Ctrl-C, so that the stack and dockerd are still torn down.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    project = os.environ.get("COMPOSE_PROJECT_NAME", USER_PROJECT)
    try:
        if args.command == "check":
            remove = args.remove_images or os.environ.get("ZTCQRS_REMOVE_IMAGES") == "1"
            check(remove_built_images=remove, pytest_args=pytest_args)
        elif args.command == "up":
            stack_up(Compose.detect(project, ci=False))
        elif args.command == "e2e":
            with tempfile.TemporaryDirectory(prefix="ztcqrs-e2e-") as work_dir:
                run_e2e(Compose.detect(project, ci=False), Path(work_dir), pytest_args=pytest_args)
        else:
            stack_down(Compose.detect(project, ci=False), volumes=args.volumes)
    except CheckFailed as error:
        print(f"[compose] error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
