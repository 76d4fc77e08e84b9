"""Pieces every benchmark uses: run statistics, free ports, tools, machine facts and memory."""

import contextlib
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
# Every figure is the median of this many runs, reported with the smallest and largest run.
RUNS = 3


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"Gave up after {timeout:.0f} s waiting for {what}.")
        time.sleep(0.05)


@dataclass
class Figure:
    """One measured quantity over several runs; `target` and `holds` say how it compares."""

    name: str
    unit: str
    runs: list[float] = field(default_factory=list)
    target: str = ""
    holds: bool | None = None  # None: no target, or not measured
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    def spread(self) -> str:
        if not self.runs:
            return "not measured"
        return f"{fmt(self.median)} ({fmt(min(self.runs))}-{fmt(max(self.runs))})"


def fmt(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def percentile(values: Iterable[float], fraction: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ensure_tools(names: dict[str, str]) -> list[str]:
    """Install the Debian packages of the missing commands; return the commands still missing.

    `names` maps a command to its Debian package. apt-get runs only as root, without sudo.
    """
    missing = {command: package for command, package in names.items() if not shutil.which(command)}
    if not missing:
        return []
    if os.geteuid() != 0:
        say(f"missing {sorted(missing)} and not root; install {sorted(set(missing.values()))}")
        return sorted(missing)
    packages = sorted(set(missing.values()))
    say(f"installing {packages} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)  # noqa: S603
        if result.returncode != 0:
            say(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-500:]}")
            break
    return sorted(command for command in missing if not shutil.which(command))


def command_version(command: list[str], pattern: str) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    found = re.search(pattern, result.stdout + result.stderr)
    return found.group(1) if found else "unknown"


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = platform.platform()
    os_release = Path("/etc/os-release")
    if os_release.exists():
        for line in os_release.read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))}, Linux {platform.release()}"
    return {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": os_name,
        "Python": platform.python_version(),
        "nginx": command_version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": command_version(["wrk", "-v"], r"wrk (\S+)"),
    }


def rss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return float("nan")


def process_tree(pid: int) -> list[psutil.Process]:
    """Return a process and its live descendants, or no process when `pid` is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def process_tree_rss(pid: int) -> dict[int, float]:
    """RSS in MiB of a process and each of its descendants, by pid."""
    return {member.pid: rss_mb(member.pid) for member in process_tree(pid)}


def process_tree_cpu_seconds(pid: int) -> float:
    """Return the CPU time, user and system, used so far by a process and its live descendants."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def python() -> str:
    return sys.executable
