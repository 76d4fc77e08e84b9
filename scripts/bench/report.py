"""The results table: printed, and written into docs/benchmarks.md between two markers.

Only the part between the markers is replaced, so the hand-written analysis around it stays.
"""

import sys
import time

from .common import QUICK, ROOT, RUNS, Figure

REPORT = ROOT / "docs" / "benchmarks.md"
START = "<!-- bench results: start (written by `make bench`) -->"
END = "<!-- bench results: end -->"


def _verdict(figure: Figure) -> str:
    if figure.holds is None:
        return ""
    return "holds" if figure.holds else "does not hold"


def table(figures: list[Figure]) -> list[str]:
    lines = [
        "| figure | median (min-max) | unit | target | verdict | note |",
        "|---|---|---|---|---|---|",
    ]
    for figure in figures:
        lines.append(
            f"| {figure.name} | {figure.spread()} | {figure.unit} | {figure.target} | "
            f"{_verdict(figure)} | {figure.note} |"
        )
    return lines


def write_report(
    figures: list[Figure], facts: dict[str, str], skipped: list[str], *, duration: float
) -> None:
    command = "BENCH_QUICK=1 make bench" if QUICK else "make bench"
    block = [
        START,
        f"Command: `{command}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{duration / 60:.1f} minutes. Each throughput, latency and lag figure is the median of "
        f"{RUNS} runs, with the smallest and largest run in brackets. Each memory figure is one "
        "reading of the largest resident set of the named process tree.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in facts.items()),
        "",
        *table(figures),
    ]
    if skipped:
        block += ["", "Not measured:", *(f"- {reason}" for reason in skipped)]
    block.append(END)
    held = [figure for figure in figures if figure.holds is True]
    failed = [figure for figure in figures if figure.holds is False]
    print("\n".join(table(figures)))
    if skipped:
        print("\nnot measured:" + "".join(f"\n  {reason}" for reason in skipped))
    print(f"\ntargets: {len(held)} hold, {len(failed)} do not"
          + "".join(f"\n  does not hold: {figure.name}" for figure in failed))
    if QUICK:
        # A quick run is a first look; the page keeps the full run it describes.
        print(f"quick run: {REPORT.relative_to(ROOT)} left unchanged; `make bench` records a run")
        return
    text = REPORT.read_text() if REPORT.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        sys.exit(f"{REPORT} lacks the markers {START!r} and {END!r}; put them back around "
                 "the results.")
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    REPORT.write_text(head + "\n".join(block) + tail)
    print(f"results written to {REPORT.relative_to(ROOT)}")
