"""How much rank does fine-tuning need? LoRA at r = 1 ... 64 against full fine-tuning.

    minilora train --data builtin:world --out runs/base --max-iters 600     # a base, once
    python examples/rank_sweep.py --base runs/base --out runs/rank_sweep    # 8 runs, ~15 min
    python examples/rank_sweep.py --base runs/base --seeds 0,1,2,3,4 --alpha 2r,16   # the docs'
    python examples/rank_sweep.py --small                                   # a few seconds

The LoRA paper (Hu et al. 2021, section 7.2 and Table 6) found that a very small rank already
matches larger ones: adapting GPT-3's {W_q, W_v}, or all four attention matrices, with r = 1 was
about as good as r = 64 (W_q alone needed more). This example asks the same question of a small
GPT on the built-in task (name the category most of a list of words belong to):

1. The base: a GPT pretrained on ``builtin:world`` (``--base DIR``, or pretrained here).
2. For each rank, a fresh copy of the base with LoRA on every module whose name ends in ``c_attn``
   or ``c_proj`` (the fused q, k, v projection, the attention output and the MLP's output; alpha =
   2r, so s = 2 at every rank; ``--alpha 16`` fixes alpha instead, as the paper did), fine-tuned on
   ``builtin:majority`` for the same steps, batches and learning rate.
3. Full fine-tuning of another copy, for reference.
4. Steps 2 and 3 again for each seed of ``--seeds`` (the seed sets the adapter's initial A and the
   order of the batches; the base stays the same), so that a difference can be read against the
   spread between seeds.
5. A table (markdown; mean and sample standard deviation over the seeds, and each seed's exact
   match; with two ``--alpha`` rules, also the second minus the first, seed by seed) and a PNG:
   validation loss and exact match against the rank and against the number of trainable
   parameters, the mean with a bar from the lowest to the highest seed.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

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
parser.add_argument("--alpha", default="2r",
                    help="comma-separated: '2r' (s = 2 at every rank) and/or numbers, e.g. 2r,16")
parser.add_argument("--rslora", action="store_true", help="s = alpha / sqrt(r)")
parser.add_argument("--seeds", default="0",
                    help="comma-separated seeds (adapter init and batch order), e.g. 0,1,2")
parser.add_argument("--no-full", action="store_true", help="skip full fine-tuning")
parser.add_argument("--small", action="store_true", help="a tiny model, few steps (for CI)")
args = parser.parse_args()
small = args.small or os.environ.get("MINILORA_EXAMPLE_SMALL", "0") not in ("", "0")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
ranks = [int(r) for r in args.ranks.split(",")]
alphas = args.alpha.split(",")
seeds = [int(seed) for seed in args.seeds.split(",")]
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


def fresh_base(seed: int) -> GPT:
    """A new model holding the base's weights: every run starts from the same point."""
    model = GPT(base_config, seed=seed)
    model.load_state_dict(base_weights)
    return model


def finetune(model: GPT, lr: float, seed: int) -> dict:
    """Train ``model``'s trainable parameters on the task; the same batches for every run."""
    config = TrainConfig(max_iters=iters, lr=lr, min_lr=lr / 10, warmup_iters=iters // 10,
                         eval_interval=iters, eval_iters=eval_iters, seed=seed)
    result = train(model, task_data, config, quiet=True)
    accuracy = task_accuracy(model, tokenizer, task_data.task, limit=prompts).accuracy
    return {"seed": seed, "trainable": model.num_parameters(trainable_only=True),
            "total": model.num_parameters(), "val_loss": result.val_loss,
            "exact_match": accuracy, "ms_per_step": result.ms_per_step}


# ---- 2. LoRA at each rank, and 3. full fine-tuning, 4. for every seed -------------------------
# Each finished run is appended to OUT/runs.jsonl; a rerun with the same settings reuses them,
# so an interrupted sweep resumes and more seeds can be added later.
settings = {"iters": iters, "prompts": prompts, "eval_iters": eval_iters, "rslora": args.rslora,
            "base": args.base, "model": base_config.to_dict()}
