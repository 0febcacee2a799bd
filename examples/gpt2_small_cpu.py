"""Fine-tune a GPT-2-small-shaped model on a 2-core CPU: full against LoRA, what each costs.

    python examples/gpt2_small_cpu.py --out runs/gpt2_small              # random init, 300 steps
    python examples/gpt2_small_cpu.py --init-from gpt2 --out runs/gpt2   # real GPT-2 files
    python examples/gpt2_small_cpu.py --small                            # a few seconds (CI)

The model has GPT-2 small's shape: 12 layers, 12 heads, 768 wide, vocabulary 50,257, 124M
parameters. Without ``--init-from`` its weights are random (nanoGPT's init): a step costs what it
costs with trained weights, so the times and the memory are GPT-2's, but the losses are not (the
text is read as UTF-8 bytes, ids 0-255 of the 50,257). With ``--init-from DIR``, a Hugging Face
GPT-2 directory (``config.json``, ``model.safetensors``, ``tokenizer.json`` or ``vocab.json`` and
``merges.txt``, as ``save_pretrained`` writes them) or a minilora run, the same command fine-tunes
the real model, its own tokenizer reading the text.

Each variant runs in a process of its own (peak memory is a process's high-water mark) and:

1. loads the base (its context stays 1,024 positions);
2. fine-tunes it on ``builtin:majority`` (plain text) in sequences of ``--block-size`` tokens
   (``TrainConfig.block_size``; 256: the benchmark's config C, a length a 2-core machine trains
   in seconds per step) for ``--steps`` steps of batch ``--batch-size``: in full, with LoRA
   r = 8, alpha 16 on ``c_attn`` and ``c_proj`` (attention and MLP), and with the same LoRA and
   activation checkpointing (each block's activations recomputed in the backward pass instead
   of held), through :func:`minilora.train.train`, as ``minilora train`` does;
3. samples ``--new-tokens`` tokens after a 16-token prompt, greedily, with the key/value cache.

It prints one table: trainable parameters, the median time per step, training tokens per second,
the peak resident memory of the process (``ru_maxrss``: weights, optimizer state, the step's
activations and everything Python holds), sampling tokens per second, and the losses. The
figures of docs/training.md come from this script on a quiet machine.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from minilora.data import ByteTokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, train

GPT2_SMALL = {"vocab_size": 50257, "block_size": 1024, "n_layer": 12, "n_head": 12, "n_embd": 768}
TINY = {"vocab_size": 512, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}
LORA = LoRAConfig(r=8, lora_alpha=16, target_modules=("c_attn", "c_proj"))

# name -> (LoRA or not, the TrainConfig fields of its own); one line per variant
VARIANTS = {
    "full": (False, {"lr": 1e-4}),
    "LoRA r=8": (True, {"lr": 1e-3}),
    "LoRA r=8, activation checkpointing": (True, {"lr": 1e-3, "activation_checkpointing": True}),
}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--init-from", metavar="DIR",
                    help="a Hugging Face GPT-2 directory or a minilora run (default: random init)")
parser.add_argument("--out", default="runs/gpt2_small_cpu", help="where the results go")
parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per variant")
parser.add_argument("--block-size", type=int, default=256, help="the context trained on")
parser.add_argument("--batch-size", type=int, default=4)
parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled to time it")
parser.add_argument("--threads", type=int, help="(default: all CPUs)")
parser.add_argument("--small", action="store_true", help="a tiny model, few steps (for CI)")
parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # a child's
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
if small:
    args.steps, args.block_size, args.batch_size, args.new_tokens = 4, 32, 2, 8
out = Path(args.out)


def base_model():
    """(model, tokenizer, what it is): the --init-from model, or GPT-2 small's shape at random."""
    if args.init_from:
        from minilora.train.sources import read_full_model

        model, tokenizer = read_full_model(args.init_from, "--init-from")
        if tokenizer is None:
            sys.exit(f"--init-from {args.init_from}: no tokenizer there to read the text with")
        return model, tokenizer, f"{args.init_from} (pretrained)"
    shape = TINY if small else GPT2_SMALL
    return GPT(GPTConfig(**shape), seed=0), ByteTokenizer(), "random init (nanoGPT's), bytes"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sampling_tokens_per_s(model, tokenizer) -> float:
    """New tokens per second of a greedy generation after a 16-token prompt (cache on)."""
    prompt = np.asarray(tokenizer.encode("fig cow owl plum: animal\nbee map hen: ")[:16])
    model.generate(prompt[None], 2, temperature=0)  # warm-up
    t0 = time.perf_counter()
    got = model.generate(prompt[None], args.new_tokens, temperature=0)
    return (got.shape[1] - len(prompt)) / (time.perf_counter() - t0)


