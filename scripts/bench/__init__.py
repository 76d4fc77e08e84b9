"""`make bench`: throughput, latency, sync lag and memory of the platform on this machine.

Run from the repository root with `.venv/bin/python -m scripts.bench`; `BENCH_QUICK=1` runs every
measurement shorter (about two minutes instead of ten). It prints a table of the figures against
their targets and writes docs/benchmarks.md. See `scripts/bench/__main__.py` for the order of the
runs and docs/benchmarks.md for what each figure means.
"""
