"""The main job: pretrain a small GPT, fine-tune it in full and with LoRA, compare, merge.

The plan names the model: GPTConfig's fields, or ``"model_type": "llama"`` (or ``"qwen2"``) with
LlamaConfig's and the plan's ``block_size`` (a Llama has none of its own); LoRA then goes on the
architecture's default targets (``minilora.train.architecture``: q_proj and v_proj on a Llama).

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minilora.data import Task, load_dataset
from minilora.errors import ConfigError
from minilora.lora import LoRAConfig, merge_and_unload
from minilora.runtime import parallel
from minilora.tensor import no_grad
from minilora.train import TrainConfig, architecture, load_run, runs
from minilora.train.checkpoint import CHECKPOINT
from minilora.train.evaluate import mean_loss, task_accuracy
from minilora.train.memory import measure_step


@dataclass(frozen=True)
class DemoPlan:
    model: dict  # the new model's config fields but vocab_size; "model_type" names a Llama
    pretrain_iters: int
    finetune_iters: int
    ranks: tuple[int, ...]
    full_lr: float
    lora_lr: float
    eval_iters: int  # validation batches behind each model's val loss in the table
    task_prompts: int | None  # held-out prompts scored (None: all 200)
    batch_size: int = 12
    pretrain_lr: float = 1e-3
    curve_eval_iters: int = 5  # batches per split behind each point of the loss curves
    block_size: int | None = None  # the training sequence length (None: the model's own)

    @property
    def architecture(self):
        return architecture.of_config_dict(self.model)

    def describe(self) -> str:
        """``4-layer, 128-wide GPT``."""
        m = self.model
        layers, width = (m["num_hidden_layers"], m["hidden_size"]) if "model_type" in m else \
            (m["n_layer"], m["n_embd"])
        return f"{layers}-layer, {width}-wide {self.architecture.name}"


FULL = DemoPlan(model={"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64},
                pretrain_iters=600, finetune_iters=300, ranks=(1, 4, 16), full_lr=2e-3,
                lora_lr=5e-3, eval_iters=20, task_prompts=None)
# Smaller, fewer steps, higher rates: the fewest steps after which the methods still differ
QUICK = DemoPlan(model={"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 64},
                 pretrain_iters=200, finetune_iters=100, ranks=(1, 4, 16), full_lr=4e-3,
                 lora_lr=1.5e-2, eval_iters=8, task_prompts=50, pretrain_lr=3e-3,
                 curve_eval_iters=2)


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


def _memory(model, data, plan: DemoPlan) -> int:
    """Peak bytes of one training step of ``model`` (full or LoRA), by tracemalloc.

    The step really runs (at lr 1e-9): measure after everything else has used the model.
    """
    from minilora.optim import AdamW, param_groups

    model.train()
    if "lora_config" not in model.__dict__:
        model.requires_grad_(True)
    opt = AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-9)
    x, y = data.get_batch("train", plan.batch_size, _block(model, plan),
                          np.random.default_rng(0))
    _, loss = model(x, y, skip_logits=True)
    loss.backward()
    opt.step()  # so the optimizer state exists, as during training
    opt.zero_grad()
    return measure_step(model, x, y, opt).peak


def _time_forwards(models: dict, x, rounds: int = 9) -> dict[str, float]:
    """CPU ms per forward pass of each model on ``x`` (median of ``rounds``, the models in turns).

    CPU time of this process (all its threads), not wall time: what a forward pass costs, which
    other programs on a busy machine change far less than they change its wall-clock share.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with no_grad():
        for m in models.values():
            m(x)  # warm-up
        for _ in range(rounds):
            for name, m in models.items():
                t = time.process_time()
                m(x)
                times[name].append(time.process_time() - t)
    return {name: 1000 * float(np.median(ts)) for name, ts in times.items()}


def _block(model, plan: DemoPlan) -> int:
    """The sequence length the plan trains and measures ``model`` on."""
    return architecture.of_model(model).block_size(model.config, plan.block_size)


def _lora_config(method: str, plan: DemoPlan) -> LoRAConfig | None:
    if method == "full":
        return None
    r = int(method.removeprefix("lora-r"))
    return LoRAConfig(r=r, lora_alpha=2 * r, target_modules=plan.architecture.target_modules)


