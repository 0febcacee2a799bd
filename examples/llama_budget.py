"""Fine-tuning a Llama on a CPU: LoRA on q_proj and v_proj against all seven projections, at one
parameter budget.

    python examples/llama_budget.py --out runs/llama_budget               # 2 x 3 runs, + a base
    python examples/llama_budget.py --seeds 0,1,2,3,4 --iters 400
    python examples/llama_budget.py --small                               # a few seconds (CI)

The LoRA paper adapted W_q and W_v of GPT-3; PEFT's default for Llama is the same,
``target_modules=["q_proj", "v_proj"]``. Many who fine-tune Llama-family models today adapt all
seven projections (q, k, v, o and the SwiGLU MLP's gate, up and down) at a small rank instead.
This example asks which is better for the same number of trainable parameters, on a small
Llama-shaped model (RMSNorm, rotary positions, grouped-query attention, SwiGLU) that it first
pretrains itself:

1. The base: a random-init Llama pretrained on ``builtin:world`` (English-like prose).
2. Two target sets at one budget, each fine-tuned on ``builtin:majority`` (name the category
   most listed words belong to) for the same steps and learning rate, once per seed: q_proj and
   v_proj at rank R, all seven at rank r, with R chosen so that R (in + out) summed over q_proj and
   v_proj equals r (in + out) summed over the seven (alpha = 2 x rank, so s = 2 in both).
3. A table (markdown): trainable parameters, validation loss and exact match on held-out prompts
   (mean and sample standard deviation over the seeds), and ms per training step.
"""

import argparse
import json
import os
import statistics
from pathlib import Path

from minilora.data import builtin_tokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora, lora_parameter_counts
from minilora.models import LlamaConfig, LlamaForCausalLM
from minilora.train import TrainConfig, train
from minilora.train.evaluate import task_accuracy

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="runs/llama_budget", help="where results go")
parser.add_argument("--seeds", default="0,1,2",
                    help="comma-separated seeds (adapter init, batch order)")
parser.add_argument("--iters", type=int, default=300, help="fine-tuning steps per run")
parser.add_argument("--pretrain-iters", type=int, default=600, help="steps to pretrain the base")
parser.add_argument("--lr", type=float, default=5e-3, help="the fine-tuning learning rate")
parser.add_argument("--r", type=int, default=4, help="the rank of the seven-projection adapter")
parser.add_argument("--threads", type=int, help="engine threads (default: all CPUs)")
parser.add_argument("--small", action="store_true", help="a tiny model, few steps (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
seeds = [int(s) for s in args.seeds.split(",")]
iters, pretrain_iters, prompts, eval_iters = args.iters, args.pretrain_iters, 200, 40
block = 64
if small:
    seeds, iters, pretrain_iters, prompts, eval_iters, block = [0, 1], 8, 20, 8, 2, 32

# ---- 1. The base: a Llama-shaped model, pretrained here ------------------------------------------
tokenizer = builtin_tokenizer()
shape = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": block}
if small:
    shape = {**shape, "hidden_size": 32, "intermediate_size": 80, "num_hidden_layers": 1}
base_config = LlamaConfig(vocab_size=tokenizer.vocab_size, **shape)
print(f"pretraining a Llama ({base_config.num_hidden_layers} layers x {base_config.hidden_size}, "
      f"{base_config.num_attention_heads} query heads sharing {base_config.num_key_value_heads} "
      f"key/value heads, SwiGLU {base_config.intermediate_size}) on builtin:world for "
      f"{pretrain_iters} steps ...")
base = LlamaForCausalLM(base_config, seed=0)
pretrained = train(base, load_dataset("builtin:world", tokenizer=tokenizer),
                   TrainConfig(max_iters=pretrain_iters, lr=3e-3, min_lr=3e-4,
                               warmup_iters=pretrain_iters // 10, eval_interval=pretrain_iters,
                               eval_iters=10, seed=0, block_size=block), quiet=True,
                   threads=args.threads)
print(f"base: val loss {pretrained.val_loss:.3f} on world text, {pretrained.ms_per_step:.0f} "
      "ms/step")
base_weights = base.state_dict()


def per_layer(targets, r: int) -> int:
    """r (in + out) summed over one layer's ``targets``: what LoRA at rank r trains there."""
    c, i = base_config.hidden_size, base_config.intermediate_size
    q, kv = base_config.num_attention_heads * base_config.head_dim, \
        base_config.num_key_value_heads * base_config.head_dim
    sizes = {"q_proj": c + q, "k_proj": c + kv, "v_proj": c + kv, "o_proj": q + c,
             "gate_proj": c + i, "up_proj": c + i, "down_proj": i + c}
    return r * sum(sizes[t] for t in targets)


# the q, v rank that spends what all seven spend at rank r (exactly, or the run says so below)
r7 = args.r
r2 = per_layer(SEVEN, r7) // per_layer(("q_proj", "v_proj"), 1)
TARGETS = [("q_proj, v_proj", ("q_proj", "v_proj"), r2), ("all seven", SEVEN, r7)]


def adapted(targets, r: int, seed: int) -> LlamaForCausalLM:
    """A fresh copy of the base with LoRA on ``targets`` at rank r (alpha = 2r)."""
    model = LlamaForCausalLM(base_config, seed=seed)
    model.load_state_dict(base_weights)
    return apply_lora(model, LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets), rng=seed)


