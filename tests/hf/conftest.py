"""Prints the worst relative error each parity direction and dtype reached (the issue's figures);
``quiet_libraries`` for the parity tests."""

import warnings

import pytest

from tests.hf.helpers import WORST


@pytest.fixture
def quiet_libraries():
    """transformers and PEFT warn about tiny vocabularies and GPT-2's Conv1D fan_in_fan_out."""
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


def pytest_terminal_summary(terminalreporter):
    if WORST:
        parts = ", ".join(f"{d} {t}: {e:.2e}" for (d, t), e in sorted(WORST.items()))
        terminalreporter.write_line(f"parity figures (worst relative error): {parts}")
