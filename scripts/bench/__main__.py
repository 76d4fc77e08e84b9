"""Run every benchmark, print the table and write docs/benchmarks.md.

Order: tools, one Redis, the nginx upstream and proxy, the router runs (wrk), then the platform
for the sync runs, then memory. Every process started here is stopped by its pid at the end.
"""

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from services.router.settings import available_cpus
from services.shared.embedded_redis import EmbeddedRedis

from . import router as router_bench
from . import sync as sync_bench
from .common import (
    QUICK,
    RUNS,
    Figure,
    ensure_tools,
    free_port,
    machine_facts,
    process_tree_rss,
    say,
)
from .nginx import Nginx, start_proxy, start_upstream
from .report import write_report

# The target is 120 MB (10^6 bytes); RSS is reported in MiB, so the limit is converted.
MEMORY_LIMIT_MIB = 120e6 / 2**20


def _ratio_figure(name: str, target: float, values: list[float]) -> Figure:
    figure = Figure(name, "x nginx", values, target=f">= {target}")
    figure.holds = figure.median >= target
    return figure


def router_figures(
    folder: Path, redis_url: str, memory: dict[str, dict[int, float]]
) -> list[Figure]:
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    key = router_bench.SigningKey()
    tokens = router_bench.write_tokens(key, folder, lifetime=3600)
    probe_token = key.token("bench-probe", 3600)
    wrk = router_bench.Wrk(folder, tokens)
    cores = available_cpus()
    with contextlib.ExitStack() as stack:
        upstream = start_upstream(folder, key.jwks(), workers=cores)
        stack.callback(upstream.stop)
        proxy = start_proxy(folder, upstream)
        stack.callback(proxy.stop)
        routers = {
            "router, 1 process": router_bench.Router(
                folder / "r1", upstream.url, redis_url, processes=1, cache=False),
            "router, 1 process, token cache": router_bench.Router(
                folder / "r1c", upstream.url, redis_url, processes=1, cache=True),
            f"router, {cores} processes": router_bench.Router(
                folder / "rn", upstream.url, redis_url, processes=cores, cache=False),
            f"router, {cores} processes, token cache": router_bench.Router(
                folder / "rnc", upstream.url, redis_url, processes=cores, cache=True),
        }
        for instance in routers.values():
            stack.callback(instance.stop)
            instance.start(probe_token)
        return _router_runs(wrk, upstream, proxy, routers, cores, memory)


