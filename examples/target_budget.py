"""Which weights to adapt for a fixed budget? The LoRA paper's Table 5 at CPU scale.

    python examples/target_budget.py --out runs/target_budget             # 4 x 3 runs, + a base
    python examples/target_budget.py --base runs/base --seeds 0,1,2,3,4   # from your own base
    python examples/target_budget.py --small                              # a few seconds (CI)

The LoRA paper (Hu et al. 2021, section 7.1, Table 5) fixed the number of trainable parameters
and asked where to spend it in GPT-3's attention: on W_q alone at r = 8, on W_q and W_v at r = 4,
or on W_q, W_k, W_v and W_o at r = 2. Adapting W_q and W_v was best. GPT-2 fuses W_q, W_k and W_v
into one ``c_attn``, so adapting "q and v" needs adapters on two slices of it (``target_slices``,
``GPT.lora_targets("q,v")``). This example asks the paper's question of a small GPT on the
built-in task (name the category most of a list of words belong to):

1. The base: a GPT pretrained on ``builtin:world`` (``--base DIR``, or pretrained here).
2. Four target sets at one budget: {q} at r = 36, {q, v} at r = 18, {q, k, v, o} at r = 9 and
   {all} (q, k, v, o and the MLP's c_fc and c_proj) at r = 4, each 72 n_embd parameters per
   block (each slice and each matrix its own adapter; alpha = 2r, so s = 2 everywhere), fine-tuned
   on ``builtin:majority`` for the same steps and learning rate, once per seed.
3. A table (markdown) with the mean and the spread (sample standard deviation) over the seeds.
"""

import argparse
import json
import os
import statistics
from pathlib import Path

from minilora.data import builtin_tokenizer, load_dataset
from minilora.lora import LoRAConfig, apply_lora, lora_parameter_counts
from minilora.models import GPT, GPTConfig
from minilora.train import TrainConfig, load_run, train
from minilora.train.evaluate import task_accuracy

# the paper's target sets, each with the rank that spends 72 n_embd parameters per block
TARGETS = [("{q}", "q", 36), ("{q, v}", "q,v", 18), ("{q, k, v, o}", "q,k,v,o", 9),
           ("{all}", "all", 4)]

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--base", help="a full-model run directory to start from (default: pretrain)")
parser.add_argument("--out", default="runs/target_budget", help="where results go")
parser.add_argument("--seeds", default="0,1,2",
                    help="comma-separated seeds (adapter init, batch order)")
parser.add_argument("--iters", type=int, default=300, help="fine-tuning steps per run")
parser.add_argument("--lr", type=float, default=5e-3, help="the fine-tuning learning rate")
parser.add_argument("--small", action="store_true", help="a tiny model, few steps (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
seeds = [int(s) for s in args.seeds.split(",")]
iters, prompts, eval_iters = args.iters, 200, 40
if small:
    seeds, iters, prompts, eval_iters = [0, 1], 10, 8, 2  # the same ranks on a tiny model

# ---- 1. The base --------------------------------------------------------------------------------
tokenizer = builtin_tokenizer()
task_data = load_dataset("builtin:majority", tokenizer=tokenizer)
if args.base:
    base = load_run(args.base).model
    print(f"base: {args.base}, {base.num_parameters():,} parameters")
else:
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32} if small else \
        {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64}
    steps = 40 if small else 600
    print(f"pretraining a base on builtin:world for {steps} steps ...")
    base = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **shape), seed=0)
    train(base, load_dataset("builtin:world", tokenizer=tokenizer),
          TrainConfig(max_iters=steps, lr=1e-3, min_lr=1e-4, warmup_iters=steps // 10,
                      eval_interval=steps, eval_iters=10, seed=0), quiet=True)
base_config, base_weights = base.config, base.state_dict()


def adapted(roles: str, r: int, seed: int) -> GPT:
    """A fresh copy of the base with LoRA on the paper's ``roles`` at rank r (alpha = 2r)."""
    model = GPT(base_config, seed=seed)
    model.load_state_dict(base_weights)
    return apply_lora(model, LoRAConfig(r=r, lora_alpha=2 * r, **GPT.lora_targets(roles)),
                      rng=seed)


# ---- 2. Each target set, once per seed ----------------------------------------------------------
runs = []
for label, roles, r in TARGETS:
    for seed in seeds:
        model = adapted(roles, r, seed)
        budget = sum(c.lora_params for c in lora_parameter_counts(model))
        config = TrainConfig(max_iters=iters, lr=args.lr, min_lr=args.lr / 10,
                             warmup_iters=iters // 10, eval_interval=iters,
                             eval_iters=eval_iters, seed=seed)
        result = train(model, task_data, config, quiet=True)
        accuracy = task_accuracy(model, tokenizer, task_data.task, limit=prompts).accuracy
        runs.append({"targets": label, "roles": roles, "r": r, "seed": seed, "params": budget,
                     "val_loss": result.val_loss, "exact_match": accuracy})
        print(f"{label:<13} r={r:<3} seed {seed}  trainable {budget:>7,}  "
              f"val loss {result.val_loss:.4f}  exact match {accuracy:.1%}")

# ---- 3. The table: mean and spread over the seeds -----------------------------------------------


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


table = [f"| weights adapted | r | trainable params | val loss (mean ± sd, {len(seeds)} seeds) "
         f"| exact match (mean ± sd) |", "| --- | ---: | ---: | ---: | ---: |"]
for label, _, _ in TARGETS:
    rows = [run for run in runs if run["targets"] == label]
    loss, loss_sd = mean_spread([run["val_loss"] for run in rows])
    match, match_sd = mean_spread([run["exact_match"] for run in rows])
    table.append(f"| {label} | {rows[0]['r']} | {rows[0]['params']:,} | {loss:.3f} ± {loss_sd:.3f} "
                 f"| {match:.1%} ± {match_sd:.1%} |")
print("\n" + "\n".join(table))
print(f"\n{len(runs)} runs of {iters} steps; seeds {seeds}; exact match on {prompts} held-out "
      f"prompts; base {base_config.n_layer}x{base_config.n_embd}")
settings = {"iters": iters, "lr": args.lr, "prompts": prompts, "eval_iters": eval_iters,
            "seeds": seeds, "base": args.base, "model": base_config.to_dict()}
(out / "target_budget.json").write_text(json.dumps({"settings": settings, "runs": runs},
                                                   indent=2))
(out / "target_budget.md").write_text("\n".join(table) + "\n")
budgets = {run["params"] for run in runs}
assert len(budgets) == 1, f"the target sets spent different budgets: {budgets}"
print(f"every target set trains {budgets.pop():,} parameters: one budget, as in Table 5")
print(f"wrote {out / 'target_budget.md'} and {out / 'target_budget.json'}")
