"""Whole runs: pretrain a new model, fine-tune a saved one (in full or with LoRA), resume.

These put together what a run needs (the data and its tokenizer, the model, LoRA, the facts saved
beside the weights) and call [`minilora.train.train`][]. The CLI and the demo both use them.

Everything that can be checked is checked before the run directory is touched: a bad setting, a
missing base, data the base's tokenizer cannot encode or that is shorter than one block, all fail
before ``out_dir`` exists, so a mistake never leaves a half-made run behind.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from minilora.data import Tokenizer, load_dataset
from minilora.errors import ConfigError, FileFormatError, MiniLoRAError, VocabularyError
from minilora.lora import LoRAConfig, apply_lora
from minilora.train import architecture
from minilora.train.checkpoint import CHECKPOINT, read_checkpoint
from minilora.train.config import TrainConfig
from minilora.train.loop import TrainResult, train
from minilora.train.rundir import RunDir
from minilora.train.sources import base_reference, open_base, read_full_model
from minilora.train.tokenizer_file import tokenizer_entry

DATA_SEED = 0  # built-in corpora (and their held-out prompts) are always generated from seed 0

Log = Callable[[str], None]


def _source(data: str | os.PathLike) -> str:
    """What is saved to find the data again: ``builtin:NAME`` or an absolute file path."""
    data = str(data)
    return data if data.startswith("builtin:") else str(Path(data).resolve())


def _fresh_dir(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    RunDir(out).check_free()  # a run in progress there: say so, not "already holds a run"
    if (out / CHECKPOINT).exists():
        raise ConfigError(f"{out} already holds a run ({CHECKPOINT}); continue it with --resume "
                          "or choose another --out")
    return out


def _count(n: int) -> str:
    return f"{n:,} parameter{'s' if n != 1 else ''}"


def _describe_data(dataset) -> str:
    if hasattr(dataset, "describe"):  # instruction data counts examples, not a text's tokens
        return dataset.describe()
    return (f"{dataset.name} ({len(dataset.train):,} train / {len(dataset.val):,} val tokens, "
            f"vocabulary {dataset.tokenizer.vocab_size})")


def _describe_schedule(config: TrainConfig) -> str:
    accum = config.gradient_accumulation_steps
    batch = f"{config.batch_size}" if accum == 1 else \
        f"{config.batch_size} x {accum} accumulated"
    return (f"{config.max_iters} steps of batch {batch}, lr {config.lr:g} "
            f"-> {config.min_lr:g} (warm-up {min(config.warmup_iters, config.max_iters)}), "
            f"seed {config.seed}")


def describe_model(model) -> str:
    """``4 layers x 128 (4 heads), block 64: 800,000 parameters`` and, with LoRA, what trains."""
    text = f"{architecture.of_model(model).describe(model.config)}: " \
        f"{_count(model.num_parameters())}"
    trainable = model.num_parameters(trainable_only=True)
    if trainable != model.num_parameters():
        text += f", {trainable:,} trainable ({100 * trainable / model.num_parameters():.2f}%)"
    return text


def pretrain(data: str | os.PathLike, out_dir, model_config: dict, config: TrainConfig, *,
             tokenizer: Tokenizer | None = None, quiet: bool = False, threads: int | None = None,
             extra_eval=None, on_eval: Callable[[dict], None] | None = None,
             log: Log | None = None) -> TrainResult:
    """Train a new model on ``data``. ``model_config``: its config's fields but ``vocab_size``,
    which the tokenizer gives: ``tokenizer`` if given (a ByteTokenizer reads any text later), else
    the built-in alphabet or the characters of the file. A GPT (GPTConfig's fields), or a Llama or
    Qwen2 with ``"model_type": "llama"`` (or ``"qwen2"``) and LlamaConfig's fields; the latter
    needs ``config.block_size``.

    log: called once, before training, with a line saying what is trained on what.
    """
    out = _fresh_dir(out_dir)
    dataset = load_dataset(data, tokenizer=tokenizer, seed=DATA_SEED)
    family = architecture.of_config_dict(model_config)
    cfg = family.new_config(model_config, dataset.tokenizer.vocab_size)
    dataset.check_block_size(family.block_size(cfg, config.block_size))
    model = family.model_class(cfg, seed=config.seed)
    entry, files = tokenizer_entry(dataset.tokenizer)
    info = {"tokenizer": entry, "data": {"source": _source(data), "seed": DATA_SEED}}
    if log is not None:
        log(f"pretraining a new {family.name} ({describe_model(model)}) on "
            f"{_describe_data(dataset)}: {_describe_schedule(config)}")
    return train(model, dataset, config, out, quiet=quiet, run_info=info, threads=threads,
                 extra_eval=extra_eval, on_eval=on_eval, run_files=files)


def load_base(base_dir, dropout: float | None = None) -> tuple:
    """(model, tokenizer) of a full model to fine-tune: a full run, or a Hugging Face model
    directory with its tokenizer (``dropout``: replaces the directory's rates)."""
    model, tokenizer = read_full_model(base_dir, "--init-from", dropout=dropout)
    if tokenizer is None:
        raise FileFormatError(f"--init-from {base_dir}: it holds no tokenizer to read the data "
                              "with (a Hugging Face directory: tokenizer.json, or vocab.json and "
                              "merges.txt)")
    return model, tokenizer


def finetune(base_dir, data: str | os.PathLike, out_dir, config: TrainConfig,
             lora: LoRAConfig | None = None, *, dropout: float | None = None, quiet: bool = False,
             threads: int | None = None, extra_eval=None,
             on_eval: Callable[[dict], None] | None = None, log: Log | None = None
             ) -> TrainResult:
    """Fine-tune the model in ``base_dir`` on ``data``: in full, or with the adapter ``lora``.

    A LoRA run saves only the adapter, with the base's path (relative to ``out_dir``) and the
    fingerprint of its weights. The adapter's ``A`` is drawn from ``config.seed``.
    """
    out = _fresh_dir(out_dir)
    model, tokenizer = load_base(base_dir, dropout)
    family = architecture.of_model(model)
    dataset = load_dataset(data, tokenizer=tokenizer, seed=DATA_SEED)
    dataset.check_block_size(family.block_size(model.config, config.block_size))
    family.set_dropout(model, dropout)
    entry, files = tokenizer_entry(tokenizer)
    info = {"tokenizer": entry, "data": {"source": _source(data), "seed": DATA_SEED},
            "init_from": str(Path(base_dir).resolve())}
    model.train()
    if lora is not None:
        info["base"] = base_reference(base_dir, out, model)
        # A is drawn from the run's seed; the adapters' dropout masks share model.rng, which the
        # loop seeds and checkpoints, so that a resumed run draws the same masks
        model.rng.bit_generator.state = np.random.default_rng([config.seed, 3]).bit_generator.state
        apply_lora(model, lora, rng=model.rng)
    if log is not None:
        how = "in full" if lora is None else (
            f"with {'DoRA' if lora.use_dora else 'LoRA'} r={lora.r}, alpha {lora.lora_alpha:g} on "
            f"{_describe_targets(lora)}")
        log(f"fine-tuning {base_dir} {how} ({describe_model(model)}) on "
            f"{_describe_data(dataset)}: {_describe_schedule(config)}")
    return train(model, dataset, config, out, quiet=quiet, run_info=info, threads=threads,
                 extra_eval=extra_eval, on_eval=on_eval, run_files=files)


def _describe_targets(lora) -> str:
    """``c_attn[q, v], c_proj``: the target modules, and the slices adapted of a fused one."""
    if isinstance(lora.target_modules, str):
        return lora.target_modules
    slices = lora.target_slices or {}
    return ", ".join(f"{t}[{', '.join(slices[t])}]" if t in slices else t
                     for t in lora.target_modules)


def resume(out_dir, *, max_iters: int | None = None, base=None, quiet: bool = False,
           threads: int | None = None, extra_eval=None,
           on_eval: Callable[[dict], None] | None = None, log: Log | None = None) -> TrainResult:
    """Continue the run in ``out_dir`` from its checkpoint, with the settings it started with.

    max_iters: where the run ends now (a finished run is extended, as in nanoGPT; see
        [`TrainConfig.extended_to`][]). base: where a LoRA run's base is now, if it moved
        (the run records the new place from its next checkpoint on).
    """
    out = Path(out_dir)
    RunDir(out).check_free()  # before loading anything
    if not (out / CHECKPOINT).exists():
        raise ConfigError(f"--resume: {out} holds no checkpoint to resume from")
    ckpt = read_checkpoint(out)
    meta = ckpt.meta
    if ckpt.train_config is None or "data" not in meta or ckpt.tokenizer is None:
        raise FileFormatError(f"{out / CHECKPOINT}: cannot resume from it: it holds no training "
                              "state (a merged model?)")
    config, model_config = ckpt.train_config, ckpt.model_config
    if max_iters is not None:
        if max_iters < meta["iter"]:
            raise ConfigError(f"--max-iters {max_iters}: the run in {out} is at iteration "
                              f"{meta['iter']} already")
        config = config.extended_to(max_iters)
    info = {k: meta[k] for k in ("tokenizer", "data", "init_from", "base") if k in meta}
    if meta["kind"] == "lora":
        model, base_dir = open_base(ckpt, base)
        info["base"] = base_reference(base_dir, out, model)
        model.config = model_config
        try:
            # A and B come from the checkpoint; the dropout masks share model.rng (restored)
            apply_lora(model, ckpt.lora_config, rng=model.rng)
        except MiniLoRAError as e:
            raise FileFormatError(f"{out / CHECKPOINT}: its lora_config does not fit its base: "
                                  f"{e}") from None
    elif base is not None:
        raise ConfigError(f"--base {base}: {out} is a full run, it has no base")
    else:
        model = architecture.of_config(model_config).model_class(model_config, seed=config.seed)
    family = architecture.of_model(model)
    family.set_dropout(model, family.dropout(model_config))
    try:
        dataset = load_dataset(meta["data"]["source"], tokenizer=ckpt.tokenizer, seed=DATA_SEED)
    except VocabularyError as e:  # the checkpoint's tokenizer, or the data, is not the run's
        raise FileFormatError(f"{out / CHECKPOINT}: its tokenizer cannot read the run's data: "
                              f"{e}") from None
    model.train()
    if log is not None:
        ends = "" if config.max_iters == ckpt.train_config.max_iters else \
            f" (extended from {ckpt.train_config.max_iters}; lr {config.min_lr:g} after " \
            f"iteration {config.decay_iters})"
        log(f"resuming {out} at iteration {meta['iter']} of {config.max_iters}{ends} "
            f"({describe_model(model)}) on {_describe_data(dataset)}")
    return train(model, dataset, config, out, resume=True, quiet=quiet, run_info=info,
                 threads=threads, extra_eval=extra_eval, on_eval=on_eval)
