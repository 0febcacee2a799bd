"""Prints the worst relative error each parity direction and dtype reached (the issue's figures)."""

from tests.hf.helpers import WORST


def pytest_terminal_summary(terminalreporter):
    if WORST:
        parts = ", ".join(f"{d} {t}: {e:.2e}" for (d, t), e in sorted(WORST.items()))
        terminalreporter.write_line(f"parity figures (worst relative error): {parts}")