def run_variant(name: str) -> dict:
    """Fine-tune one variant in this process; its figures."""
    lora, fields = VARIANTS[name]
    model, tokenizer, what = base_model()
    data = load_dataset("builtin:majority", tokenizer=tokenizer)
    if lora:
        apply_lora(model, LORA, rng=0)
    config = TrainConfig(batch_size=args.batch_size, block_size=args.block_size,
                         max_iters=args.steps,
                         warmup_iters=args.steps // 10, min_lr=fields["lr"] / 10,
                         eval_interval=args.steps, eval_iters=2, seed=0, **fields)
    result = train(model, data, config, quiet=True, threads=args.threads)
    peak = peak_rss_mib()  # before sampling: training's high-water mark
    return {"variant": name, "base": what, "trainable": model.num_parameters(trainable_only=True),
            "parameters": model.num_parameters(), "ms_per_step": result.ms_per_step,
            "train_tokens_per_s": result.tokens_per_s, "peak_rss_mib": peak,
            "sample_tokens_per_s": sampling_tokens_per_s(model, tokenizer),
            "first_loss": result.history[0]["train_loss"], "val_loss": result.val_loss}


if args.variant:  # a child: one variant, its figures as one JSON line
    print(json.dumps(run_variant(args.variant)))
    sys.exit(0)

out.mkdir(parents=True, exist_ok=True)
rows = []
for name in VARIANTS:
    child = [sys.executable, __file__, "--variant", name, *sys.argv[1:]]
    done = subprocess.run(child, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"variant {name} failed:\n{done.stderr[-3000:]}")
    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f"{name}: {r['ms_per_step']:,.0f} ms/step, peak {r['peak_rss_mib']:,.0f} MiB, "
          f"sampling {r['sample_tokens_per_s']:,.1f} tokens/s")

first = rows[0]
lines = [f"{first['base']}: {first['parameters']:,} parameters, block {args.block_size}, batch "
         f"{args.batch_size}, {args.steps} steps on builtin:majority",
         "", "| variant | trainable | ms/step | train tokens/s | peak RSS MiB | sampling tokens/s "
         "| loss at step 0 | val loss at the end |",
         "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for r in rows:
    lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['ms_per_step']:,.0f} | "
                 f"{r['train_tokens_per_s']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                 f"{r['sample_tokens_per_s']:,.1f} | {r['first_loss']:.3f} | "
                 f"{r['val_loss']:.3f} |")
table = "\n".join(lines)
print("\n" + table)
(out / "gpt2_small_cpu.md").write_text(table + "\n", encoding="utf-8")
(out / "gpt2_small_cpu.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
print(f"\nwrote {out / 'gpt2_small_cpu.md'} and {out / 'gpt2_small_cpu.json'}")

# what the run must show, whatever the machine: LoRA trains a small share, the numbers are finite
assert all(r["trainable"] < first["trainable"] / 5 for r in rows if r["variant"] != "full")
# checkpointing recomputes the same activations: the same gradients, so the same run, bit for bit
by_name = {r["variant"]: r for r in rows}
assert by_name["LoRA r=8, activation checkpointing"]["val_loss"] == by_name["LoRA r=8"]["val_loss"]
assert all(np.isfinite(r["val_loss"]) for r in rows)
print("all checks passed")
