"""The library end to end: pretrain a GPT, adapt it with LoRA, save the adapter, merge, generate.

    python examples/finetune_gpt.py                # minutes: docs/performance.md says how long
    python examples/finetune_gpt.py --small        # a few seconds (also: MINILORA_EXAMPLE_SMALL=1)

1. Data: ``builtin:world`` to pretrain on, ``builtin:majority`` to adapt to. No download.
2. Pretrain a 4-layer GPT with ``train()``, and sample from it.
3. Adapt it: ``apply_lora`` puts rank-4 adapters on ``c_attn`` and ``c_proj`` and freezes the rest.
4. Fine-tune with the same ``train()``: only ``lora_A`` and ``lora_B`` change.
5. Save the adapter alone (about 90 kB here, against 3.2 MB of base weights), and load it onto a
   fresh copy of the base.
6. Merge (W' = W + s B A) and generate with the merged model: plain Linear layers again.

The command line does the same with files in between: ``minilora train``, ``minilora merge``,
``minilora generate`` (see docs/training.md).
"""

import argparse
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from minilora import io
from minilora.data import load_dataset
from minilora.lora import (
    LoRAConfig,
    apply_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_and_unload,
    print_trainable_parameters,
)
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="a tiny model and a few steps (for CI)")
parser.add_argument("--out", default=None,
                    help="where to save the adapter (default: a temporary directory, removed at "
                         "the end)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
scratch = None if args.out else tempfile.TemporaryDirectory(prefix="minilora-finetune-")
out = Path(args.out or scratch.name)  # a TemporaryDirectory is removed at exit, even on error
out.mkdir(parents=True, exist_ok=True)

if small:
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
    pretrain_iters, finetune_iters, prompts = 60, 30, 20
else:
    shape = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
    pretrain_iters, finetune_iters, prompts = 600, 300, 200

# ---- 1. Data ------------------------------------------------------------------------------------
print("== 1. data")
world = load_dataset("builtin:world")                              # generated, 90/10 split
majority = load_dataset("builtin:majority", tokenizer=world.tokenizer)  # the same alphabet
tokenizer, task = world.tokenizer, majority.task
print(world, "\n", majority, sep="")
print("world:   ", tokenizer.decode(world.train[:70]).replace("\n", " | "))
print("majority:", tokenizer.decode(majority.train[:70]).replace("\n", " | "))

# ---- 2. Pretrain --------------------------------------------------------------------------------
print(f"\n== 2. pretrain a {shape['n_layer']}-layer, {shape['n_embd']}-wide GPT on world text")
model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **shape), seed=0)
config = TrainConfig(max_iters=pretrain_iters, lr=1e-3, min_lr=1e-4,
                     warmup_iters=pretrain_iters // 10, eval_interval=pretrain_iters,
                     eval_iters=10, seed=0)
result = train(model, world, config, quiet=True)                   # no out_dir: nothing saved
print(f"val loss {result.val_loss:.3f} after {result.iters} steps, "
      f"{result.ms_per_step:.0f} ms per step")
prompt = tokenizer.encode("\nthe cat")[None, :]                    # (1, T)
sample = model.generate(prompt, 60, temperature=0.8, top_k=10, rng=0)  # (1, T + 60)
print("sample:", tokenizer.decode(sample[0]).strip().replace("\n", " | "))


def greedy(model, texts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions; prompts of the same length go through the model as one batch."""
    by_length = defaultdict(list)
    for i, text in enumerate(texts):
        by_length[len(text)].append(i)
    answers = [""] * len(texts)
    for length, members in by_length.items():
        idx = np.stack([tokenizer.encode(texts[i]) for i in members])   # (B, T)
        new = model.generate(idx, max_new_tokens, temperature=0)[:, length:]  # (B, new)
        for i, row in zip(members, new, strict=True):
            answers[i] = tokenizer.decode(row)
    return answers


def exact_match(model) -> float:
    return task.evaluate(lambda texts, n: greedy(model, texts, n), limit=prompts).accuracy


print(f"exact match on {prompts} held-out majority prompts, before fine-tuning: "
      f"{exact_match(model):.0%}")
base_weights = model.state_dict()                                  # name -> array copy

# ---- 3. Adapt -----------------------------------------------------------------------------------
print("\n== 3. apply_lora: rank-4 adapters on c_attn and c_proj, everything else frozen")
lora = LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])  # s = 8 / 4 = 2
apply_lora(model, lora, rng=0)
print_trainable_parameters(model)
print("adapted:", model.transformer.h[0].attn.c_attn)

# ---- 4. Fine-tune the adapter -------------------------------------------------------------------
print(f"\n== 4. fine-tune the adapter on the majority task for {finetune_iters} steps")
config = TrainConfig(max_iters=finetune_iters, lr=5e-3, min_lr=5e-4,
                     warmup_iters=finetune_iters // 10, eval_interval=finetune_iters,
                     eval_iters=10, seed=0)
result = train(model, majority, config, quiet=True)
print(f"val loss {result.val_loss:.3f}, {result.ms_per_step:.0f} ms per step")
after = model.state_dict()
unchanged = [name for name, w in base_weights.items() if np.array_equal(after[name], w)]
print(f"{len(unchanged)} of {len(base_weights)} base parameters are bit-for-bit unchanged")
assert len(unchanged) == len(base_weights)
print(f"exact match after fine-tuning: {exact_match(model):.0%}")

# ---- 5. Save and load the adapter alone ---------------------------------------------------------
print("\n== 5. the adapter on disk: only lora_A and lora_B, and the config")
io.save_tensors(out / "adapter.safetensors", lora_state_dict(model))
io.save_json(out / "adapter_config.json", model.lora_config.to_dict())
adapter_bytes = (out / "adapter.safetensors").stat().st_size
base_bytes = sum(w.nbytes for w in base_weights.values())
print(f"adapter: {adapter_bytes:,} bytes; the base model's weights: {base_bytes:,} bytes")

copy = GPT(model.config, seed=1)                                   # a fresh model ...
copy.load_state_dict(base_weights)                                 # ... with the base weights
apply_lora(copy, LoRAConfig.from_dict(io.load_json(out / "adapter_config.json")))
load_lora_state_dict(copy, io.load_tensors(out / "adapter.safetensors"))
x = majority.get_batch("val", 4, shape["block_size"], np.random.default_rng(0))[0]  # (4, T)
assert np.array_equal(copy(x)[0].data, model(x)[0].data)
print("base + loaded adapter gives the fine-tuned logits bit for bit")

# ---- 6. Merge and generate ----------------------------------------------------------------------
print("\n== 6. merge: W' = W + s B A, then generate with plain Linear layers")
unmerged_logits = model(x)[0].data                                    # (4, T, V)
merged = merge_and_unload(model)
print("c_attn is now:", merged.transformer.h[0].attn.c_attn)
diff = np.abs(merged(x)[0].data - unmerged_logits).max()
print(f"max |merged - unmerged logits| = {diff:.1e} (float32 round-off)")
assert diff < 1e-4
for prompt, truth in task.pairs[:3]:
    answer = greedy(merged, ["\n" + prompt], 8)[0].split("\n")[0]
    print(f"{prompt}-> {answer!r} (expected {truth!r})")
if scratch is None:
    print(f"\nadapter saved in {out}")
else:
    scratch.cleanup()
    print("\nthe adapter was in a temporary directory, now removed (--out DIR keeps it)")
