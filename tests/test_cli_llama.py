"""The command line on Llama and Qwen2 directories, end to end, with files made here: tiny random
models written by minilora's own ``save_pretrained`` (grouped-query attention, Llama untied,
Qwen2 tied with its q, k, v biases) beside a byte-level BPE trained on the test's text. LoRA on
q_proj and v_proj by default, resume, export to PEFT and Hugging Face, merge, generate and eval,
and the mistakes a Llama brings (no block size of its own, no dropout). Needs ``tokenizers``,
not torch; the same against transformers and PEFT is tests/hf/test_llama_train.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from minilora import LlamaForCausalLM, hf
from minilora.models import LlamaConfig
from minilora.train import load_run, read_checkpoint
from tests.test_cli import FINETUNE, Work, _in_this_process, corpus_text, minilora, ok
from tests.test_cli_hf import GREEDY, bpe_tokenizer

BLOCK = ["--block-size", "16"]
EVAL = ["--data", "corpus.txt", "--eval-iters", "2", "--batch-size", "4", "--threads", "1"]
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama_dir(directory, tokenizer, model_type: str) -> None:
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=16,
                         intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=model_type == "qwen2", model_type=model_type)
    LlamaForCausalLM(config, seed=3).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def lw(tmp_path_factory) -> Work:
    """Llama and Qwen2 directories, LoRA and full runs on them, their exports and merges."""
    w = Work(tmp_path_factory.mktemp("cli-llama"))
    text = corpus_text(800)
    (w / "corpus.txt").write_text(text, encoding="utf-8")
    tokenizer = bpe_tokenizer(text)
    for kind in ("llama", "qwen2"):
        _llama_dir(w / kind, tokenizer, kind)
    w.outputs["lora"] = ok(minilora("train", "--data", "corpus.txt", "--init-from", "llama",
                                    "--out", "lora", "--lora-r", "2", *BLOCK, *FINETUNE, cwd=w))
    w.outputs["qwen-full"] = ok(minilora("train", "--data", "corpus.txt", "--init-from", "qwen2",
                                         "--out", "qwen-full", *BLOCK, *FINETUNE, cwd=w))
    w.outputs["peft"] = ok(minilora("export", "--model", "lora", "--out", "lora-peft",
                                    "--format", "peft", cwd=w))
    w.outputs["hf"] = ok(minilora("export", "--model", "qwen-full", "--out", "qwen-hf",
                                  "--format", "hf", cwd=w))
    w.outputs["merge"] = ok(minilora("merge", "--model", "lora", "--out", "merged-hf",
                                     "--format", "hf", cwd=w))
    return w


def test_lora_on_a_llama_adapts_q_proj_and_v_proj_by_default(lw):
    first = lw.outputs["lora"].splitlines()[0]
    assert first.startswith("fine-tuning llama with LoRA r=2, alpha 4 on q_proj, v_proj (llama, "
                            "2 layers x 16 (4 heads, 2 key/value), float32")
    ckpt = read_checkpoint(lw / "lora")
    assert ckpt.lora_config.target_modules == ("q_proj", "v_proj")
    assert ckpt.train_config.block_size == 16 and ckpt.model_config.model_type == "llama"
    layers = sorted({k.rsplit(".", 1)[0] for k in ckpt.weights})
    assert layers == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj",
                                                                                 "v_proj")]


def test_lora_targets_name_llama_modules(lw):
    for roles, expected in (("q,v", ("q_proj", "v_proj")), ("all", SEVEN)):
        out = f"roles-{roles.replace(',', '')}"
        ok(minilora("train", "--data", "corpus.txt", "--init-from", "llama", "--out", out,
                    "--lora-r", "1", "--lora-targets", roles, "--max-iters", "1",
                    "--eval-iters", "1", "--batch-size", "2", "--quiet", *BLOCK, cwd=lw))
        assert read_checkpoint(lw / out).lora_config.target_modules == expected


def test_a_resumed_llama_run_equals_one_never_interrupted(lw):
    args = ["--data", "corpus.txt", "--init-from", "qwen2", "--lora-r", "2", "--lr-decay-iters",
            "8", "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "2", "--quiet",
            "--threads", "1", *BLOCK]
    ok(minilora("train", *args, "--out", "whole", "--max-iters", "8", cwd=lw))
    ok(minilora("train", *args, "--out", "halves", "--max-iters", "4", cwd=lw))
    ok(minilora("train", "--out", "halves", "--resume", "--max-iters", "8", "--quiet", cwd=lw))
    whole, halves = read_checkpoint(lw / "whole"), read_checkpoint(lw / "halves")
    assert whole.weights.keys() == halves.weights.keys()
    for name, value in whole.weights.items():
        np.testing.assert_array_equal(value, halves.weights[name], err_msg=name)


def test_the_exported_adapter_generates_and_evaluates_as_the_run(lw):
    config = json.loads((lw / "lora-peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["r"] == 2
    run = ok(minilora("generate", "--model", "lora", *GREEDY, cwd=lw))
    peft = ok(minilora("generate", "--model", "llama", "--adapter", "lora-peft", *GREEDY, cwd=lw))
    assert run == peft and run.startswith("the cat sat")
    run = ok(minilora("eval", "--model", "lora", *EVAL, cwd=lw))  # the run's own block size
    peft = ok(minilora("eval", "--model", "llama", "--adapter", "lora-peft", *EVAL, *BLOCK,
                       cwd=lw))
    assert run == peft and "(2 batches of 4 x 16 tokens per split)" in run


def test_merge_writes_a_llama_directory_that_generates_as_the_adapter(lw):
    assert "max |logits merged - unmerged|" in lw.outputs["merge"]
    assert json.loads((lw / "merged-hf" / "config.json").read_text())["model_type"] == "llama"
    merged = ok(minilora("generate", "--model", "merged-hf", *GREEDY, cwd=lw))
    assert merged == ok(minilora("generate", "--model", "lora", *GREEDY, cwd=lw))
    ok(minilora("merge", "--model", "lora", "--out", "merged-run", cwd=lw))  # a run directory
    assert merged == ok(minilora("generate", "--model", "merged-run", *GREEDY, cwd=lw))


def test_a_full_qwen2_run_exports_as_transformers_reads_it_and_trains_again(lw):
    assert "(transformers: Qwen2ForCausalLM.from_pretrained)" in lw.outputs["hf"]
    exported = LlamaForCausalLM.from_pretrained(lw / "qwen-hf")
    trained = load_run(lw / "qwen-full").model
    assert exported.config == trained.config and exported.config.tie_word_embeddings
    for (name, a), (_, b) in zip(exported.named_parameters(), trained.named_parameters(),
                                 strict=True):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    assert hf.load_tokenizer(lw / "qwen-hf") == hf.load_tokenizer(lw / "qwen2")
    ok(minilora("train", "--data", "corpus.txt", "--init-from", "qwen-hf", "--out", "again",
                "--max-iters", "2", "--eval-iters", "1", "--batch-size", "2", "--quiet", *BLOCK,
                cwd=lw))


MISTAKES = {
    "train-without-block-size": (["train", "--data", "corpus.txt", "--init-from", "llama",
                                  "--out", "x1", "--lora-r", "2"], "--block-size is needed"),
    "train-past-max-positions": (["train", "--data", "corpus.txt", "--init-from", "llama",
                                  "--out", "x2", "--block-size", "33"],
                                 "exceeds the model's max_position_embeddings (32)"),
    "dropout-on-a-llama": (["train", "--data", "corpus.txt", "--init-from", "llama", "--out", "x3",
                            "--dropout", "0.1", *BLOCK], "Llama and Qwen2 have no dropout"),
    "eval-without-block-size": (["eval", "--model", "llama", "--data", "corpus.txt"],
                                "--block-size is needed"),
    "gpt-roles-on-a-llama": (["train", "--data", "corpus.txt", "--init-from", "llama", "--out",
                              "x4", "--lora-r", "2", "--lora-targets", "q,c_attn", *BLOCK],
                             "expected distinct roles from q, k, v, o, mlp or all"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_exit_code_2_and_leaves_nothing(case, lw, capsys, monkeypatch):
    args, message = MISTAKES[case]
    monkeypatch.chdir(lw)
    before = sorted(str(p) for p in lw.path.rglob("*"))
    code, stdout, stderr = _in_this_process(args, capsys)
    assert (code, stdout) == (2, ""), stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error: "), stderr
    assert message in lines[0]
    assert sorted(str(p) for p in lw.path.rglob("*")) == before
