"""Whole runs (minilora.train.runs): resume, determinism, metrics, a LoRA run's file, merging."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from minilora.errors import ConfigError, FileFormatError
from minilora.lora import merge_and_unload
from minilora.tensor import no_grad
from minilora.train import load_run, read_checkpoint, runs
from minilora.train.checkpoint import CHECKPOINT, METRICS
from minilora.train.rundir import RunDir
from tests.train.conftest import (
    FINETUNE,
    LORA,
    MODEL,
    PRETRAIN,
    Stop,
    assert_bit_identical,
    stop_at,
    tensors,
)

TIMING = ("elapsed_s", "tokens_per_s")  # the only numbers allowed to differ between two runs


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _pretrain(corpus, out, **kw):
    return runs.pretrain(corpus, out, MODEL, PRETRAIN, quiet=True, threads=1, **kw)


def _lora(base, corpus, out, **kw):
    return runs.finetune(base, corpus, out, FINETUNE, LORA, quiet=True, threads=1, **kw)


def _full(base, corpus, out, **kw):
    return runs.finetune(base, corpus, out, FINETUNE, None, quiet=True, threads=1, **kw)


# ---- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pretrain", "full", "lora"])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(kind, corpus, base_run, tmp_path):
    start = {"pretrain": lambda out, **kw: _pretrain(corpus, out, **kw),
             "full": lambda out, **kw: _full(base_run, corpus, out, **kw),
             "lora": lambda out, **kw: _lora(base_run, corpus, out, **kw)}[kind]
    start(tmp_path / "whole")
    with pytest.raises(Stop):
        start(tmp_path / "stopped", on_eval=stop_at(4))
    assert read_checkpoint(tmp_path / "stopped").meta["iter"] == 4
    result = runs.resume(tmp_path / "stopped", quiet=True, threads=1)

    assert result.iters == FINETUNE.max_iters == PRETRAIN.max_iters
    assert_bit_identical(tensors(tmp_path / "whole"), tensors(tmp_path / "stopped"))
    assert _without_timing(_metrics(tmp_path / "whole")) == \
        _without_timing(_metrics(tmp_path / "stopped"))


def test_the_resume_check_sees_a_dropout_generator_that_is_not_restored(corpus, tmp_path,
                                                                         monkeypatch):
    """The test above can fail: a resume that forgets the dropout masks' generator state (here,
    it restores only the batch and evaluation generators) gives other weights."""
    _pretrain(corpus, tmp_path / "whole")
    with pytest.raises(Stop):
        _pretrain(corpus, tmp_path / "stopped", on_eval=stop_at(4))
    restore = RunDir.restore

    def forgetful_restore(self, model, optimizer, rngs, config):
        state = rngs[2].bit_generator.state
        out = restore(self, model, optimizer, rngs, config)
        rngs[2].bit_generator.state = state
        return out

    monkeypatch.setattr(RunDir, "restore", forgetful_restore)
    runs.resume(tmp_path / "stopped", quiet=True, threads=1)
    whole, resumed = tensors(tmp_path / "whole"), tensors(tmp_path / "stopped")
    assert any(whole[k].tobytes() != resumed[k].tobytes() for k in whole)


def test_resume_with_nothing_to_resume_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        runs.resume(tmp_path / "empty", quiet=True)
    assert not (tmp_path / "empty").exists()


def test_a_finished_run_resumes_to_itself(corpus, tmp_path):
    _pretrain(corpus, tmp_path / "run")
    before = tensors(tmp_path / "run")
    result = runs.resume(tmp_path / "run", quiet=True, threads=1)
    assert np.isnan(result.ms_per_step)  # no step ran
    assert_bit_identical(before, tensors(tmp_path / "run"))


# ---- determinism and metrics -----------------------------------------------------------------
def test_same_seed_gives_bit_identical_runs(corpus, base_run, tmp_path):
    for name in ("a", "b"):
        _lora(base_run, corpus, tmp_path / name)
    assert_bit_identical(tensors(tmp_path / "a"), tensors(tmp_path / "b"))
    assert _without_timing(_metrics(tmp_path / "a")) == _without_timing(_metrics(tmp_path / "b"))


def test_another_seed_gives_another_run(corpus, tmp_path):
    _pretrain(corpus, tmp_path / "a")
    runs.pretrain(corpus, tmp_path / "b", MODEL, dataclasses.replace(PRETRAIN, seed=4),
                  quiet=True, threads=1)
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert all(a[k].tobytes() != b[k].tobytes() for k in a if k.startswith("model."))


def test_metrics_has_one_record_per_evaluation_with_the_documented_fields(corpus, tmp_path):
    result = _pretrain(corpus, tmp_path / "run")
    records = _metrics(tmp_path / "run")
    assert [r["iter"] for r in records] == [0, 4, 8]
    for r in records:
        assert set(r) == {"iter", "train_loss", "val_loss", "lr", "elapsed_s", "tokens_per_s"}
        assert np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) and r["lr"] > 0
    assert records[0]["tokens_per_s"] is None  # nothing trained yet at iteration 0
    assert all(r["tokens_per_s"] > 0 for r in records[1:])
    assert records[-1]["elapsed_s"] >= records[1]["elapsed_s"] > 0
    assert result.history == records
    assert (result.train_loss, result.val_loss) == (records[-1]["train_loss"],
                                                     records[-1]["val_loss"])


# ---- what a LoRA run saves ---------------------------------------------------------------------
def test_a_lora_checkpoint_holds_only_the_adapter_and_its_optimizer_state(corpus, base_run,
                                                                        tmp_path):
    _lora(base_run, corpus, tmp_path / "lora")
    ckpt = read_checkpoint(tmp_path / "lora")
    n_layer = MODEL["n_layer"]
    # "c_proj" names both attn.c_proj and mlp.c_proj, as it does in PEFT on GPT-2
    adapted = ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    expected = {f"transformer.h.{i}.{m}.{ab}" for i in range(n_layer) for m in adapted
                for ab in ("lora_A", "lora_B")}
    assert set(ckpt.weights) == expected
    assert {name.rsplit(".", 1)[0] for name in ckpt.optim_arrays} <= expected
    assert ckpt.meta["kind"] == "lora"
    assert ckpt.meta["lora_config"]["r"] == LORA.r
    assert (tmp_path / "lora" / ckpt.meta["base"]["path"]).resolve() == base_run.resolve()
    base_bytes = (base_run / CHECKPOINT).stat().st_size
    assert (tmp_path / "lora" / CHECKPOINT).stat().st_size < base_bytes


def test_a_lora_run_refuses_a_base_with_other_weights(corpus, base_run, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(base_run, base)
    _lora(base, corpus, tmp_path / "lora")
    load_run(tmp_path / "lora")  # fits
    (base / CHECKPOINT).unlink()
    (base / METRICS).unlink()
    runs.pretrain(corpus, base, MODEL, dataclasses.replace(PRETRAIN, seed=9), quiet=True,
                  threads=1)  # same architecture, other weights
    with pytest.raises(FileFormatError, match="fingerprint"):
        load_run(tmp_path / "lora")
    with pytest.raises(FileFormatError, match="fingerprint"):
        runs.resume(tmp_path / "lora", quiet=True)


def test_a_lora_run_with_its_own_dropout_loads_on_its_base(corpus, base_run, tmp_path):
    runs.finetune(base_run, corpus, tmp_path / "lora", FINETUNE, LORA, dropout=0.2, quiet=True,
                  threads=1)
    run = load_run(tmp_path / "lora")
    assert run.meta["model_config"]["dropout"] == 0.2


def test_a_lora_run_cannot_start_from_a_lora_run(corpus, base_run, tmp_path):
    _lora(base_run, corpus, tmp_path / "lora")
    with pytest.raises(ConfigError, match="merge it first"):
        _lora(tmp_path / "lora", corpus, tmp_path / "lora2")
    assert not (tmp_path / "lora2").exists()


# ---- merging -----------------------------------------------------------------------------------
def test_merged_model_gives_the_unmerged_logits(corpus, base_run, tmp_path):
    _lora(base_run, corpus, tmp_path / "lora")
    model = load_run(tmp_path / "lora").model
    assert any(np.any(p.data) for n, p in model.named_parameters() if n.endswith("lora_B"))
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (3, MODEL["block_size"]))
    with no_grad():
        unmerged = model(idx)[0].data
        merged = merge_and_unload(model)(idx)[0].data
    assert not any("lora" in n for n, _ in model.named_parameters())
    # float32 round-off of W + s B A over in = 16..64 terms: a few ulps of logits of size ~1
    np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-5)


def test_a_run_whose_vocabulary_is_padded_past_its_tokenizer_loads_back(tmp_path):
    """A model with more ids than its tokenizer (nanoGPT pads GPT-2's 50,257 to 50,304; a Hugging
    Face directory may too) saves and loads, and a tokenizer with more ids than the model is
    still refused."""
    from minilora.data import ByteTokenizer, CharTokenizer
    from minilora.models import GPT, GPTConfig
    from minilora.train import write_checkpoint
    from minilora.train.tokenizer_file import tokenizer_entry

    model = GPT(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8), seed=0)
    for name, tokenizer in (("padded", ByteTokenizer()), ("short", CharTokenizer("ab"))):
        (tmp_path / name).mkdir()
        write_checkpoint(tmp_path / name / CHECKPOINT, model,
                         {"tokenizer": tokenizer_entry(tokenizer)[0]})
        assert load_run(tmp_path / name).tokenizer == tokenizer
    small = GPT(GPTConfig(vocab_size=200, block_size=8, n_layer=1, n_head=1, n_embd=8), seed=0)
    (tmp_path / "over").mkdir()
    write_checkpoint(tmp_path / "over" / CHECKPOINT, small,
                     {"tokenizer": tokenizer_entry(ByteTokenizer())[0]})
    with pytest.raises(FileFormatError, match="the tokenizer has 256 tokens, more than the "
                                              "model's vocabulary of 200"):
        load_run(tmp_path / "over")
