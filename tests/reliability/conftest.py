"""The figures docs/reliability.md quotes, counted while the tests run and printed at the end:
how many damaged or hostile files were tried, and how many kills the crash tests survived."""

from __future__ import annotations

from collections import Counter

COUNTS: Counter = Counter()


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(COUNTS.items()))
        terminalreporter.write_line(f"reliability figures: {parts}")
