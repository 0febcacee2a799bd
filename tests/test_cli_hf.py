"""The command line on Hugging Face and PEFT directories, end to end, with files made here: a
tiny GPT-2 written by ``save_pretrained`` beside a byte-level BPE tokenizer trained on the test's
text (no download). Fine-tune it in full and with LoRA, export the run's model and adapter, merge
to a Hugging Face directory, generate and evaluate on a directory plus a PEFT adapter; and every
mistake one line, exit code 2, nothing left behind. Needs ``tokenizers`` (the ``hf`` extra); the
check against PEFT itself also the ``parity`` extra.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minilora import hf
from minilora.models import GPT, GPTConfig
from minilora.train import load_run, read_checkpoint
from minilora.train.checkpoint import CHECKPOINT
from tests.extras import need
from tests.test_cli import FINETUNE, Work, _in_this_process, corpus_text, minilora, ok

(tokenizers,) = need("tokenizers")

GREEDY = ["--prompt", "the cat sat", "--max-new-tokens", "8", "--temperature", "0",
          "--threads", "1"]


def bpe_tokenizer(text: str):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained on ``text``, as GPT-2's is made."""
    tk = tokenizers
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def _gpt2_dir(directory: Path, text: str) -> Path:
    """A GPT-2 directory as transformers writes it: config.json, model.safetensors and the
    tokenizer.json of a byte-level BPE trained on ``text``."""
    tokenizer = bpe_tokenizer(text)
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=24, n_layer=1,
                       n_head=2, n_embd=16)
    GPT(config, seed=5).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def hfw(tmp_path_factory) -> Work:
    """A GPT-2 directory, a LoRA and a full fine-tune of it, their exports, a merge."""
    w = Work(tmp_path_factory.mktemp("cli-hf"))
    text = corpus_text(800)
    (w / "corpus.txt").write_text(text, encoding="utf-8")
    _gpt2_dir(w / "gpt2", text)
    w.outputs["lora"] = ok(minilora("train", "--data", "corpus.txt", "--init-from", "gpt2",
                                    "--out", "lora", "--lora-r", "2", "--lora-dropout", "0.1",
                                    *FINETUNE, cwd=w))
    w.outputs["full"] = ok(minilora("train", "--data", "corpus.txt", "--init-from", "gpt2",
                                    "--out", "full", *FINETUNE, cwd=w))
    w.outputs["peft"] = ok(minilora("export", "--model", "lora", "--out", "lora-peft",
                                    "--format", "peft", cwd=w))
    w.outputs["hf"] = ok(minilora("export", "--model", "full", "--out", "full-hf", "--format",
                                  "hf", cwd=w))
    w.outputs["merge"] = ok(minilora("merge", "--model", "lora", "--out", "merged-hf",
                                     "--format", "hf", cwd=w))
    return w


def test_init_from_a_hugging_face_directory_tokenizes_the_data_with_its_tokenizer(hfw):
    first = hfw.outputs["lora"].splitlines()[0]
    vocab = hf.load_tokenizer(hfw / "gpt2").vocab_size
    assert first.startswith("fine-tuning gpt2 with LoRA r=2") and f"vocabulary {vocab})" in first
    ckpt = read_checkpoint(hfw / "lora")
    expected = hf.load_tokenizer(hfw / "gpt2")
    assert ckpt.tokenizer == expected  # the directory's BPE, not the text's characters
    assert ckpt.meta["base"]["path"] == str(Path("..") / "gpt2")
    assert ckpt.meta["init_from"] == str((hfw / "gpt2").resolve())


def test_a_run_keeps_its_bpe_tokenizer_beside_the_checkpoint_not_in_it(hfw):
    """The metadata, rewritten at every evaluation, holds a reference and a digest; the 1.4 MB
    of GPT-2's vocabulary would be in every checkpoint otherwise."""
    for run in ("lora", "full"):
        meta = read_checkpoint(hfw / run).meta
        assert set(meta["tokenizer"]) == {"type", "file", "sha256"}
        assert meta["tokenizer"]["file"] == "tokenizer.json"
        assert (hfw / run / "tokenizer.json").is_file()
        assert "merges" not in json.dumps(meta)  # none of the tokenizer is in the metadata


