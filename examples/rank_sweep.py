"""How much rank does fine-tuning need? LoRA at r = 1 ... 64 against full fine-tuning.

    minilora train --data builtin:world --out runs/base --max-iters 600     # a base, once
    python examples/rank_sweep.py --base runs/base --out runs/rank_sweep    # 8 runs, 17 min
    python examples/rank_sweep.py --small                                   # a few seconds

The LoRA paper (Hu et al. 2021, section 7.2 and Table 6) found that a very small rank already
matches larger ones: adapting GPT-3's attention with r = 1 was about as good as r = 64. This example
asks the same question of a small GPT on the built-in task (name the category most of a list of
words belong to):

1. The base: a GPT pretrained on ``builtin:world`` (``--base DIR``, or pretrained here).
2. For each rank, a fresh copy of the base with LoRA on ``c_attn`` and ``c_proj`` (alpha = 2r, so
   s = 2 at every rank; ``--alpha 16`` fixes alpha instead, as the paper did), fine-tuned on
   ``builtin:majority`` for the same steps, batches and learning rate.
3. Full fine-tuning of another copy, for reference.
4. A table (markdown) and a PNG: validation loss and exact match against the rank and against the
   number of trainable parameters.
"""

import argparse
import json
import os
import time
from pathlib import Path

from minilora.data import builtin_tokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, load_run, train
from minilora.train.evaluate import task_accuracy

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base", help="a full-model run directory to start from (default: pretrain)")
parser.add_argument("--out", default="runs/rank_sweep", help="where results go")
parser.add_argument("--plot", help="the PNG to write (default: OUT/rank_sweep.png)")
parser.add_argument("--ranks", default="1,2,4,8,16,32,64", help="comma-separated ranks")
parser.add_argument("--iters", type=int, default=300, help="fine-tuning steps per run")
parser.add_argument("--alpha", default="2r", help="'2r' (s = 2 at every rank) or a number")
parser.add_argument("--rslora", action="store_true", help="s = alpha / sqrt(r)")
parser.add_argument("--seed", type=int, default=0, help="adapter init and batch order")
parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
parser.add_argument("--small", action="store_true", help="a tiny model, few steps (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
ranks = [int(r) for r in args.ranks.split(",")]
iters, prompts, eval_iters = args.iters, 200, 40
if small:
    ranks, iters, prompts, eval_iters = [1, 4], 20, 10, 4

# ---- 1. The base --------------------------------------------------------------------------------
tokenizer = builtin_tokenizer()
task_data = load_dataset("builtin:majority", tokenizer=tokenizer)   # train/val token ids, a task
if args.base:
    base = load_run(args.base).model
    print(f"base: {args.base}, {base.num_parameters():,} parameters")
else:
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32} if small else \
        {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
    steps = 60 if small else 600
    print(f"pretraining a base on builtin:world for {steps} steps ...")
    base = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **shape), seed=0)
    train(base, load_dataset("builtin:world", tokenizer=tokenizer),
          TrainConfig(max_iters=steps, lr=1e-3, min_lr=1e-4, warmup_iters=steps // 10,
                      eval_interval=steps, eval_iters=10, seed=0), quiet=True)
base_config, base_weights = base.config, base.state_dict()


def fresh_base() -> GPT:
    """A new model holding the base's weights: every run starts from the same point."""
    model = GPT(base_config, seed=args.seed)
    model.load_state_dict(base_weights)
    return model


def finetune(model: GPT, lr: float) -> dict:
    """Train ``model``'s trainable parameters on the task; the same batches for every run."""
    config = TrainConfig(max_iters=iters, lr=lr, min_lr=lr / 10, warmup_iters=iters // 10,
                         eval_interval=iters, eval_iters=eval_iters, seed=args.seed)
    result = train(model, task_data, config, quiet=True)
    accuracy = task_accuracy(model, tokenizer, task_data.task, limit=prompts).accuracy
    return {"trainable": model.num_parameters(trainable_only=True),
            "total": model.num_parameters(), "val_loss": result.val_loss,
            "exact_match": accuracy, "ms_per_step": result.ms_per_step}


