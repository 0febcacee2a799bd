"""The optional extras the suite can use, and the skip that names the one to install."""

from __future__ import annotations

import pytest

PARITY = 'needs torch, transformers and peft: pip install -e ".[parity]"'
TOKENIZERS = 'needs tokenizers: pip install -e ".[hf]"'


def need(*modules: str):
    """The modules, imported, or a skip naming the extra that installs them (CI installs both,
    and fails if a test skips for one)."""
    reason = TOKENIZERS if modules == ("tokenizers",) else PARITY
    return [pytest.importorskip(m, reason=reason) for m in modules]
