"""minilora.train.architecture: runs and checkpoints of Llama-family models, and what each family
asks of a run (its sequence length, its default LoRA targets), refused by name where missing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minilora import ConfigError, FileFormatError, io
from minilora.data import builtin_tokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM
from minilora.train import TrainConfig, architecture, load_run, runs, train, write_checkpoint
from minilora.train.checkpoint import CHECKPOINT

LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 24,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
STEPS = TrainConfig(batch_size=2, max_iters=4, eval_interval=2, eval_iters=1, warmup_iters=1,
                    seed=1, block_size=12)


def llama(vocab: int = 30, **kw) -> LlamaForCausalLM:
    fields = {k: v for k, v in LLAMA.items() if k != "model_type"}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **fields, **kw), seed=0)


def test_a_llama_run_pretrains_resumes_and_reads_back_as_a_llama(tmp_path):
    runs.pretrain("builtin:world", tmp_path / "run", LLAMA, STEPS, quiet=True)
    run = load_run(tmp_path / "run")
    assert type(run.model) is LlamaForCausalLM and run.meta["model_config"]["model_type"] == "llama"
    runs.resume(tmp_path / "run", max_iters=6, quiet=True)
    runs.pretrain("builtin:world", tmp_path / "whole", LLAMA,
                  TrainConfig(**{**STEPS.to_dict(), "max_iters": 6, "lr_decay_iters": 4}),
                  quiet=True)
    for (name, a), (_, b) in zip(load_run(tmp_path / "run").model.named_parameters(),
                                 load_run(tmp_path / "whole").model.named_parameters(),
                                 strict=True):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)


def test_a_llama_needs_the_runs_block_size_and_a_gpt_keeps_its_own_as_the_longest():
    data = load_dataset("builtin:world", tokenizer=builtin_tokenizer())
    model = llama(builtin_tokenizer().vocab_size, max_position_embeddings=32)
    with pytest.raises(ConfigError, match=r"TrainConfig.block_size is needed"):
        train(model, data, TrainConfig(max_iters=1), quiet=True)
    with pytest.raises(ConfigError, match=r"exceeds the model's max_position_embeddings \(32\)"):
        train(model, data, TrainConfig(max_iters=1, block_size=33), quiet=True)
    gpt = GPT(GPTConfig(vocab_size=builtin_tokenizer().vocab_size, block_size=16, n_layer=1,
                        n_head=2, n_embd=8))
    assert architecture.of_model(gpt).block_size(gpt.config, None) == 16
    assert architecture.of_model(gpt).block_size(gpt.config, 8) == 8
    with pytest.raises(ConfigError, match=r"TrainConfig.block_size \(17\) exceeds the model's "
                                          r"block_size \(16\)"):
        architecture.of_model(gpt).block_size(gpt.config, 17)


def test_each_family_names_its_default_targets_and_its_roles():
    assert architecture.of_model(llama()).target_modules == ("q_proj", "v_proj")
    assert architecture.ARCHITECTURES["gpt2"].target_modules == ("c_attn", "c_proj")
    roles = architecture.ARCHITECTURES["qwen2"].lora_targets("q,v,mlp")
    assert roles == {"target_modules": ("q_proj", "v_proj", "gate_proj", "up_proj",
                                        "down_proj")}
    model = apply_lora(llama(), LoRAConfig(r=1, **roles))  # every role names a module
    assert model.num_parameters(trainable_only=True) > 0


def test_a_checkpoint_whose_llama_config_claims_more_than_its_arrays_is_refused(tmp_path):
    model = llama()
    model.config = LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 10**9})
    write_checkpoint(tmp_path / CHECKPOINT, model, {})  # the arrays of 2 layers
    with pytest.raises(FileFormatError, match=r"model_config makes model.layers.2.self_attn"
                                              r".q_proj.weight \(16, 16\), the weights hold none"):
        load_run(tmp_path)


def test_a_checkpoint_of_an_unknown_model_type_is_refused_by_name(tmp_path):
    write_checkpoint(tmp_path / CHECKPOINT, llama(), {})
    path = tmp_path / CHECKPOINT
    meta = json.loads(io.load_metadata(path)["minilora"])
    meta["model_config"]["model_type"] = "mistral"
    io.save_tensors(path, io.load_tensors(path), {"minilora": json.dumps(meta)})
    with pytest.raises(FileFormatError, match=r"bad model_config: model_type 'mistral': minilora "
                                              r"runs train gpt2, llama, qwen2"):
        load_run(tmp_path)
