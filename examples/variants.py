"""LoRA and its variants at one rank: PiSSA, OLoRA, LoRA+, DoRA on the built-in task, over seeds.

    python examples/variants.py --out runs/variants             # 5 variants x 3 seeds, + a base
    python examples/variants.py --base runs/base --seeds 0,1,2   # from your own base
    python examples/variants.py --small                          # a few seconds (CI)

Each variant is a line of ``VARIANTS``: the settings it changes, LoRAConfig's or TrainConfig's
fields by name (docs/variants.md derives each). At the same rank, targets, steps, learning rate
and seeds:

1. The base: a GPT pretrained on ``builtin:world`` (``--base DIR``, or pretrained here).
2. Each variant fine-tuned on ``builtin:majority``, once per seed (adapter initialisation where
   it is random, and the batch order): validation loss, exact match on held-out prompts, and the
   median time per step.
3. A table (markdown) with the mean and the sample standard deviation over the seeds.
"""

import argparse
import dataclasses
import json
import os
import statistics
from pathlib import Path

from minilora.data import builtin_tokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, train
from minilora.train.evaluate import task_accuracy

# variant -> the settings it changes (LoRAConfig or TrainConfig fields); one line each
VARIANTS = {
    "lora": {},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "loraplus": {"loraplus_lr_ratio": 16},
    "dora": {"use_dora": True},
}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base", help="a full-model run directory to start from (default: pretrain)")
parser.add_argument("--out", default="runs/variants", help="where results go")
parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
parser.add_argument("--iters", type=int, default=300, help="fine-tuning steps per run")
parser.add_argument("--lr", type=float, default=5e-3, help="the fine-tuning learning rate")
parser.add_argument("--r", type=int, default=4, help="the rank, for every variant")
parser.add_argument("--prompts", type=int, default=200, help="held-out prompts for exact match")
parser.add_argument("--width", type=int, default=128, help="the base's n_embd")
parser.add_argument("--layers", type=int, default=4, help="the base's n_layer")
parser.add_argument("--threads", type=int, help="the engine's threads (default: all CPUs)")
parser.add_argument("--base-iters", type=int, default=600, help="the base's pretraining steps")
parser.add_argument("--small", action="store_true", help="a tiny model, few steps (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
seeds = [int(s) for s in args.seeds.split(",")]
iters, prompts, eval_iters, r = args.iters, args.prompts, 40, args.r
if small:
    seeds, iters, prompts, eval_iters = [0, 1], 10, 8, 2

# ---- 1. The base --------------------------------------------------------------------------------
tokenizer = builtin_tokenizer()
task_data = load_dataset("builtin:majority", tokenizer=tokenizer)
if args.base:
    from minilora.train import load_run

    base = load_run(args.base).model
    print(f"base: {args.base}, {base.num_parameters():,} parameters")
else:
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32} if small else \
        {"n_layer": args.layers, "n_head": 4, "n_embd": args.width, "block_size": 64}
    steps = 40 if small else args.base_iters
    print(f"pretraining a base on builtin:world for {steps} steps ...")
    base = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **shape), seed=0)
    train(base, load_dataset("builtin:world", tokenizer=tokenizer),
          TrainConfig(max_iters=steps, lr=1e-3, min_lr=1e-4, warmup_iters=steps // 10,
                      eval_interval=steps, eval_iters=10, seed=0), quiet=True,
          threads=args.threads)
base_config, base_weights = base.config, base.state_dict()


def run(settings: dict, seed: int) -> dict:
    """A fresh copy of the base with the variant's adapter (r, alpha = 2r, on c_attn and c_proj),
    fine-tuned; its numbers."""
    model = GPT(base_config, seed=seed)
    model.load_state_dict(base_weights)
    lora = {k: v for k, v in settings.items() if k not in TRAIN_FIELDS}
    apply_lora(model, LoRAConfig(r=r, lora_alpha=2 * r, target_modules=("c_attn", "c_proj"),
                                 **lora), rng=seed)
    config = TrainConfig(max_iters=iters, lr=args.lr, min_lr=args.lr / 10,
                         warmup_iters=iters // 10, eval_interval=iters, eval_iters=eval_iters,
                         seed=seed, **{k: v for k, v in settings.items() if k in TRAIN_FIELDS})
    result = train(model, task_data, config, quiet=True, threads=args.threads)
    accuracy = task_accuracy(model, tokenizer, task_data.task, limit=prompts).accuracy
    return {"val_loss": result.val_loss, "exact_match": accuracy,
            "ms_per_step": result.ms_per_step}


# ---- 2. Each variant, once per seed -------------------------------------------------------------
runs = []
for name, settings in VARIANTS.items():
    for seed in seeds:
        numbers = run(settings, seed)
        runs.append({"variant": name, "seed": seed, **numbers})
        print(f"{name:<9} seed {seed}  val loss {numbers['val_loss']:.4f}  exact match "
              f"{numbers['exact_match']:.1%}  {numbers['ms_per_step']:.1f} ms/step")

# ---- 3. The table: mean and spread over the seeds -----------------------------------------------


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


table = [f"| variant | settings | val loss (mean ± sd, {len(seeds)} seeds) | exact match "
         "(mean ± sd) | ms/step (mean ± sd) |", "| --- | --- | ---: | ---: | ---: |"]
for name, settings in VARIANTS.items():
    rows = [x for x in runs if x["variant"] == name]
    cells = [mean_spread([x[k] for x in rows]) for k in ("val_loss", "exact_match",
                                                           "ms_per_step")]
    shown = ", ".join(f"{k}={v!r}" for k, v in settings.items()) or "(plain LoRA)"
    table.append(f"| {name} | `{shown}` | {cells[0][0]:.3f} ± {cells[0][1]:.3f} | "
                 f"{cells[1][0]:.1%} ± {cells[1][1]:.1%} | {cells[2][0]:.1f} ± {cells[2][1]:.1f} |")
print("\n" + "\n".join(table))
print(f"\n{len(runs)} runs of {iters} steps at r={r} (alpha {2 * r}) on c_attn, c_proj; seeds "
      f"{seeds}; exact match on {prompts} held-out prompts; base "
      f"{base_config.n_layer}x{base_config.n_embd}")
meta = {"iters": iters, "lr": args.lr, "r": r, "prompts": prompts, "eval_iters": eval_iters,
        "seeds": seeds, "base": args.base, "model": base_config.to_dict(),
        "variants": VARIANTS}
(out / "variants.json").write_text(json.dumps({"settings": meta, "runs": runs}, indent=2))
(out / "variants.md").write_text("\n".join(table) + "\n")
print(f"wrote {out / 'variants.md'} and {out / 'variants.json'}")