# ---- 2. Each target set, once per seed ----------------------------------------------------------
task_data = load_dataset("builtin:majority", tokenizer=tokenizer)
runs = []
for label, targets, r in TARGETS:
    for seed in seeds:
        model = adapted(targets, r, seed)
        budget = sum(c.lora_params for c in lora_parameter_counts(model))
        config = TrainConfig(max_iters=iters, lr=args.lr, min_lr=args.lr / 10,
                             warmup_iters=iters // 10, eval_interval=iters,
                             eval_iters=eval_iters, seed=seed, block_size=block)
        result = train(model, task_data, config, quiet=True, threads=args.threads)
        accuracy = task_accuracy(model, tokenizer, task_data.task, limit=prompts).accuracy
        runs.append({"targets": label, "r": r, "seed": seed, "params": budget,
                     "val_loss": result.val_loss, "exact_match": accuracy,
                     "ms_per_step": result.ms_per_step})
        print(f"{label:<15} r={r:<3} seed {seed}  trainable {budget:>7,}  "
              f"val loss {result.val_loss:.4f}  exact match {accuracy:.1%}  "
              f"{result.ms_per_step:.1f} ms/step")

# ---- 3. The table: mean and spread over the seeds -----------------------------------------------


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


table = [f"| LoRA on | r | trainable params | val loss (mean ± sd, {len(seeds)} seeds) "
         "| exact match (mean ± sd) | ms/step (median; indicative) |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
for label, _, _ in TARGETS:
    rows = [run for run in runs if run["targets"] == label]
    loss, loss_sd = mean_spread([run["val_loss"] for run in rows])
    match, match_sd = mean_spread([run["exact_match"] for run in rows])
    ms = statistics.median(run["ms_per_step"] for run in rows)
    table.append(f"| {label} | {rows[0]['r']} | {rows[0]['params']:,} | {loss:.3f} ± {loss_sd:.3f} "
                 f"| {match:.1%} ± {match_sd:.1%} | {ms:.1f} |")
print("\n" + "\n".join(table))
print(f"\n{len(runs)} runs of {iters} steps, batch 12 x {block} tokens; seeds {seeds}; exact "
      f"match on {prompts} held-out prompts; base val loss {pretrained.val_loss:.3f}")
settings = {"iters": iters, "pretrain_iters": pretrain_iters, "lr": args.lr, "prompts": prompts,
            "eval_iters": eval_iters, "block_size": block, "seeds": seeds,
            "model": base_config.to_dict(), "base_val_loss": pretrained.val_loss}
(out / "llama_budget.json").write_text(json.dumps({"settings": settings, "runs": runs},
                                                  indent=2))
(out / "llama_budget.md").write_text("\n".join(table) + "\n")
budgets = {run["params"] for run in runs}
assert len(budgets) == 1, f"the target sets spent different budgets: {budgets}"
print(f"both target sets train {budgets.pop():,} parameters: one budget")
print(f"wrote {out / 'llama_budget.md'} and {out / 'llama_budget.json'}")
