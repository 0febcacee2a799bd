"""``minilora train`` on a Llama directory that transformers wrote (not minilora), then its adapter
in PEFT: the run's exported adapter on transformers' own model gives the run's logits. Skips
without the parity extra."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minilora.train import load_run
from tests.extras import need
from tests.test_cli import _in_this_process, corpus_text
from tests.test_cli_hf import bpe_tokenizer

torch, transformers, peft = need("torch", "transformers", "peft")

pytestmark = pytest.mark.usefixtures("quiet_libraries")


def test_a_run_on_a_transformers_llama_exports_an_adapter_peft_reads_with_the_same_logits(
        tmp_path, capsys, monkeypatch):
    text = corpus_text(800)
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    tokenizer = bpe_tokenizer(text)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=16, intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save(str(tmp_path / "llama" / "tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    for args in (["train", "--data", "corpus.txt", "--init-from", "llama", "--out", "run",
                  "--lora-r", "2", "--block-size", "16", "--max-iters", "2", "--lr", "0.05",
                  "--eval-iters", "1", "--batch-size", "2", "--threads", "1", "--quiet"],
                 ["export", "--model", "run", "--out", "adapter", "--format", "peft"]):
        code, _, err = _in_this_process(args, capsys)
        assert code == 0, err
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    idx = np.random.default_rng(1).integers(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        plain = base(torch.from_numpy(idx)).logits.numpy()
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(
            torch.from_numpy(idx)).logits.numpy()
    ours = load_run(tmp_path / "run").model(idx)[0].data
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(theirs - plain)) > 1e-3  # the adapter trained: a dropped one fails