log = out / "runs.jsonl"
done = {}
if log.exists():
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.pop("settings") == settings:
            done[(record["method"], record["alpha_rule"], record["seed"])] = record


def run_once(method: str, alpha_rule: str | None, seed: int, config: LoRAConfig | None,
             lr: float, **info) -> dict:
    """The run's record from OUT/runs.jsonl, or fine-tune the base (with LoRA if ``config``) and
    append its record."""
    record = done.get((method, alpha_rule, seed))
    if record is None:
        model = fresh_base(seed)
        if config is not None:
            model = apply_lora(model, config, rng=seed)             # A random, B = 0
        record = {"method": method, "alpha_rule": alpha_rule, **info,
                  **finetune(model, lr=lr, seed=seed)}
        with log.open("a") as f:
            f.write(json.dumps({**record, "settings": settings}) + "\n")
    alpha = "" if record["alpha"] is None else f"alpha {record['alpha']:<5g}"
    print(f"seed {seed}  {method:<16} {alpha:<11} trainable {record['trainable']:>8,}  val loss "
          f"{record['val_loss']:.4f}  exact match {record['exact_match']:.1%}", flush=True)
    return record


runs = []   # one dict per (method, alpha, seed)
start = time.perf_counter()
for seed in seeds:
    for alpha_rule in alphas:
        for r in ranks:
            alpha = 2 * r if alpha_rule == "2r" else float(alpha_rule)
            config = LoRAConfig(r=r, lora_alpha=alpha, target_modules=["c_attn", "c_proj"],
                                use_rslora=args.rslora)
            scaling = alpha / r ** 0.5 if args.rslora else alpha / r
            runs.append(run_once(f"LoRA r={r}", alpha_rule, seed, config, lr=5e-3, r=r,
                                 alpha=alpha, scaling=scaling))
    if not args.no_full:                                              # every parameter trains
        runs.append(run_once("full fine-tuning", None, seed, None, lr=2e-3, r=None, alpha=None,
                             scaling=None))
elapsed = time.perf_counter() - start


# ---- 5. Mean and spread over the seeds: the table and the plot ----------------------------------
def summarise(group: list) -> dict:
    """One row from the runs of one method at every seed: mean, sample std, min and max."""
    row = {k: group[0][k] for k in ("method", "r", "alpha_rule", "alpha", "scaling", "trainable",
                                    "total")}
    for key in ("val_loss", "exact_match"):
        values = np.array([run[key] for run in group])
        row[key] = {"mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else 0.0,
                    "min": values.min(), "max": values.max(), "each": values.tolist()}
    return row


keys = list(dict.fromkeys((run["method"], run["alpha_rule"]) for run in runs))
rows = [summarise([run for run in runs if (run["method"], run["alpha_rule"]) == key])
        for key in keys]
