"""Every example in examples/ runs, at its small size, as a user would run it: a subprocess.

The examples are tutorials, and each ends by checking its own claims (asserts on merged outputs,
frozen weights, closed-form gradients, finite differences). Here they run with ``--small`` and
``MINILORA_EXAMPLE_SMALL=1`` in a temporary directory; a failing assert fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.extras import need

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# name -> (extra arguments, what the output must contain, files the run must write)
CASES = {
    "lora_by_hand.py": ([], ["6 LoRA parameters", "1/512", "all checks passed"], []),
    "autograd_tour.py": ([], ["max |autograd - finite difference|", "all checks passed"], []),
    "finetune_gpt.py": (["--out", "adapter"], ["trainable params:", "bit-for-bit unchanged",
                                               "max |merged - unmerged logits|"],
                        ["adapter/adapter.safetensors", "adapter/adapter_config.json"]),
    "rank_sweep.py": (["--out", "sweep"], ["| LoRA r=1 |", "| full fine-tuning |"],
                      ["sweep/rank_sweep.png", "sweep/rank_sweep.md", "sweep/rank_sweep.json"]),
    "subspace_similarity.py": (["--out", "subspace"], ["phi(A2, A8, 1, 1)", "amplification"],
                               ["subspace/subspace_similarity.png",
                                "subspace/subspace_similarity.json"]),
    "merge_no_latency.py": ([], ["max |merged - adapted|", "merged/base"], []),
    "target_budget.py": (["--out", "budget"], ["| {q, v} | 18 |", "one budget, as in Table 5"],
                         ["budget/target_budget.md", "budget/target_budget.json"]),
    "variants.py": (["--out", "variants"], ["| pissa | `init_lora_weights='pissa'` |",
                                            "| loraplus | `loraplus_lr_ratio=16` |",
                                            "| dora | `use_dora=True` |"],
                    ["variants/variants.md", "variants/variants.json"]),
    "gpt2_small_cpu.py": (["--out", "g2"], ["| LoRA r=8 |", "all checks passed"],
                          ["g2/gpt2_small_cpu.md", "g2/gpt2_small_cpu.json"]),
    "llama_budget.py": (["--out", "llama"], ["| q_proj, v_proj | 20 | 2,240 |",
                                             "| all seven | 4 | 2,240 |", "one budget"],
                        ["llama/llama_budget.md", "llama/llama_budget.json"]),
    "llama_from_files.py": (["--out", "adapter"], ["bit-for-bit unchanged",
                                                   "base + saved adapter| = 0.0e+00"],
                            ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]),
}


def test_every_example_has_a_case():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


# name -> the optional modules it imports (the test skips naming their extra without them)
NEEDS = {"llama_from_files.py": ("tokenizers",)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_at_small_size(name, tmp_path):
    args, expected, files = CASES[name]
    need(*NEEDS.get(name, ()))
    env = {**os.environ, "MINILORA_EXAMPLE_SMALL": "1", "MPLBACKEND": "Agg",
           "OPENBLAS_NUM_THREADS": "1"}  # small products: BLAS threads would only contend
    done = subprocess.run([sys.executable, str(EXAMPLES / name), "--small", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    for text in expected:
        assert text in done.stdout, f"{name}: {text!r} not in its output:\n{done.stdout[-3000:]}"
    for file in files:
        assert (tmp_path / file).is_file(), f"{name} did not write {file}"


def test_finetune_gpt_without_out_leaves_nothing_behind(tmp_path):
    """Its adapter goes to a temporary directory, removed at the end (issue 15)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "MINILORA_EXAMPLE_SMALL": "1", "OPENBLAS_NUM_THREADS": "1",
           "TMPDIR": str(scratch)}
    done = subprocess.run([sys.executable, str(EXAMPLES / "finetune_gpt.py"), "--small"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "now removed" in done.stdout
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]
