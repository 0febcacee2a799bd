"""Where a run's model comes from: a run directory (a full model, or an adapter on its base) or a
Hugging Face model directory (read by [`minilora.hf`][]), to fine-tune or to carry an adapter.

A LoRA run records its base by path (relative to the run) and by the SHA-256 of its weights. The
base is looked for where the path says, or where ``base=`` (``--base DIR``) says it is now; either
way it must hold the very weights the adapter was trained on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from minilora import hf
from minilora.data import Tokenizer
from minilora.errors import ConfigError, FileFormatError, MiniLoRAError
from minilora.lora import apply_lora, load_lora_state_dict
from minilora.nn import Module
from minilora.train import architecture
from minilora.train.checkpoint import (
    CHECKPOINT,
    Checkpoint,
    check_weights,
    model_fingerprint,
    read_model,
)


@dataclass
class LoadedRun:
    """A model rebuilt from a run directory, with its tokenizer and facts."""

    model: Module  # a GPT or a LlamaForCausalLM
    tokenizer: Tokenizer | None
    meta: dict
    base_dir: Path | None = None


def is_pretrained(path) -> bool:
    """Whether ``path`` is a Hugging Face model directory rather than a minilora run."""
    path = Path(path)
    return path.is_dir() and not (path / CHECKPOINT).exists() and hf.is_pretrained_dir(path)


def read_full_model(path, what: str, dtype: str | None = None, dropout: float | None = None,
                    with_tokenizer: bool = True) -> tuple[Module, Tokenizer | None]:
    """(model, tokenizer or None) of a full run or a Hugging Face directory (its BPE tokenizer,
    if it has one and ``with_tokenizer``; ``dtype`` and ``dropout`` as
    [`minilora.hf.from_pretrained`][] takes them). A LoRA run is refused: it is not a model by
    itself. what: how errors name ``path``."""
    if is_pretrained(path):
        model = hf.from_pretrained(path, dtype=dtype or "float32", dropout=dropout)
        tokenizer = hf.load_tokenizer(path, model.config.vocab_size) \
            if with_tokenizer and hf.has_tokenizer(path) else None
        return model, tokenizer
    ckpt, model = read_model(path)
    if model is None:
        raise ConfigError(f"{what} {path}: it is a LoRA run; merge it first "
                          f"(minilora merge --model {path} --out DIR)")
    return model, ckpt.tokenizer


def find_base(ckpt: Checkpoint, base=None) -> Path:
    """The directory of a LoRA checkpoint's base: where it recorded it, or ``base``."""
    recorded = (ckpt.path.parent / ckpt.meta["base"]["path"]).resolve()
    where = recorded if base is None else Path(base)
    if (where / CHECKPOINT).is_file() or is_pretrained(where):
        return where
    if base is not None:
        raise FileFormatError(f"--base {base}: not a minilora run directory nor a Hugging Face "
                              "model directory")
    original = ckpt.meta.get("init_from")
    trained = f", and it was {original} when the run started" \
        if original and Path(original) != recorded else ""
    raise FileFormatError(f"{ckpt.path}: the adapter's base model is missing: the run records "
                          f"it as {ckpt.meta['base']['path']!r} from the run, that is {recorded}"
                          f"{trained}; if it moved, give its new place with --base DIR (base= "
                          "in Python)")


def open_base(ckpt: Checkpoint, base=None) -> tuple[Module, Path]:
    """(the base model, its directory) of a LoRA checkpoint, checked: a full model with the
    architecture and the exact weights (by fingerprint) the adapter was trained on."""
    base_dir = find_base(ckpt, base)
    config = ckpt.model_config
    family = architecture.of_config(config)
    if is_pretrained(base_dir):
        try:
            model, _ = read_full_model(base_dir, "base", config.dtype, family.dropout(config),
                                       with_tokenizer=False)
        except ConfigError as e:
            raise FileFormatError(f"{ckpt.path}: {e}") from None
    else:
        model = read_model(base_dir)[1]
        if model is None:
            raise FileFormatError(f"{ckpt.path}: its base {base_dir} is a LoRA run, not a model")
    # dropout is a training setting, not architecture: a LoRA run may train with its own
    if type(model.config) is not type(config) or not family.same_base(model.config, config):
        raise FileFormatError(f"{ckpt.path}: the base in {base_dir} has a different "
                              f"architecture than the adapter was made for")
    if model_fingerprint(model) != ckpt.meta["base"]["sha256"]:
        raise FileFormatError(f"{ckpt.path}: the base in {base_dir} is not the model this "
                              "adapter was trained on (weights fingerprint differs)")
    return model, base_dir


def base_reference(base_dir, run_dir, model) -> dict:
    """What a LoRA run records of its base: its path relative to the run, and its fingerprint."""
    return {"path": os.path.relpath(Path(base_dir).resolve(), Path(run_dir).resolve()),
            "sha256": model_fingerprint(model)}


def load_run(run_dir: str | Path, base=None) -> LoadedRun:
    """The model a run directory holds: a full model, or its base with the adapter applied.

    A LoRA run's base is found where the checkpoint says (relative to the run directory), or in
    ``base`` if given (the base moved); it must be a full model (a run, or a Hugging Face
    directory) with the architecture and the exact weights (by fingerprint) the adapter was
    trained on.
    """
    ckpt, model = read_model(run_dir)
    base_dir = None
    if ckpt.lora_config is not None:
        model, base_dir = open_base(ckpt, base)
        try:
            apply_lora(model, ckpt.lora_config, rng=0)
        except MiniLoRAError as e:
            raise FileFormatError(f"{ckpt.path}: its lora_config does not fit the base: {e}") \
                from None
        check_weights(ckpt.path, ckpt.weights, model)
        load_lora_state_dict(model, ckpt.weights)
    elif base is not None:
        raise ConfigError(f"--base {base}: {run_dir} is a full model, it has no base")
    model.eval()
    return LoadedRun(model, ckpt.tokenizer, ckpt.meta, base_dir)
