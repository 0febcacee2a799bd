"""What each ``minilora`` subcommand does (the parser is in ``minilora.cli``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from minilora.errors import ConfigError, DataError
from minilora.models import GPTConfig
from minilora.train import TrainConfig
from minilora.train.checkpoint import CHECKPOINT

_MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "dtype")
_TRAIN_FLAGS = {f.name for f in dataclasses.fields(TrainConfig)} - {"on_nonfinite"}
_LORA_FLAGS = ("lora_alpha", "lora_dropout", "target_modules", "use_rslora")
# nanoGPT's tiny Shakespeare CPU model: the default architecture of a new run
DEFAULT_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0}


def _given(args, names) -> dict:
    return {n: getattr(args, n) for n in names
            if getattr(args, n, None) not in (None, False)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _train_config(args) -> TrainConfig:
    given = _given(args, _TRAIN_FLAGS)
    if args.skip_nonfinite:
        given["on_nonfinite"] = "skip"
    return TrainConfig(**given)


def cmd_train(args) -> int:
    from minilora.lora import LoRAConfig
    from minilora.train import runs

    if args.resume:
        settings = _given(args, (*_MODEL_FLAGS, "dropout", *_TRAIN_FLAGS, "lora_r", *_LORA_FLAGS,
                                 "data", "init_from", "skip_nonfinite"))
        if settings:
            raise ConfigError("--resume continues with the run's own settings; drop "
                              + ", ".join(_flag(n) for n in settings))
        result = runs.resume(args.out, quiet=args.quiet, threads=args.threads)
    else:
        if args.data is None:
            raise ConfigError("train: --data FILE or --data builtin:NAME is required "
                              "(or --resume)")
        config = _train_config(args)
        if args.init_from is None:
            if args.lora_r is not None:
                raise ConfigError("--lora-r needs --init-from DIR: LoRA adapts a trained base")
            model = {**DEFAULT_MODEL, **_given(args, (*_MODEL_FLAGS, "dropout"))}
            if "dropout" in model:
                model["dropout"] = float(model["dropout"])
            GPTConfig(vocab_size=1, **model)  # check the architecture before reading any data
            result = runs.pretrain(args.data, args.out, model, config, quiet=args.quiet,
                                   threads=args.threads)
        else:
            fixed = _given(args, _MODEL_FLAGS)
            if fixed:
                raise ConfigError(f"--init-from {args.init_from} fixes the architecture; drop "
                                  + ", ".join(_flag(n) for n in fixed))
            lora = None
            if args.lora_r is not None:
                targets = (args.target_modules or "c_attn,c_proj").split(",")
                lora = LoRAConfig(
                    r=args.lora_r,
                    lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
                    lora_dropout=args.lora_dropout or 0.0,
                    target_modules=tuple(t.strip() for t in targets if t.strip()),
                    use_rslora=args.use_rslora)
            elif _given(args, _LORA_FLAGS):
                raise ConfigError("LoRA settings need --lora-r (without it, fine-tuning is full): "
                                  + ", ".join(_flag(n) for n in _given(args, _LORA_FLAGS)))
            result = runs.finetune(args.init_from, args.data, args.out, config, lora,
                                   dropout=args.dropout, quiet=args.quiet, threads=args.threads)
    print(f"iter {result.iters}: train loss {result.train_loss:.4f}, val loss "
          f"{result.val_loss:.4f}, {result.ms_per_step:.1f} ms/step, "
          f"{result.elapsed_s:.1f} s training; saved to {Path(args.out) / CHECKPOINT}")
    if result.skipped_steps:
        print(f"skipped {result.skipped_steps} steps with non-finite numbers")
    return 0


def _load(model_dir):
    from minilora.data import tokenizer_from_dict
    from minilora.train import load_run

    run = load_run(model_dir)
    if run.tokenizer is None:
        raise DataError(f"{model_dir}: the run holds no tokenizer")
    return run, tokenizer_from_dict(run.tokenizer, source=str(model_dir))


def cmd_generate(args) -> int:
    run, tokenizer = _load(args.model)
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    prompt = args.prompt.encode().decode("unicode_escape") if "\\n" in args.prompt else args.prompt
    try:
        idx = tokenizer.encode(prompt)
    except DataError as e:
        raise DataError(f"--prompt: {e}") from None
    if idx.size == 0:
        raise DataError("--prompt is empty")
    out = run.model.generate(idx[None, :], args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, rng=args.seed)
    print(tokenizer.decode(out[0]))
    return 0


def cmd_eval(args) -> int:
    from minilora.data import load_dataset
    from minilora.ops.backend import parallel
    from minilora.train import estimate_loss
    from minilora.train.runs import DATA_SEED

    run, tokenizer = _load(args.model)
    data = load_dataset(args.data, tokenizer=tokenizer, seed=DATA_SEED)
    data.check_block_size(run.model.config.block_size)
    with parallel():
        losses = estimate_loss(run.model, data, args.batch_size, args.eval_iters,
                               np.random.default_rng(args.seed))
        print(f"{args.data}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} "
              f"({args.eval_iters} batches of {args.batch_size})")
        if data.task is not None:
            from minilora.demo import task_accuracy

            score = task_accuracy(run.model, tokenizer, data.task)
            print(f"{data.task.name}: exact match {score.accuracy:.1%} "
                  f"({score.correct}/{score.total} held-out prompts)")
    return 0


def cmd_merge(args) -> int:
    from minilora.io import RunLock
    from minilora.lora import merge_and_unload
    from minilora.tensor import no_grad
    from minilora.train import load_run, write_checkpoint

    run = load_run(args.model)
    if run.meta["kind"] != "lora":
        raise ConfigError(f"merge: {args.model} is not a LoRA run (nothing to merge)")
    out = Path(args.out)
    if (out / CHECKPOINT).exists():
        raise ConfigError(f"merge: {out} already holds a model; choose another --out")
    model = run.model
    probe = np.random.default_rng(0).integers(0, model.config.vocab_size,
                                              (4, model.config.block_size))
    with no_grad():
        before = model(probe).data
        merge_and_unload(model)
        after = model(probe).data
    diff = float(np.max(np.abs(before.astype(np.float64) - after)))
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        info = {k: run.meta[k] for k in ("tokenizer", "data") if k in run.meta}
        info["merged_from"] = str(Path(args.model).resolve())
        write_checkpoint(out / CHECKPOINT, model, info)
    print(f"merged {args.model} into {out / CHECKPOINT}; max |logits merged - unmerged| = "
          f"{diff:.3g}")
    return 0


def cmd_params(args) -> int:
    from minilora.lora import LoRALayerCount

    out_f, in_f = args.shape
    c = LoRALayerCount("W", in_f, out_f, args.rank)
    ratio = c.lora_params / c.weight_params
    print(f"weight W: {out_f:,} x {in_f:,} = {c.weight_params:,} parameters")
    print(f"LoRA, rank {args.rank}: A ({args.rank} x {in_f:,}) + B ({out_f:,} x {args.rank}) "
          f"= {args.rank} x ({in_f:,} + {out_f:,}) = {c.lora_params:,} trainable parameters")
    frac = c.fraction
    as_ratio = f"1/{frac.denominator // frac.numerator}" if frac.numerator and \
        frac.denominator % frac.numerator == 0 else f"{frac}"
    print(f"ratio: {c.lora_params:,} / {c.weight_params:,} = {as_ratio} ({ratio:.4%})")
    return 0


def cmd_demo(args) -> int:
    from minilora.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, quiet=args.quiet, threads=args.threads)
    return 0


def cmd_bench(args) -> int:
    from minilora.bench import main as bench_main

    return bench_main(args)