# ---- 2. LoRA at each rank, and 3. full fine-tuning ---------------------------------------------
rows = []
start = time.perf_counter()
for r in ranks:
    alpha = 2 * r if args.alpha == "2r" else float(args.alpha)
    config = LoRAConfig(r=r, lora_alpha=alpha, target_modules=["c_attn", "c_proj"],
                        use_rslora=args.rslora)
    model = apply_lora(fresh_base(), config, rng=args.seed)        # A random, B = 0
    row = {"method": f"LoRA r={r}", "r": r, "alpha": alpha, **finetune(model, lr=5e-3)}
    rows.append(row)
    print(f"{row['method']:<12} alpha {alpha:<5g} trainable {row['trainable']:>8,}  "
          f"val loss {row['val_loss']:.4f}  exact match {row['exact_match']:.1%}")
if not args.no_full:
    row = {"method": "full fine-tuning", "r": None, "alpha": None,
           **finetune(fresh_base(), lr=2e-3)}                      # every parameter trains
    rows.append(row)
    print(f"{row['method']:<12} trainable {row['trainable']:>8,}  val loss {row['val_loss']:.4f}  "
          f"exact match {row['exact_match']:.1%}")
elapsed = time.perf_counter() - start

# ---- 4. The table and the plot ------------------------------------------------------------------
table = ["| method | trainable params | % of model | val loss | exact match | ms/step |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
for row in rows:
    table.append(f"| {row['method']} | {row['trainable']:,} | "
                 f"{100 * row['trainable'] / row['total']:.2f}% | {row['val_loss']:.3f} | "
                 f"{row['exact_match']:.1%} | {row['ms_per_step']:.0f} |")
print("\n" + "\n".join(table))
print(f"\n{len(rows)} runs of {iters} steps in {elapsed:.0f} s; exact match on {prompts} "
      f"held-out prompts")
settings = {"iters": iters, "prompts": prompts, "eval_iters": eval_iters, "alpha": args.alpha,
            "rslora": args.rslora, "seed": args.seed, "base": args.base,
            "model": base_config.to_dict(), "elapsed_s": elapsed}
(out / "rank_sweep.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
(out / "rank_sweep.md").write_text("\n".join(table) + "\n")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no plot (pip install 'minilora[plot]')")
    raise SystemExit(0) from None

lora_rows = [row for row in rows if row["r"] is not None]
full = None if args.no_full else rows[-1]
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for ax, x_key, y_key, label in ((axes[0], "r", "val_loss", "validation loss"),
                                (axes[1], "r", "exact_match", "exact match (held-out prompts)"),
                                (axes[2], "trainable", "val_loss", "validation loss")):
    xs = [row[x_key] for row in lora_rows]
    ax.plot(xs, [row[y_key] for row in lora_rows], "o-", label="LoRA")
    if x_key == "r":
        if full:
            ax.axhline(full[y_key], color="C3", linestyle="--", label="full fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel("rank r")
    else:
        if full:
            ax.plot([full["trainable"]], [full[y_key]], "s", color="C3", label="full fine-tuning")
        for row in lora_rows:
            ax.annotate(f"r={row['r']}", (row["trainable"], row[y_key]), fontsize=8,
                        textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
axes[1].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
scaling = "alpha = 2r" if args.alpha == "2r" else f"alpha = {float(args.alpha):g}"
scaling += ", s = alpha / sqrt(r)" if args.rslora else ", s = alpha / r"
fig.suptitle(f"LoRA rank sweep on builtin:majority ({iters} steps; {scaling}; base "
             f"{base_config.n_layer}x{base_config.n_embd})")
fig.tight_layout()
plot = Path(args.plot) if args.plot else out / "rank_sweep.png"
plot.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(plot, dpi=110)
print(f"wrote {plot}, {out / 'rank_sweep.md'} and {out / 'rank_sweep.json'}")
