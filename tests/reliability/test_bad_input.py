"""Bad user input through the API: each mistake is one MiniLoRAError of the right kind, saying what
is wrong; nothing is written and no model is half-changed. The same mistakes through the command
line (one line on stderr, exit code 2) are tests/test_cli.py's ``_mistakes``; docs/reliability.md
holds both in one table, made by ``python -m tests.reliability.bad_input``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from minilora import MiniLoRAError
from tests.reliability import bad_input
from tests.reliability.bad_input import API_CASES

DOCS = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return bad_input.make_workspace(tmp_path_factory.mktemp("bad-input") / "ws")


@pytest.mark.parametrize("case", list(API_CASES))
def test_a_mistake_through_the_api(case, ws):
    """One error of the expected kind, its message naming what is wrong; no file changed."""
    _, _, kind, fragment = API_CASES[case]
    before = bad_input.files_under(ws)
    got, message = bad_input.run_case(case, ws)
    assert issubclass(got, MiniLoRAError) and issubclass(got, kind), (got, message)
    assert fragment in message, message
    assert bad_input.files_under(ws) == before
    assert not (ws / "o-short").exists() and not (ws / "nothing").exists()


def test_a_refused_adapter_or_target_leaves_the_model_as_it_was(ws, monkeypatch):
    from minilora.lora import LoRAConfig, apply_lora, load_lora_state_dict
    from minilora.train import read_checkpoint

    monkeypatch.chdir(ws)
    model = bad_input._rank_4_model()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(MiniLoRAError):
        load_lora_state_dict(model, read_checkpoint("lora").weights)
    with pytest.raises(MiniLoRAError):
        apply_lora(model, LoRAConfig(target_modules=("c_atn",)))
    after = model.state_dict()
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)


def test_the_docs_table_shows_each_api_case_with_its_actual_message(ws):
    text = DOCS.read_text()
    for case in API_CASES:
        row = bad_input.api_row_end(case, *bad_input.run_case(case, ws))
        assert row in text, f"docs/reliability.md: no row for {case}: {row}"


def test_the_docs_table_points_only_at_cli_cases_that_exist():
    from tests import test_cli

    named = set(re.findall(bad_input.CLI_TEST + r"\) `([\w-]+)`", DOCS.read_text()))
    assert named and named <= set(test_cli._mistakes())
