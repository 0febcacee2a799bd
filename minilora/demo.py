"""The main job: pretrain a small GPT, fine-tune it in full and with LoRA, compare, merge.

1. Pretrain a base on ``builtin:world`` (English-like prose).
2. Fine-tune it on ``builtin:majority`` (name the category most listed words belong to): once in
   full, and with LoRA at ranks 1, 4 and 16 (alpha = 2r, on ``c_attn`` and ``c_proj``).
3. One table: trainable parameters, validation loss, exact match on held-out prompts, time and
   peak memory per training step.
4. Merge the best adapter (W' = W + s B A), check merged and unmerged logits agree, and time
   inference of the base, the unmerged adapter and the merged model.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minilora.data import ExactMatch, Task, load_dataset
from minilora.errors import ConfigError
from minilora.lora import LoRAConfig, merge_and_unload
from minilora.ops.backend import parallel
from minilora.tensor import no_grad
from minilora.train import TrainConfig, load_run, runs
from minilora.train.checkpoint import CHECKPOINT
from minilora.train.memory import measure_step


@dataclass(frozen=True)
class DemoPlan:
    model: dict
    pretrain_iters: int
    finetune_iters: int
    ranks: tuple[int, ...]
    full_lr: float
    lora_lr: float
    eval_iters: int
    task_prompts: int | None
    batch_size: int = 12


FULL = DemoPlan(model={"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
                pretrain_iters=600, finetune_iters=300, ranks=(1, 4, 16), full_lr=2e-3,
                lora_lr=5e-3, eval_iters=20, task_prompts=None)
QUICK = DemoPlan(model={"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64},
                 pretrain_iters=150, finetune_iters=60, ranks=(1, 4, 16), full_lr=2e-3,
                 lora_lr=5e-3, eval_iters=4, task_prompts=50)


def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The greedy continuation of each prompt; prompts of one length run as one batch."""
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    out = [""] * len(prompts)
    for length, members in by_length.items():
        idx = np.stack([encoded[i] for i in members])  # (B, T)
        new = model.generate(idx, max_new_tokens, temperature=0)[:, length:]
        for i, row in zip(members, new, strict=True):
            out[i] = tokenizer.decode(row)
    return out


def task_accuracy(model, tokenizer, task: Task, limit: int | None = None) -> ExactMatch:
    """Exact match of greedy completions on the task's held-out prompts."""
    return task.evaluate(lambda ps, n: greedy_completions(model, tokenizer, ps, n), limit)


def _prepare(out: Path, names: list[str]) -> None:
    """Clear what an earlier demo left in ``out``; refuse to touch anything else."""
    for name in names:
        d = out / name
        if d.exists():
            if not (d / CHECKPOINT).exists() and any(d.iterdir()):
                raise ConfigError(f"demo: {d} exists and is not a minilora run; choose another "
                                  "--out")
            shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _memory(run_dir: Path, data, plan: DemoPlan) -> int:
    """Peak bytes of one training step of the run's model (full or LoRA), by tracemalloc."""
    from minilora.optim import AdamW, param_groups

    model = load_run(run_dir).model.train()
    if "lora_config" not in model.__dict__:
        model.requires_grad_(True)
    opt = AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-9)
    rng = np.random.default_rng(0)
    x, y = data.get_batch("train", plan.batch_size, model.config.block_size, rng)
    _, loss = model(x, y)
    loss.backward()
    opt.step()  # so the optimizer state exists, as during training
    opt.zero_grad()
    return measure_step(model, x, y, opt).peak