OUT_DIR = "minilora-demo"  # where the demo writes, unless told otherwise


def run_demo(out_dir=OUT_DIR, quick: bool = False, seed: int = 0, quiet: bool = False,
             threads: int | None = None) -> dict:
    """Run the whole comparison, print it, save it in ``out_dir``, and return the results."""
    plan = QUICK if quick else FULL
    out = Path(out_dir)
    methods = ["full"] + [f"lora-r{r}" for r in plan.ranks]
    _prepare(out, ["base", *methods, "merged"])
    t_start = time.perf_counter()

    common = {"batch_size": plan.batch_size, "eval_iters": plan.curve_eval_iters, "seed": seed,
              "weight_decay": 0.1, "block_size": plan.block_size}
    _say(f"1/4 pretraining a {plan.describe()} on builtin:world for {plan.pretrain_iters} "
         "steps ...")
    pre_cfg = TrainConfig(max_iters=plan.pretrain_iters, lr=plan.pretrain_lr, min_lr=1e-4,
                          warmup_iters=plan.pretrain_iters // 10,
                          eval_interval=plan.pretrain_iters, **common)
    base = runs.pretrain("builtin:world", out / "base", plan.model, pre_cfg, quiet=quiet,
                         threads=threads)
    _say(f"    base: val loss {base.val_loss:.3f} on world text, {base.ms_per_step:.0f} ms/step")

    base_run = load_run(out / "base")
    base_model = base_run.model
    tokenizer = base_run.tokenizer
    task_data = load_dataset("builtin:majority", tokenizer=tokenizer, seed=runs.DATA_SEED)
    task = task_data.task
    with parallel(threads):
        base_acc = task_accuracy(base_model, tokenizer, task, plan.task_prompts)
        base_loss = val_loss(base_model, task_data, plan)

    rows = [{"method": "base (no fine-tuning)", "run": "base", "trainable": 0,
             "total": base_model.num_parameters(), "val_loss": base_loss,
             "exact_match": base_acc.accuracy, "ms_per_step": None, "peak_mib": None}]
    curves, answers = {}, {"base": base_acc.completions}
    _say(f"2/4 fine-tuning on builtin:majority for {plan.finetune_iters} steps each:")
    for method in methods:
        row, curves[method], answers[method] = _finetune(method, out, plan, common, tokenizer,
                                                        task_data, quiet, threads)
        rows.append(row)

    _say("")
    _say(format_table(rows))
    with parallel(threads):
        merge = _merge_best(out, rows, base_run, base_model, tokenizer, task_data, plan, answers)
    _samples(task, answers, ["base", "full", merge["best"], "merged"])
    results = {"plan": plan.__dict__, "rows": rows, "merge": merge, "curves": curves,
               "wall_time_s": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot = _plot(out, curves)
    _say(f"\nsaved runs, metrics and results.json{' and ' + plot.name if plot else ''} in {out} "
         f"({results['wall_time_s']:.0f} s in all)")
    return results


def _finetune(method: str, out: Path, plan: DemoPlan, common: dict, tokenizer, task_data,
              quiet: bool, threads: int | None) -> tuple[dict, list, list[str]]:
    """Fine-tune the base one way ("full" or "lora-rN") and score it: (its row of the table, its
    validation-loss curve, its answers to the held-out prompts)."""
    lora = _lora_config(method, plan)
    lr = plan.full_lr if lora is None else plan.lora_lr
    cfg = TrainConfig(max_iters=plan.finetune_iters, lr=lr, min_lr=lr / 10,
                      warmup_iters=plan.finetune_iters // 10,
                      eval_interval=max(1, plan.finetune_iters // 4), **common)
    _say(f"    {method} (lr {lr:g}) ...")
    result = runs.finetune(out / "base", "builtin:majority", out / method, cfg, lora,
                           quiet=quiet, threads=threads)
    tuned = load_run(out / method).model
    with parallel(threads):
        acc = task_accuracy(tuned, tokenizer, task_data.task, plan.task_prompts)
        loss = val_loss(tuned, task_data, plan)
        peak = _memory(tuned, task_data, plan)  # last: it takes a (tiny) training step
    label = method if lora is None else f"LoRA r={lora.r} (alpha {lora.lora_alpha:g})"
    row = {"method": label, "run": method, "trainable": tuned.num_parameters(trainable_only=True),
           "total": tuned.num_parameters(), "val_loss": loss, "exact_match": acc.accuracy,
           "ms_per_step": result.ms_per_step, "peak_mib": peak / 2**20}
    return row, [(r["iter"], r["val_loss"]) for r in result.history], acc.completions


def val_loss(model, data, plan: DemoPlan) -> float:
    """Mean loss over ``plan.eval_iters`` validation batches, the same batches for every model."""
    return mean_loss(model, data, "val", plan.eval_iters, plan.batch_size,
                     np.random.default_rng(0), plan.block_size)


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


def _merge_best(out: Path, rows, base_run, base, tokenizer, data, plan: DemoPlan,
                answers: dict) -> dict:
    """Merge the best adapter into its base, check the logits and the answers, time inference."""
    from minilora.train import write_checkpoint

    lora_rows = [r for r in rows if r["run"].startswith("lora")]
    best = max(lora_rows, key=lambda r: (r["exact_match"], -r["val_loss"]))
    _say(f"\n3/4 merging the best adapter ({best['method']}): W' = W + s B A")
    adapted = load_run(out / best["run"]).model
    unmerged = load_run(out / best["run"]).model  # kept unmerged, to time it
    x, _ = data.get_batch("val", plan.batch_size, _block(base, plan), np.random.default_rng(1))
    with no_grad():
        unmerged_logits = adapted(x)[0].data
        merged = merge_and_unload(adapted)
        merged_logits = merged(x)[0].data
    diff = float(np.max(np.abs(unmerged_logits.astype(np.float64) - merged_logits)))
    (out / "merged").mkdir(parents=True, exist_ok=True)
    write_checkpoint(out / "merged" / CHECKPOINT, merged,
                     {"tokenizer": base_run.meta["tokenizer"],
                      "merged_from": str((out / best["run"]).resolve())})
    acc = task_accuracy(merged, tokenizer, data.task, plan.task_prompts)
    answers["merged"] = acc.completions
    same = sum(a == b for a, b in zip(acc.completions, answers[best["run"]], strict=True))
    _say(f"    max |logits merged - unmerged| = {diff:.2e} (float32 round-off)")
    _say(f"    the merged model answers {same}/{acc.total} held-out prompts as the adapter does "
         f"(exact match {acc.accuracy:.1%})")
    ms = _time_forwards({"base": base, "unmerged": unmerged, "merged": merged}, x)
    _say(f"4/4 inference cost, CPU time of one forward pass of {plan.batch_size}x"
         f"{_block(base, plan)} tokens (median of 9): base {ms['base']:.1f} ms, adapter "
         f"unmerged {ms['unmerged']:.1f} ms, merged {ms['merged']:.1f} ms "
         f"(merged/base = {ms['merged'] / ms['base']:.2f})")
    return {"best": best["run"], "max_abs_logit_diff": diff, "merged_exact_match": acc.accuracy,
            "same_answers_as_unmerged": same, "ms_base": ms["base"],
            "ms_unmerged": ms["unmerged"], "ms_merged": ms["merged"]}


def _samples(task: Task, answers: dict[str, list[str]], names: list[str], n: int = 4) -> None:
    """The first ``n`` held-out prompts, their answer, and what each model said."""
    header = ["prompt", "answer", *names]
    lines = [[f"{prompt}", truth, *(repr(answers[name][i]) for name in names)]
             for i, (prompt, truth) in enumerate(task.pairs[:n])]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    _say("\nsamples (held-out prompts; greedy answers, up to the first newline):")
    for line in [header, *lines]:
        _say(("    " + "  ".join(f"{cell:<{w}}" for cell, w in zip(line, widths, strict=True)))
             .rstrip())


def _plot(out: Path, curves: dict) -> Path | None:
    """loss_curves.png, if matplotlib is installed (drawn without pyplot: no global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
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
    return path