def test_a_swapped_or_missing_tokenizer_file_is_refused(hfw, capsys, tmp_path):
    run = tmp_path / "full"
    shutil.copytree(hfw / "full", run)
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped: other ids, the same size
    (run / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, _, err = _in_this_process(["generate", "--model", str(run), *GREEDY], capsys)
    assert code == 2 and "not the tokenizer the run was trained with" in err
    (run / "tokenizer.json").unlink()
    code, _, err = _in_this_process(["generate", "--model", str(run), *GREEDY], capsys)
    assert code == 2 and "its tokenizer" in err and "is missing" in err


def test_export_peft_writes_an_adapter_that_generates_as_the_run_does(hfw):
    assert hfw.outputs["peft"].startswith("exported lora's adapter to lora-peft")
    config = json.loads((hfw / "lora-peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    assert config["base_model_name_or_path"] == str((hfw / "gpt2").resolve())
    run = ok(minilora("generate", "--model", "lora", *GREEDY, cwd=hfw))
    peft = ok(minilora("generate", "--model", "gpt2", "--adapter", "lora-peft", *GREEDY,
                       cwd=hfw))
    assert run == peft and run.startswith("the cat sat")


def test_eval_on_a_directory_with_an_adapter_equals_eval_on_the_run(hfw):
    args = ["--data", "corpus.txt", "--eval-iters", "2", "--batch-size", "4", "--threads", "1"]
    run = ok(minilora("eval", "--model", "lora", *args, cwd=hfw))
    peft = ok(minilora("eval", "--model", "gpt2", "--adapter", "lora-peft", *args, cwd=hfw))
    assert run == peft and run.startswith("corpus.txt: train loss ")
    plain = ok(minilora("eval", "--model", "gpt2", *args, cwd=hfw))
    assert plain != run  # the adapter changed the model


def test_export_hf_writes_the_model_and_its_tokenizer_as_transformers_reads_them(hfw):
    assert hfw.outputs["hf"].startswith("exported full to full-hf: tokenizer.json, config.json, "
                                        "model.safetensors")
    exported = GPT.from_pretrained(hfw / "full-hf")
    trained = load_run(hfw / "full").model
    for (name, a), (_, b) in zip(exported.named_parameters(), trained.named_parameters(),
                                 strict=True):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    assert hf.load_tokenizer(hfw / "full-hf") == hf.load_tokenizer(hfw / "gpt2")
    # and a Hugging Face directory fine-tunes again
    ok(minilora("train", "--data", "corpus.txt", "--init-from", "full-hf", "--out", "again",
                "--max-iters", "2", "--eval-iters", "1", "--batch-size", "2", "--quiet",
                "--threads", "1", cwd=hfw))


def test_merge_writes_a_hugging_face_directory_that_generates_as_the_adapter(hfw):
    assert hfw.outputs["merge"].startswith("merged lora into merged-hf (a Hugging Face "
                                           "directory): a plain model")
    assert sorted(p.name for p in (hfw / "merged-hf").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    merged = ok(minilora("generate", "--model", "merged-hf", *GREEDY, cwd=hfw))
    assert merged == ok(minilora("generate", "--model", "lora", *GREEDY, cwd=hfw))


def test_merge_of_a_directory_and_a_peft_adapter_is_a_hugging_face_directory(hfw, capsys):
    out = hfw / "merged-peft"
    code, _, err = _in_this_process(["merge", "--model", str(hfw / "gpt2"), "--adapter",
                                        str(hfw / "lora-peft"), "--out", str(out)], capsys)
    assert code == 0, err
    assert (out / "config.json").is_file() and not (out / CHECKPOINT).exists()
    a, b = GPT.from_pretrained(out), GPT.from_pretrained(hfw / "merged-hf")
    idx = np.random.default_rng(0).integers(0, 250, (2, 24))
    np.testing.assert_allclose(a(idx)[0].data, b(idx)[0].data, rtol=1e-5, atol=1e-5)
    code, _, err = _in_this_process(["merge", "--model", str(hfw / "gpt2"), "--adapter",
                                     str(hfw / "lora-peft"), "--out", str(hfw / "merged-run"),
                                     "--format", "run"], capsys)
    assert code == 0, err
    assert load_run(hfw / "merged-run").tokenizer == hf.load_tokenizer(hfw / "gpt2")


def test_a_lora_run_on_a_moved_hugging_face_base_is_found_with_base(hfw, capsys, tmp_path):
    shutil.copytree(hfw / "lora", tmp_path / "runs" / "lora")
    shutil.copytree(hfw / "gpt2", tmp_path / "models" / "gpt2")
    run = str(tmp_path / "runs" / "lora")
    code, _, err = _in_this_process(["generate", "--model", run, *GREEDY], capsys)
    assert code == 2 and "--base DIR" in err
    code, out, err = _in_this_process(["generate", "--model", run, "--base",
                                       str(tmp_path / "models" / "gpt2"), *GREEDY], capsys)
    assert code == 0, err
    assert out == ok(minilora("generate", "--model", "lora", *GREEDY, cwd=hfw))


def test_the_exported_adapter_loads_in_peft_with_the_run_logits(hfw):
    torch, transformers, peft = need("torch", "transformers", "peft")
    base = transformers.GPT2LMHeadModel.from_pretrained(hfw / "gpt2")
    model = peft.PeftModel.from_pretrained(base, hfw / "lora-peft").eval()
    idx = np.random.default_rng(1).integers(0, 250, (2, 24))
    with torch.no_grad():
        theirs = model(torch.from_numpy(idx)).logits.numpy()
    ours = load_run(hfw / "lora").model(idx)[0].data
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


# ---- mistakes: one line, exit code 2, nothing left behind ---------------------------------------
def _prepare(w: Work) -> None:
    if (w / "no-tokenizer").exists():
        return
    shutil.copytree(w / "gpt2", w / "no-tokenizer")
    (w / "no-tokenizer" / "tokenizer.json").unlink()
    (w / "pickled").mkdir()
    (w / "pickled" / "adapter_config.json").write_text((w / "lora-peft" /
                                                        "adapter_config.json").read_text())
    (w / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really")


MISTAKES = {
    "init-from-without-tokenizer": (["train", "--data", "corpus.txt", "--init-from",
                                     "no-tokenizer", "--out", "x1"], "holds no tokenizer", "x1"),
    "tokenizer-with-hf-init-from": (["train", "--data", "corpus.txt", "--init-from", "gpt2",
                                     "--out", "x2", "--tokenizer", "byte"], "drop --tokenizer",
                                    "x2"),
    "generate-without-tokenizer": (["generate", "--model", "no-tokenizer"],
                                   "comes with no tokenizer", None),
    "eval-without-tokenizer": (["eval", "--model", "no-tokenizer", "--data", "corpus.txt"],
                               "comes with no tokenizer", None),
    "base-for-a-hf-directory": (["generate", "--model", "gpt2", "--base", "gpt2"],
                                "is a Hugging Face model directory", None),
    "adapter-on-a-lora-run": (["generate", "--model", "lora", "--adapter", "lora-peft"],
                              "is a LoRA run, with an adapter of its own", None),
    "adapter-missing": (["generate", "--model", "gpt2", "--adapter", "nope"],
                        "nope: adapter directory does not exist", None),
    "adapter-pickled": (["eval", "--model", "gpt2", "--adapter", "pickled", "--data",
                         "corpus.txt"], "a pickle file, which minilora never opens", None),
    "export-a-hf-directory": (["export", "--model", "gpt2", "--out", "x3", "--format", "hf"],
                              "is a Hugging Face model directory already", "x3"),
    "merge-without-adapter": (["merge", "--model", "gpt2", "--out", "x4"],
                              "has no adapter; give one with --adapter DIR", "x4"),
    "merge-into-a-hf-directory": (["merge", "--model", "lora", "--out", "merged-hf", "--format",
                                   "hf"], "already holds a model (config.json)", None),
    "export-into-an-adapter": (["export", "--model", "lora", "--out", "lora-peft", "--format",
                                "peft"], "already holds a model (adapter_config.json)", None),
    "export-without-format": (["export", "--model", "lora", "--out", "x5"],
                              "the following arguments are required: --format", "x5"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_exit_code_2_and_leaves_nothing(case, hfw, capsys, monkeypatch):
    _prepare(hfw)
    args, message, out = MISTAKES[case]
    monkeypatch.chdir(hfw)
    before = sorted(str(p) for p in Path(hfw).rglob("*"))
    code, stdout, stderr = _in_this_process(args, capsys)
    assert (code, stdout) == (2, ""), stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minilora: error: "), stderr
    assert message in lines[0]
    assert sorted(str(p) for p in Path(hfw).rglob("*")) == before
    if out is not None:
        assert not (hfw / out).exists()


def test_the_commands_dispatch_on_the_directory_not_on_gpt2(hfw, capsys, monkeypatch):
    """A directory minilora.hf reads as another architecture (a Llama here, put in place of the
    GPT-2): generate runs it; eval and training ask for the sequence length a Llama lacks
    (tests/test_cli_llama.py runs them on real Llama directories)."""
    from minilora.models import LlamaConfig, LlamaForCausalLM

    vocab = hf.load_tokenizer(hfw / "gpt2").vocab_size
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2), seed=0)
    monkeypatch.setattr(hf, "from_pretrained", lambda *a, **k: llama.eval())
    code, out, err = _in_this_process(["generate", "--model", str(hfw / "gpt2"), *GREEDY], capsys)
    assert code == 0 and out.startswith("the cat sat"), err
    code, _, err = _in_this_process(["eval", "--model", str(hfw / "gpt2"), "--data",
                                     str(hfw / "corpus.txt")], capsys)
    assert code == 2 and "--block-size is needed: a Llama or Qwen2 model has no block size" in err
    code, _, err = _in_this_process(["train", "--data", str(hfw / "corpus.txt"), "--init-from",
                                     str(hfw / "gpt2"), "--out", str(hfw / "llama-run")], capsys)
    assert code == 2 and "block_size is needed" in err
    assert not (hfw / "llama-run").exists()