def _time_forward(model, x, repeats: int = 7) -> float:
    with no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def run_demo(out_dir="minilora-demo", quick: bool = False, seed: int = 0, quiet: bool = False,
             threads: int | None = None) -> dict:
    """Run the whole comparison, print it, save it in ``out_dir``, and return the results."""
    plan = QUICK if quick else FULL
    out = Path(out_dir)
    methods = ["full"] + [f"lora-r{r}" for r in plan.ranks]
    _prepare(out, ["base", *methods, "merged"])
    t_start = time.perf_counter()

    common = {"batch_size": plan.batch_size, "eval_iters": plan.eval_iters, "seed": seed,
              "weight_decay": 0.1}
    _say(f"1/4 pretraining a {plan.model['n_layer']}-layer, {plan.model['n_embd']}-wide GPT on "
         f"builtin:world for {plan.pretrain_iters} steps ...")
    pre_cfg = TrainConfig(max_iters=plan.pretrain_iters, lr=1e-3, min_lr=1e-4,
                          warmup_iters=plan.pretrain_iters // 10,
                          eval_interval=plan.pretrain_iters, **common)
    base = runs.pretrain("builtin:world", out / "base", plan.model, pre_cfg, quiet=quiet,
                         threads=threads)
    _say(f"    base: val loss {base.val_loss:.3f} on world text, {base.ms_per_step:.0f} ms/step")

    base_run = load_run(out / "base")
    base_model = base_run.model
    tokenizer = runs.load_base(out / "base")[1]
    task_data = load_dataset("builtin:majority", tokenizer=tokenizer, seed=runs.DATA_SEED)
    task = task_data.task
    with parallel(threads):
        base_acc = task_accuracy(base_model, tokenizer, task, plan.task_prompts)
        base_loss = _val_loss(base_model, task_data, plan)

    rows = [{"method": "base (no fine-tuning)", "trainable": 0,
             "total": base_model.num_parameters(), "val_loss": base_loss,
             "exact_match": base_acc.accuracy, "ms_per_step": None, "peak_mib": None}]
    curves = {}
    for i, method in enumerate(methods):
        lora = None if method == "full" else LoRAConfig(
            r=int(method.removeprefix("lora-r")), lora_alpha=2 * int(method.removeprefix("lora-r")),
            target_modules=("c_attn", "c_proj"))
        lr = plan.full_lr if lora is None else plan.lora_lr
        cfg = TrainConfig(max_iters=plan.finetune_iters, lr=lr, min_lr=lr / 10,
                          warmup_iters=plan.finetune_iters // 10,
                          eval_interval=max(1, plan.finetune_iters // 4), **common)
        if i == 0:
            _say(f"2/4 fine-tuning on builtin:majority for {plan.finetune_iters} steps each:")
        _say(f"    {method} (lr {lr:g}) ...")
        result = runs.finetune(out / "base", "builtin:majority", out / method, cfg, lora,
                               quiet=quiet, threads=threads)
        curves[method] = [(r["iter"], r["val_loss"]) for r in result.history]
        tuned = load_run(out / method).model
        with parallel(threads):
            acc = task_accuracy(tuned, tokenizer, task, plan.task_prompts)
            peak = _memory(out / method, task_data, plan)
        trainable = tuned.num_parameters(trainable_only=True) if lora is not None \
            else tuned.num_parameters()
        label = method if lora is None else f"LoRA r={lora.r} (alpha {lora.lora_alpha:g})"
        rows.append({"method": label,
                     "run": method, "trainable": trainable, "total": tuned.num_parameters(),
                     "val_loss": result.val_loss, "exact_match": acc.accuracy,
                     "ms_per_step": result.ms_per_step, "peak_mib": peak / 2**20})

    _say("")
    _say(format_table(rows))
    merge = _merge_best(out, rows, task_data, plan, threads)
    _samples(out, rows, base_model, tokenizer, task, merge["best"])
    results = {"plan": plan.__dict__, "rows": rows, "merge": merge, "curves": curves,
               "wall_time_s": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot = _plot(out, curves)
    _say(f"\nsaved runs, metrics and results.json{' and ' + plot.name if plot else ''} in {out} "
         f"({results['wall_time_s']:.0f} s in all)")
    return results


def _val_loss(model, data, plan: DemoPlan) -> float:
    from minilora.train import estimate_loss

    return estimate_loss(model, data, plan.batch_size, plan.eval_iters,
                         np.random.default_rng(0))["val"]


def format_table(rows: list[dict]) -> str:
    header = ("method", "trainable params", "val loss", "exact match", "ms/step", "peak MiB")
    lines = []
    for r in rows:
        share = f"{r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%)"
        ms = "-" if r["ms_per_step"] is None else f"{r['ms_per_step']:.1f}"
        mib = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        lines.append((r["method"], share, f"{r['val_loss']:.3f}", f"{r['exact_match']:.1%}", ms,
                      mib))
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*line) for line in lines)])


def _merge_best(out: Path, rows, data, plan: DemoPlan, threads) -> dict:
    lora_rows = [r for r in rows if r.get("run", "").startswith("lora")]
    best = max(lora_rows, key=lambda r: (r["exact_match"], -r["val_loss"]))
    _say(f"\n3/4 merging the best adapter ({best['method']}): W' = W + s B A")
    adapted = load_run(out / best["run"]).model
    base = load_run(out / "base").model
    x, _ = data.get_batch("val", plan.batch_size, base.config.block_size,
                          np.random.default_rng(1))
    with parallel(threads), no_grad():
        unmerged_logits = adapted(x).data
        t_base = _time_forward(base, x)
        t_unmerged = _time_forward(adapted, x)
        merged = merge_and_unload(adapted)
        merged_logits = merged(x).data
        t_merged = _time_forward(merged, x)
    diff = float(np.max(np.abs(unmerged_logits.astype(np.float64) - merged_logits)))
    from minilora.train import write_checkpoint

    (out / "merged").mkdir(parents=True, exist_ok=True)
    write_checkpoint(out / "merged" / CHECKPOINT, merged,
                     {"tokenizer": load_run(out / "base").tokenizer,
                      "merged_from": str((out / best["run"]).resolve())})
    _say(f"    max |logits merged - unmerged| = {diff:.2e} (float32 round-off)")
    _say(f"4/4 inference, batch {plan.batch_size}x{base.config.block_size}: base "
         f"{t_base:.2f} ms, adapter unmerged {t_unmerged:.2f} ms, merged {t_merged:.2f} ms "
         f"(merged/base = {t_merged / t_base:.2f})")
    return {"best": best["run"], "max_abs_logit_diff": diff, "ms_base": t_base,
            "ms_unmerged": t_unmerged, "ms_merged": t_merged}


def _samples(out: Path, rows, base_model, tokenizer, task: Task, best: str) -> None:
    pairs = task.pairs[:4]
    prompts = ["\n" + p for p, _ in pairs]
    models = {"base": base_model, "full": load_run(out / "full").model,
              best: load_run(out / "merged").model}
    answers = {name: greedy_completions(m, tokenizer, prompts, 8) for name, m in models.items()}
    _say("\nsamples (held-out prompts, greedy):")
    for i, (prompt, truth) in enumerate(pairs):
        got = ", ".join(f"{name}: {answers[name][i].splitlines()[0] if answers[name][i] else ''!r}"
                        for name in models)
        _say(f"    {prompt}{truth:<7} -> {got}")


def _plot(out: Path, curves: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        its, losses = zip(*points, strict=True)
        ax.plot(its, losses, marker="o", label=method)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("validation loss (builtin:majority)")
    ax.set_title("Full fine-tuning vs LoRA")
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