pm = "±" if len(seeds) > 1 else ""
table = ["| method | alpha | s | trainable params | % of all params | val loss | exact match "
         "| exact match, each seed |",
         "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
for row in rows:
    loss, match = row["val_loss"], row["exact_match"]
    spread = (f" {pm} {loss['std']:.3f}", f" {pm} {100 * match['std']:.1f}") if pm else ("", "")
    alpha = "" if row["alpha"] is None else f"{row['alpha']:g}"
    scaling = "" if row["scaling"] is None else f"{row['scaling']:g}"
    table.append(f"| {row['method']} | {alpha} | {scaling} | {row['trainable']:,} | "
                 f"{100 * row['trainable'] / row['total']:.2f}% | {loss['mean']:.3f}{spread[0]} | "
                 f"{100 * match['mean']:.1f}%{spread[1]} | "
                 f"{', '.join(f'{100 * m:.1f}' for m in match['each'])} |")
if len(alphas) == 2:  # the same seed sees the same batches: compare the two rules seed by seed
    first, second = alphas
    table += ["", f"| rank | s with alpha = {second} | val loss, alpha = {second} minus alpha = "
              f"{first}, each seed | exact match, alpha = {second} minus alpha = {first}, each "
              "seed (points) |", "| ---: | ---: | --- | --- |"]
    by_key = {(run["r"], run["alpha_rule"], run["seed"]): run for run in runs}
    for r in ranks:
        pairs = [(by_key[(r, second, seed)], by_key[(r, first, seed)]) for seed in seeds]
        if pairs[0][0]["scaling"] == pairs[0][1]["scaling"]:
            continue  # the same run under both rules
        loss = ", ".join(f"{a['val_loss'] - b['val_loss']:+.3f}" for a, b in pairs)
        match = ", ".join(f"{100 * (a['exact_match'] - b['exact_match']):+.1f}" for a, b in pairs)
        table.append(f"| {r} | {pairs[0][0]['scaling']:g} | {loss} | {match} |")
print("\n" + "\n".join(table))
reused = sum(1 for run in runs if (run["method"], run["alpha_rule"], run["seed"]) in done)
print(f"\n{len(runs)} runs of {iters} steps ({len(runs) - reused} run now, in {elapsed:.0f} s; "
      f"{reused} read from {log}); exact match on {prompts} held-out prompts; seeds {args.seeds}"
      + (" (mean ± sample standard deviation)" if pm else ""))
settings = {**settings, "alpha": args.alpha, "seeds": seeds, "elapsed_s": elapsed}
(out / "rank_sweep.json").write_text(json.dumps({"settings": settings, "rows": rows,
                                                 "runs": runs}, indent=2, default=float))
(out / "rank_sweep.md").write_text("\n".join(table) + "\n")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: no plot (pip install 'minilora[plot]')")
    raise SystemExit(0) from None

full = next((row for row in rows if row["r"] is None), None)
fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for ax, x_key, y_key, label in ((axes[0], "r", "val_loss", "validation loss"),
                                (axes[1], "r", "exact_match", "exact match (held-out prompts)"),
                                (axes[2], "trainable", "val_loss", "validation loss")):
    for n, alpha_text in enumerate(alphas):
        lora_rows = [row for row in rows if row["alpha_rule"] == alpha_text]
        xs = np.array([row[x_key] for row in lora_rows], dtype=float)
        mean = np.array([row[y_key]["mean"] for row in lora_rows])
        low = mean - [row[y_key]["min"] for row in lora_rows]
        high = [row[y_key]["max"] for row in lora_rows] - mean
        name = "alpha = 2r" if alpha_text == "2r" else f"alpha = {float(alpha_text):g}"
        ax.errorbar(xs * 1.04 ** n, mean, yerr=[low, high], fmt="o-", capsize=3,
                    color=f"C{n}", label=f"LoRA, {name}")
    if x_key == "r":
        if full:
            ax.axhline(full[y_key]["mean"], color="C3", linestyle="--", label="full fine-tuning")
            ax.axhspan(full[y_key]["min"], full[y_key]["max"], color="C3", alpha=0.1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
    else:
        if full:
            ax.errorbar([full["trainable"]], [full[y_key]["mean"]], fmt="s", color="C3",
                        yerr=[[full[y_key]["mean"] - full[y_key]["min"]],
                              [full[y_key]["max"] - full[y_key]["mean"]]],
                        capsize=3, label="full fine-tuning")
        for row in rows:
            if row["r"] is not None and row["alpha_rule"] == alphas[0]:
                ax.annotate(f"r={row['r']}", (row["trainable"], row[y_key]["mean"]), fontsize=8,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
axes[1].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
scaling = "s = alpha / sqrt(r)" if args.rslora else "s = alpha / r"
fig.suptitle(f"LoRA rank sweep on builtin:majority ({iters} steps; {scaling}; base "
             f"{base_config.n_layer}x{base_config.n_embd}; {len(seeds)} seed(s): mean, bars "
             f"from lowest to highest)")
fig.tight_layout()
plot = Path(args.plot) if args.plot else out / "rank_sweep.png"
plot.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(plot, dpi=110)
print(f"wrote {plot}, {out / 'rank_sweep.md'} and {out / 'rank_sweep.json'}")
