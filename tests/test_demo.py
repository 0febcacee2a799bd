"""The main job (minilora.demo) on a tiny plan, and the task score it prints."""

from __future__ import annotations

import json

import pytest

from minilora import cli, demo
from minilora.data import builtin_tokenizer, load_dataset
from minilora.models import GPT, GPTConfig
from minilora.train import read_checkpoint
from minilora.train.checkpoint import CHECKPOINT
from minilora.train.evaluate import task_accuracy

TINY = demo.DemoPlan(model={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 48},
                     pretrain_iters=6, finetune_iters=4, ranks=(1, 2), full_lr=2e-3, lora_lr=5e-3,
                     eval_iters=1, task_prompts=6, batch_size=4, curve_eval_iters=1)


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def test_the_demo_trains_compares_merges_and_saves_everything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "QUICK", TINY)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    text = capsys.readouterr().out

    table = text[text.index("method "):text.index("3/4")].strip().splitlines()
    assert table[0].split() == ["method", "trainable", "params", "val", "loss", "exact", "match",
                                "ms/step", "peak", "MiB"]
    assert [row.split("  ")[0] for row in table[2:]] == [
        "base (no fine-tuning)", "full", "LoRA r=1 (alpha 2)", "LoRA r=2 (alpha 4)"]
    assert "(100.00%)" in table[3] and "nan" not in "\n".join(table)
    assert "the merged model answers 6/6 held-out prompts as the adapter does" in text
    assert "merged/base = " in text and "samples (held-out prompts" in text

    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["rows"]] == ["base", "full", "lora-r1", "lora-r2"]
    base, full, r1, r2 = results["rows"]
    assert full["trainable"] == full["total"] == base["total"]
    assert r1["trainable"] < r2["trainable"] < full["trainable"]
    assert results["merge"]["max_abs_logit_diff"] < 1e-4
    assert results["merge"]["same_answers_as_unmerged"] == TINY.task_prompts
    for name in ("base", "full", "lora-r1", "lora-r2", "merged"):
        assert (out / name / CHECKPOINT).exists()
    assert read_checkpoint(out / "lora-r1").meta["kind"] == "lora"
    assert read_checkpoint(out / "merged").meta["kind"] == "full"
    pytest.importorskip("matplotlib")
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

TINY_LLAMA = demo.DemoPlan(model={"model_type": "llama", "hidden_size": 16,
                                  "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "num_key_value_heads": 2},
                           block_size=48, pretrain_iters=6, finetune_iters=4, ranks=(1, 2),
                           full_lr=2e-3, lora_lr=5e-3, eval_iters=1, task_prompts=6,
                           batch_size=4, curve_eval_iters=1)


def test_the_demo_runs_a_llama_plan_with_lora_on_q_proj_and_v_proj(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "QUICK", TINY_LLAMA)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "pretraining a 1-layer, 16-wide Llama on builtin:world" in text
    assert f"one forward pass of 4x{TINY_LLAMA.block_size} tokens" in text
    results = json.loads((out / "results.json").read_text())
    assert [r["run"] for r in results["rows"]] == ["base", "full", "lora-r1", "lora-r2"]
    base, full, r1, _ = results["rows"]
    assert full["trainable"] == base["total"]
    assert r1["trainable"] == 1 * (16 + 16) + 1 * (16 + 8)  # q_proj (16 -> 16), v_proj (16 -> 8)
    assert results["merge"]["max_abs_logit_diff"] < 1e-4
    lora = read_checkpoint(out / "lora-r1")
    assert lora.model_config.model_type == "llama" and lora.train_config.block_size == 48
    assert lora.lora_config.target_modules == ("q_proj", "v_proj")
    assert read_checkpoint(out / "merged").model_config.model_type == "llama"


def test_the_demo_replaces_its_own_runs_but_nothing_else(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "QUICK", TINY)
    out = tmp_path / "demo"
    (out / "full").mkdir(parents=True)
    (out / "full" / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora: error: demo: ") and "is not a minilora run" in err
    assert (out / "full" / "notes.txt").read_text() == "mine"
    assert not (out / "base" / CHECKPOINT).exists()


def test_task_accuracy_scores_the_held_out_prompts(tokenizer):
    task = load_dataset("builtin:majority", tokenizer=tokenizer).task
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=1, n_head=2,
                          n_embd=16), seed=1)
    score = task_accuracy(model, tokenizer, task, limit=5)
    assert score.total == 5 and 0 <= score.correct <= 5 and len(score.completions) == 5
