"""``minilora check`` and ``minilora vectors`` as a user runs them: exit code 0 when nothing is
WRONG, 1 when something is, 2 and one line for a usage mistake; ``--json`` for CI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from minilora import hf
from minilora.lora import LoRAConfig
from tests.check.helpers import merge, read_file_tensors, write_model
from tests.check.test_merge import _deltas
from tests.hf.helpers import adapted, random_gpt


def minilora(*args, cwd):
    return subprocess.run([sys.executable, "-m", "minilora.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A base, an adapter, a correct merge and one with h.1's c_attn not merged."""
    root = tmp_path_factory.mktemp("check-cli")
    model = adapted(random_gpt(), LoRAConfig(r=8, lora_alpha=12))
    hf.save_pretrained(random_gpt(), root / "base")
    hf.save_adapter(model, root / "adapter")
    W, deltas = read_file_tensors(root / "base"), _deltas(model)
    write_model(root / "good", root / "base", merge(W, deltas, "bfloat16")[0], "bfloat16")
    broken = {"transformer.h.1.attn.c_attn.weight": "not merged"}
    write_model(root / "bad", root / "base", merge(W, deltas, "float16", broken)[0], "float16")
    np.save(root / "ids.npy", np.arange(8)[None])
    return root


def test_a_correct_merge_exits_0_and_a_wrong_one_1_with_a_json_report(work):
    good = minilora("check", "--base", "base", "--adapter", "adapter", "--merged", "good",
                    cwd=work)
    assert good.returncode == 0, good.stderr
    assert "verdict: OK" in good.stdout and "bfloat16" in good.stdout
    bad = minilora("check", "--base", "base", "--adapter", "adapter", "--merged", "bad",
                   "--json", "bad.json", cwd=work)
    assert bad.returncode == 1 and "verdict: WRONG" in bad.stdout
    line = next(x for x in bad.stdout.splitlines() if x.startswith("transformer.h.1.attn.c_attn"))
    assert "WRONG" in line and "not merged" in line
    report = json.loads((work / "bad.json").read_text())
    assert report["exit_code"] == 1 and report["counts"]["WRONG"] == 1


@pytest.mark.parametrize("args, words", [
    (["--merged", "nowhere"], "nowhere: model directory does not exist"),
    (["--merged", "good", "--input-ids", "ids.npy"], "go with --logits"),
    (["--logits", "ids.npy"], "give the token ids too"),
    ([], "one of the arguments --merged --logits is required"),
    (["--merged", "good", "--logits", "x.npy"], "not allowed with argument"),
])
def test_a_usage_mistake_is_one_line_and_exit_code_2(work, args, words):
    out = minilora("check", "--base", "base", "--adapter", "adapter", *args, cwd=work)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("minilora: error: ")
    assert words in out.stderr


def test_vectors_writes_the_set_once(tmp_path):
    out = minilora("vectors", "--out", "golden", cwd=tmp_path)
    assert out.returncode == 0 and "version 1" in out.stdout
    assert json.loads((tmp_path / "golden" / "manifest.json").read_text())["version"] == 1
    again = minilora("vectors", "--out", "golden", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