def _router_runs(
    wrk: router_bench.Wrk,
    upstream: Nginx,
    proxy: Nginx,
    routers: dict[str, router_bench.Router],
    cores: int,
    memory: dict[str, dict[int, float]],
) -> list[Figure]:
    time.sleep(2)
    for name, instance in routers.items():
        memory[f"{name} (idle)"] = process_tree_rss(instance.pid)
    # Every target gets the same 1,000 tokens in turn, one per simulated client. With the token
    # cache on, each token is verified with RS256 once per process (in the warm-up) and then found
    # in the cache, as a client's short-lived token is on every request it makes; revocation and the
    # JWKS's age are still checked per request. With the cache off every request pays RS256.
    targets = {
        "direct to upstream": upstream.url,
        "nginx proxy, 1 worker": proxy.url,
        **{name: instance.url for name, instance in routers.items()},
    }
    say("warming up every target")
    for url in targets.values():
        wrk.run(url, mode="rotate", seconds=router_bench.WARMUP_SECONDS)
    throughput: dict[str, list[float]] = {name: [] for name in targets}
    errors: dict[str, int] = dict.fromkeys(targets, 0)
    for round_number in range(RUNS):
        for name, url in targets.items():
            result = wrk.run(url, mode="rotate", seconds=router_bench.DURATION_SECONDS)
            throughput[name].append(result.requests_per_second)
            errors[name] += result.errors
            say(f"round {round_number + 1} {name}: {result.requests_per_second:,.0f} req/s")
    figures = []
    for name, values in throughput.items():
        figure = Figure(f"throughput: {name}", "req/s", values)
        if errors[name]:
            figure.note = f"{errors[name]} errors or non-2xx answers"
        figures.append(figure)
    nginx = throughput["nginx proxy, 1 worker"]
    many_name = f"router, {cores} processes, token cache"

    def ratios(name: str) -> list[float]:
        return [r / n for r, n in zip(throughput[name], nginx, strict=True)]

    figures += [
        _ratio_figure("router, 1 process / nginx (1,000 tokens, token cache)", 0.15,
                      ratios("router, 1 process, token cache")),
        _ratio_figure(f"router, {cores} processes (default) / nginx (1,000 tokens, token cache)",
                      0.25, ratios(many_name)),
        Figure("worst case: router, 1 process / nginx (RS256 on every request)", "x nginx",
               ratios("router, 1 process")),
        Figure(f"worst case: router, {cores} processes / nginx (RS256 on every request)",
               "x nginx", ratios(f"router, {cores} processes")),
    ]

    rate = statistics.median(throughput[many_name]) / 2
    say(f"latency at {rate:,.0f} req/s (half the maximum of {many_name})")
    many_router = routers[many_name]
    direct_p50, direct_p99, routed_p50, routed_p99, added, achieved = [], [], [], [], [], []
    for _ in range(RUNS):
        direct = wrk.run(upstream.url, mode="rotate", seconds=router_bench.DURATION_SECONDS,
                         rate=rate)
        routed = wrk.run(many_router.url, mode="rotate",
                         seconds=router_bench.DURATION_SECONDS, rate=rate)
        direct_p50.append(direct.p50_ms)
        direct_p99.append(direct.p99_ms)
        routed_p50.append(routed.p50_ms)
        routed_p99.append(routed.p99_ms)
        added.append(routed.p99_ms - direct.p99_ms)
        achieved.append(routed.requests_per_second)
    figures += [
        Figure("latency rate reached through the router", "req/s", achieved,
               note=f"asked {rate:,.0f} req/s"),
        Figure("latency p50, direct", "ms", direct_p50),
        Figure("latency p99, direct", "ms", direct_p99),
        Figure("latency p50, through the router", "ms", routed_p50),
        Figure("latency p99, through the router", "ms", routed_p99),
    ]
    added_figure = Figure("added p99 latency of the router", "ms", added, target="<= 3")
    added_figure.holds = added_figure.median <= 3
    figures.append(added_figure)
    for name, instance in routers.items():
        memory[f"{name} (after load)"] = process_tree_rss(instance.pid)
    return figures


def _lag_figures(label: str, runs: list[sync_bench.LagRun], p50_target: float | None,
                 p99_target: float, rate: float) -> list[Figure]:
    figures = []
    if p50_target is not None:
        p50 = Figure(f"{label} p50", "ms", [run.p50 for run in runs], target=f"<= {p50_target:g}")
        p50.holds = p50.median <= p50_target
        figures.append(p50)
    p99 = Figure(f"{label} p99", "ms", [run.p99 for run in runs], target=f"<= {p99_target:g}")
    p99.holds = p99.median <= p99_target
    missing = sum(run.missing for run in runs)
    if missing:
        p99.holds = False
        p99.note = f"{missing} changes never arrived within {sync_bench.DRAIN_SECONDS:.0f} s"
    rates = Figure(f"{label} rate sent", "/s", [run.achieved_rate for run in runs])
    # A run that could not send at its rate measured a lighter load, so its latencies are not
    # comparable with the others.
    slow = [run.achieved_rate for run in runs if run.achieved_rate < 0.95 * rate]
    if slow:
        rates.note = (f"{len(slow)} of {len(runs)} runs sent below 95 % of {rate:g}/s; the "
                      "machine was busy, so run again on a quiet one")
    cpu = Figure(f"{label} platform CPU per change", "ms",
                 [run.cpu_ms_per_change for run in runs])
    figures += [p99, rates, cpu]
    return figures


