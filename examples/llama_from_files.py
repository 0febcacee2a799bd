"""A Llama (or Qwen2) from local Hugging Face files, LoRA-fine-tuned on a CPU, its adapter saved
as PEFT saves it.

    python examples/llama_from_files.py --model path/to/llama-dir --data notes.txt --out adapter
    python examples/llama_from_files.py --small        # makes a tiny random Llama directory first

``--model`` is a directory as ``transformers`` saves it (``config.json``, ``model.safetensors`` or
its shards, ``tokenizer.json``): a checkpoint you downloaded, nothing is fetched here. Without it,
the example writes a tiny random Llama there with minilora's ``save_pretrained`` and a byte-level
BPE trained on the built-in corpus (needs ``tokenizers``, the ``hf`` extra). Then:

1. ``minilora.from_pretrained(DIR)``: the model its ``config.json``'s ``model_type`` names, and
   ``hf.load_tokenizer(DIR)``: the directory's own tokenizer, which reads the data.
2. LoRA on ``q_proj`` and ``v_proj`` (PEFT's default for Llama, the LoRA paper's W_q and W_v),
   fine-tuned for a few steps; the base weights stay frozen.
3. ``save_adapter``: ``adapter_config.json`` and ``adapter_model.safetensors``, which
   ``PeftModel.from_pretrained`` reads on the same directory; read back here onto a fresh base,
   it gives the trained model's logits.
4. The command-line steps that do the same, unchanged on a real checkpoint.
"""

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

import minilora
from minilora import hf
from minilora.data import load_dataset
from minilora.lora import LoRAConfig, apply_lora
from minilora.tensor import no_grad
from minilora.train import TrainConfig, train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", help="a Llama or Qwen2 directory (default: a tiny random one)")
parser.add_argument("--data", default="builtin:majority", help="a text file or builtin:NAME")
parser.add_argument("--out", default="llama-adapter", help="where the adapter goes")
parser.add_argument("--block-size", type=int, default=64, help="training sequence length")
parser.add_argument("--iters", type=int, default=60, help="fine-tuning steps")
parser.add_argument("--r", type=int, default=8, help="the adapter's rank")
parser.add_argument("--small", action="store_true", help="few steps (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
iters, block = (4, 32) if small else (args.iters, args.block_size)


def tiny_llama_dir(directory: Path) -> Path:
    """A random Llama as transformers would save it, and a byte-level BPE of the built-in text."""
    import tokenizers as tk

    from minilora.data.builtin import load_builtin
    from minilora.models import LlamaConfig, LlamaForCausalLM

    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    tokenizer.train_from_iterator([load_builtin("world").text, load_builtin("majority").text],
                                  tk.trainers.BpeTrainer(
                                      vocab_size=400, show_progress=False,
                                      initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32,
                         intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config, seed=0).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


scratch = tempfile.TemporaryDirectory()
directory = Path(args.model) if args.model else tiny_llama_dir(Path(scratch.name) / "llama")

# ---- 1. The model and its tokenizer, from the files ---------------------------------------------
model = minilora.from_pretrained(directory)
tokenizer = hf.load_tokenizer(directory, model.config.vocab_size)
c = model.config
print(f"{directory}: a {c.model_type} model, {c.num_hidden_layers} layers x {c.hidden_size}, "
      f"{c.num_attention_heads} query heads / {c.num_key_value_heads} key/value heads, "
      f"{model.num_parameters():,} parameters; a BPE tokenizer of {tokenizer.vocab_size:,} ids")
data = load_dataset(args.data, tokenizer=tokenizer)

# ---- 2. LoRA on q_proj and v_proj, a few steps --------------------------------------------------
lora = LoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["q_proj", "v_proj"])
apply_lora(model, lora, rng=0)
print(f"LoRA r={lora.r} on q_proj, v_proj: {model.num_parameters(trainable_only=True):,} "
      "trainable parameters")
frozen = model.model.layers[0].self_attn.q_proj.weight.data.copy()
result = train(model, data, TrainConfig(max_iters=iters, lr=5e-3, min_lr=5e-4,
                                        warmup_iters=iters // 10, eval_interval=iters,
                                        eval_iters=4, batch_size=4, block_size=block), quiet=True)
print(f"{iters} steps of 4 x {block} tokens on {args.data}: val loss {result.val_loss:.4f}, "
      f"{result.ms_per_step:.0f} ms/step")
assert np.array_equal(frozen, model.model.layers[0].self_attn.q_proj.weight.data)
print("the base weight q_proj of layer 0 is bit-for-bit unchanged")

# ---- 3. The adapter, as PEFT saves it, read back onto a fresh base ------------------------------
out = hf.save_adapter(model, args.out, base_model_name_or_path=str(Path(directory).resolve()))
print(f"saved {out / 'adapter_config.json'} and {out / 'adapter_model.safetensors'}")
again = hf.load_adapter(minilora.from_pretrained(directory), out)
idx = data.get_batch("val", 2, block, np.random.default_rng(0))[0]
with no_grad():
    diff = float(np.max(np.abs(model.eval()(idx)[0].data - again(idx)[0].data)))
print(f"max |logits trained - logits of base + saved adapter| = {diff:.1e}")
assert diff == 0.0

# ---- 4. The same from the command line ----------------------------------------------------------
shown = args.model or "path/to/llama-dir"
print(f"""
the same with the command line, unchanged on a real checkpoint (--block-size: a Llama has none):
  minilora train --init-from {shown} --data {args.data} --out runs/llama-lora --lora-r {args.r} \\
      --block-size {block} --max-iters {iters} --lr 5e-3
  minilora export --model runs/llama-lora --out {args.out} --format peft
  minilora generate --model {shown} --adapter {args.out} --prompt "..." --temperature 0
  minilora eval --model runs/llama-lora --data {args.data}
  minilora merge --model {shown} --adapter {args.out} --out merged-llama
  minilora check --base {shown} --adapter {args.out} --merged merged-llama""")
scratch.cleanup()
