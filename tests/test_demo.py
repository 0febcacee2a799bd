"""The main job (minilora.demo) on a tiny plan, and its cached greedy decoding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minilora import cli, demo
from minilora.data import builtin_tokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from minilora.train import read_checkpoint
from minilora.train.checkpoint import CHECKPOINT

TINY = demo.DemoPlan(model={"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 48},
                     pretrain_iters=6, finetune_iters=4, ranks=(1, 2), full_lr=2e-3, lora_lr=5e-3,
                     eval_iters=1, task_prompts=6, batch_size=4, curve_eval_iters=1)


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer()


def _gpt(tokenizer, block_size: int = 48, lora: bool = False) -> GPT:
    """A GPT with weights large enough that its greedy answers are not all alike."""
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2,
                          n_head=2, n_embd=16), seed=1)
    rng = np.random.default_rng(2)
    for _, p in model.named_parameters():
        p.data = (p.data + rng.normal(0, 0.3, p.shape)).astype(np.float32)
    if lora:
        apply_lora(model, LoRAConfig(r=2, lora_alpha=4, target_modules=("c_attn", "c_proj")),
                   rng=0)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.data = rng.normal(0, 0.3, p.shape).astype(np.float32)
    return model


# Two float32 paths to the same logits (cached: one position at a time; uncached: the whole
# sequence) round differently, by a few ulps of logits of size ~1 (see the test below).
LOGIT_ROUND_OFF = 2e-5


def _is_greedy_continuation(model, ids: np.ndarray, tokens: list[int]) -> bool:
    """Whether ``tokens`` continue ``ids`` greedily under the uncached forward pass, up to
    round-off: each token's logit is the largest, or within LOGIT_ROUND_OFF of it. At a tie that
    close another BLAS may choose the other token, so nothing after it is compared."""
    seq = list(ids)
    for token in tokens:
        logits = model(np.array([seq])).data[0, -1]
        best = logits.max()
        if logits[token] < best - LOGIT_ROUND_OFF:
            return False
        if (logits >= best - LOGIT_ROUND_OFF).sum() > 1:
            return True
        seq.append(token)
    return True


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora-unmerged"])
def test_cached_greedy_completions_are_what_generate_gives(tokenizer, lora):
    model = _gpt(tokenizer, lora=lora).eval()
    prompts = ["\nfig cow owl: ", "\nkey: ", "\nplum pear fig cat dog: ", "\ncat: "]
    got = demo.greedy_completions(model, tokenizer, prompts, 9)
    for prompt, completion in zip(prompts, got, strict=True):
        ids = tokenizer.encode(prompt)
        assert _is_greedy_continuation(model, ids, list(tokenizer.encode(completion)))
        # the check can fail: another token in the first position is not greedy
        first = int(model(ids[None]).data[0, -1].argmin())
        assert not _is_greedy_continuation(model, ids, [first])
    assert len(set(got)) > 1  # the check sees something


def test_cached_decoding_gives_the_forward_pass_logits(tokenizer):
    model = _gpt(tokenizer).eval()
    idx = np.random.default_rng(0).integers(0, tokenizer.vocab_size, (3, 20))
    cache = demo._KVCache(model.config.n_layer)
    first = demo._extend(model, idx[:, :12], cache)
    rest = [demo._extend(model, idx[:, t:t + 1], cache) for t in range(12, 20)]
    full = model(idx).data  # (B, T, V)
    # float32 sums taken in another order: a few ulps of logits of size ~1
    np.testing.assert_allclose(first, full[:, 11], rtol=0, atol=2e-5)
    for t, logits in zip(range(12, 20), rest, strict=True):
        np.testing.assert_allclose(logits, full[:, t], rtol=0, atol=2e-5)


def test_stop_ends_a_batch_once_every_prompt_has_said_it(tokenizer):
    model = _gpt(tokenizer)
    full = demo.greedy_completions(model, tokenizer, ["\nab", "\ncd"], 12)
    stopped = demo.greedy_completions(model, tokenizer, ["\nab", "\ncd"], 12, stop=full[0][2])
    assert all(f.startswith(s) for f, s in zip(full, stopped, strict=True))
    assert any(full[0][2] in s for s in stopped)


def test_a_prompt_longer_than_the_cache_window_still_decodes(tokenizer):
    model = _gpt(tokenizer, block_size=16)
    prompt = "\nplum pear fig cat: "  # 19 characters: the window slides
    ids = tokenizer.encode(prompt)
    expected = tokenizer.decode(model.generate(ids[None], 4, temperature=0)[0, len(ids):])
    assert demo.greedy_completions(model, tokenizer, [prompt], 4) == [expected]


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
    score = demo.task_accuracy(_gpt(tokenizer), tokenizer, task, limit=5)
    assert score.total == 5 and 0 <= score.correct <= 5 and len(score.completions) == 5