def sync_figures(
    folder: Path, redis_url: str, memory: dict[str, dict[int, float]]
) -> list[Figure]:
    platform = sync_bench.start_platform(folder, redis_url)
    try:
        time.sleep(3)
        for name, process in platform.processes.items():
            if process.popen is not None:
                memory[f"{name} (idle)"] = process_tree_rss(process.popen.pid)
        watch = sync_bench.ReadModelWatch(redis_url)
        lag_runs = []
        try:
            for number in range(RUNS):
                run = sync_bench.commit_to_read_model(platform, watch)
                say(f"commit -> read model run {number + 1}: p50 {run.p50:.1f} ms, "
                    f"p99 {run.p99:.1f} ms, {run.achieved_rate:.0f}/s, missing {run.missing}, "
                    f"CPU {run.cpu_ms_per_change:.2f} ms a change")
                lag_runs.append(run)
        finally:
            watch.close()
        command_runs = []
        for number in range(RUNS):
            run = sync_bench.command_to_monolith(platform)
            say(f"command -> monolith run {number + 1}: p50 {run.p50:.1f} ms, "
                f"p99 {run.p99:.1f} ms, {run.achieved_rate:.0f}/s, missing {run.missing}, "
                f"CPU {run.cpu_ms_per_change:.2f} ms a command")
            command_runs.append(run)
        write_rates, read_rates, missing = [], [], 0
        for number in range(RUNS):
            write_rate, read_rate, lost = sync_bench.bulk_throughput(platform, redis_url)
            say(f"bulk run {number + 1}: write model {write_rate:,.0f}/s, "
                f"read model {read_rate:,.0f}/s, missing {lost}")
            write_rates.append(write_rate)
            read_rates.append(read_rate)
            missing += lost
        for name, process in platform.processes.items():
            if process.popen is not None:
                memory[f"{name} (after load)"] = process_tree_rss(process.popen.pid)
    finally:
        platform.stop()
    figures = _lag_figures(
        f"monolith commit -> read model at {sync_bench.LAG_RATE}/s for {sync_bench.LAG_SECONDS} s",
        lag_runs, 10, 50, sync_bench.LAG_RATE)
    figures += _lag_figures(
        f"CQRS command -> monolith row at {sync_bench.COMMAND_RATE}/s", command_runs, None, 100,
        sync_bench.COMMAND_RATE)
    write = Figure(f"throughput {sync_bench.BULK_ORDERS:,} changes -> CQRS write model",
                   "changes/s", write_rates)
    read = Figure(f"throughput {sync_bench.BULK_ORDERS:,} changes -> write and read model",
                  "changes/s", [min(w, r) for w, r in zip(write_rates, read_rates, strict=True)],
                  target=">= 3000")
    read.holds = read.median >= 3000 and not missing
    if missing:
        read.note = f"{missing} changes missing after the drain"
    return [*figures, write, read]


def memory_figures(memory: dict[str, dict[int, float]]) -> list[Figure]:
    figures = []
    for name, tree in memory.items():
        if not tree:
            continue
        largest = max(tree.values())
        figure = Figure(
            f"RSS {name}", "MiB", [largest], target=f"< {MEMORY_LIMIT_MIB:.1f} (120 MB) each"
        )
        figure.holds = largest < MEMORY_LIMIT_MIB
        if len(tree) > 1:
            figure.note = "largest of " + ", ".join(f"{value:.0f}" for value in tree.values())
        figures.append(figure)
    return figures


def main() -> None:
    started = time.time()
    say(f"mode: {'quick (BENCH_QUICK=1)' if QUICK else 'full'}")
    missing = ensure_tools({"nginx": "nginx", "wrk": "wrk"})
    folder = Path(tempfile.mkdtemp(prefix="ztcqrs-bench-"))
    folder.chmod(0o755)
    redis_server = EmbeddedRedis(folder / "redis", free_port())
    redis_server.start()
    memory: dict[str, dict[int, float]] = {}
    figures: list[Figure] = []
    skipped: list[str] = []
    try:
        if missing:
            skipped.append(f"router runs: {', '.join(missing)} could not be installed")
        elif os.environ.get("BENCH_SKIP_ROUTER"):
            skipped.append("router runs: BENCH_SKIP_ROUTER is set")
        else:
            figures += router_figures(folder / "router", redis_url=redis_server.url,
                                      memory=memory)
        if os.environ.get("BENCH_SKIP_SYNC"):
            skipped.append("sync runs: BENCH_SKIP_SYNC is set")
        else:
            figures += sync_figures(folder / "platform", redis_server.url, memory)
        figures += memory_figures(memory)
        facts = machine_facts()
        facts["Redis"] = redis_server_version(redis_server.url)
        write_report(figures, facts, skipped, duration=time.time() - started)
    finally:
        redis_server.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(folder, ignore_errors=True)
    say(f"done in {time.time() - started:.0f} s")


def redis_server_version(url: str) -> str:
    import redis

    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


if __name__ == "__main__":
    main()
