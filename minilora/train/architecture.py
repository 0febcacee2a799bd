"""What a run needs to know of each model family, in one place: its config and model classes,
the LoRA targets a run adapts by default, how long its training sequences are, and how its
config's sizes are pinned to a checkpoint's arrays.

The loop, checkpoints, runs, the command line and the demo ask ``of_model(model)`` (or
``of_config``, ``of_config_dict``) rather than test a model's class themselves, so another family
is one more entry in ``ARCHITECTURES``.

    GPT (model_type "gpt2"):   GPTConfig, GPT; LoRA on c_attn, c_proj; block = config.block_size
    Llama, Qwen2:              LlamaConfig, LlamaForCausalLM; LoRA on q_proj, v_proj (the LoRA
                               paper's W_q and W_v); block = TrainConfig.block_size (the config
                               has none: rotary positions are defined at every length)
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from minilora.configs import field_name
from minilora.errors import ConfigError
from minilora.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM


class GPTArchitecture:
    """GPT-2 as nanoGPT writes it: learned positions, so the model fixes its block size."""

    name = "GPT"
    model_types = ("gpt2",)
    config_class = GPTConfig
    model_class = GPT
    target_modules = ("c_attn", "c_proj")  # the command line's default, as before Llama
    lora_roles = GPT.LORA_ROLES

    def config_from_dict(self, d: Mapping):
        return GPTConfig.from_dict(d)

    def new_config(self, fields: Mapping, vocab_size: int):
        """A new model's config: ``fields`` (GPTConfig's, all optional) and the vocabulary."""
        return GPTConfig(**{k: v for k, v in fields.items() if k != "model_type"},
                         vocab_size=vocab_size)

    def check_train_block(self, train_block: int | None) -> None:
        """Whether a run may leave TrainConfig.block_size None (a GPT may: it has its own)."""

    def block_size(self, config, train_block: int | None) -> int:
        """The training (and evaluation) sequence length: ``train_block`` (TrainConfig's), at most
        the model's block_size; None means the model's."""
        if train_block is None:
            return config.block_size
        if train_block > config.block_size:
            raise ConfigError(f"{field_name('TrainConfig', 'block_size')} ({train_block}) exceeds "
                              f"the model's block_size ({config.block_size}): GPT's learned "
                              "positions stop there")
        return train_block

    def probe_length(self, config) -> int:
        """How many positions a check of merged against unmerged logits reads."""
        return config.block_size

    def dropout(self, config) -> float | None:
        return config.dropout

    def check_dropout(self, p: float | None) -> None:
        """A dropout rate for the run: GPTConfig's rule."""
        if p is not None:
            GPTConfig(vocab_size=1, dropout=p)

    def set_dropout(self, model, p: float | None) -> None:
        """Replace every dropout rate of ``model`` by ``p`` (None: keep them)."""
        from minilora.nn import Dropout

        if p is None:
            return
        model.config = GPTConfig(**{**model.config.to_dict(), "dropout": p})  # checks p
        for m in model.modules():
            if isinstance(m, Dropout):
                m.p = float(p)

    def same_base(self, a, b) -> bool:
        """Whether two configs describe the same weights (dropout is a training setting)."""
        return dataclasses.replace(a, dropout=b.dropout) == b

    def size_mismatch(self, config, weights: Mapping) -> str | None:
        """Where the sizes in ``config`` (vocab_size, block_size, n_embd, n_layer) disagree with
        the arrays ``weights`` (GPT-2 names), or None."""
        c = config.n_embd
        for name, shape in (("transformer.wte.weight", (config.vocab_size, c)),
                            ("transformer.wpe.weight", (config.block_size, c))):
            got = weights.get(name)
            if got is None or got.shape != shape:
                held = "none" if got is None else f"{got.shape}"
                return f"model_config makes {name} {shape}, the weights hold {held}"
        blocks = {m.group(1) for n in weights if (m := re.match(r"transformer\.h\.(\d+)\.", n))}
        if blocks != {str(i) for i in range(config.n_layer)}:
            return (f"model_config has n_layer {config.n_layer}, the weights hold the blocks "
                    f"{sorted(blocks, key=int)[:8]}")
        return None

    def describe(self, config) -> str:
        """``4 layers x 128 (4 heads), block 64, float32``."""
        return (f"{_plural(config.n_layer, 'layer')} x {config.n_embd} "
                f"({_plural(config.n_head, 'head')}), block {config.block_size}, {config.dtype}")

    def lora_targets(self, roles: str) -> dict:
        """The LoRAConfig fields of ``--lora-targets`` (q, k, v as slices of c_attn)."""
        return GPT.lora_targets(roles)


class LlamaArchitecture:
    """Llama and Qwen2: rotary positions, so the run (not the model) says how long a sequence is."""

    name = "Llama"
    model_types = ("llama", "qwen2")
    config_class = LlamaConfig
    model_class = LlamaForCausalLM
    target_modules = ("q_proj", "v_proj")  # PEFT's default for Llama, the LoRA paper's W_q, W_v
    lora_roles: ClassVar[dict] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                                  "mlp": ("gate_proj", "up_proj", "down_proj")}

    def config_from_dict(self, d: Mapping):
        return LlamaConfig.from_dict(d)

    def new_config(self, fields: Mapping, vocab_size: int):
        """A new model's config: LlamaConfig's fields (the four sizes besides the vocabulary
        required) and the vocabulary."""
        return LlamaConfig(**{**fields, "vocab_size": vocab_size})

    def check_train_block(self, train_block: int | None) -> None:
        if train_block is None:
            raise ConfigError(f"{field_name('TrainConfig', 'block_size')} is needed: a Llama or "
                              "Qwen2 model has no block size of its own (its rotary positions "
                              "have no end); give the sequence length")

    def block_size(self, config, train_block: int | None) -> int:
        self.check_train_block(train_block)
        if train_block > config.max_position_embeddings:
            raise ConfigError(f"{field_name('TrainConfig', 'block_size')} ({train_block}) exceeds "
                              f"the model's max_position_embeddings "
                              f"({config.max_position_embeddings})")
        return train_block

    def probe_length(self, config) -> int:
        return min(config.max_position_embeddings, 32)

    def dropout(self, config) -> float | None:
        return None

    def check_dropout(self, p: float | None) -> None:
        """A dropout rate for the run: none but 0 (a Llama has no dropout layers)."""
        if p not in (None, 0, 0.0):
            raise ConfigError(f"dropout {p!r}: minilora's Llama and Qwen2 have no dropout (nor "
                              "does transformers' Llama, but for attention_dropout, which "
                              "minilora refuses)")

    def set_dropout(self, model, p: float | None) -> None:
        self.check_dropout(p)

    def same_base(self, a, b) -> bool:
        return a == b

    def size_mismatch(self, config, weights: Mapping) -> str | None:
        """Where ``config``'s tensor shapes (``minilora.hf.llama.tensor_shapes``, the same names
        as the parameters) disagree with ``weights``, or None. Reads no more expected names than
        ``weights`` holds, plus one: a config claiming 10^9 layers costs nothing."""
        from minilora.hf import llama

        expected = dict(itertools.islice(llama.tensor_shapes(config), len(weights) + 1))
        for name, shape in expected.items():
            got = weights.get(name)
            if got is None or got.shape != shape:
                held = "none" if got is None else f"{got.shape}"
                return f"model_config makes {name} {shape}, the weights hold {held}"
        return None  # names beyond these (an adapter's) are check_weights' to judge

    def describe(self, config) -> str:
        """``qwen2, 2 layers x 64 (4 heads, 2 key/value heads), float32``."""
        kv = "" if config.num_key_value_heads == config.num_attention_heads else \
            f", {config.num_key_value_heads} key/value"
        return (f"{config.model_type}, {_plural(config.num_hidden_layers, 'layer')} x "
                f"{config.hidden_size} ({_plural(config.num_attention_heads, 'head')}{kv}), "
                f"{config.dtype}")

    def lora_targets(self, roles: str) -> dict:
        """``--lora-targets q,v`` -> ``target_modules=("q_proj", "v_proj")``: Llama's projections
        are separate modules, so a role is a module (mlp: the three of the MLP; all: seven)."""
        names = [r.strip() for r in str(roles).split(",") if r.strip()]
        names = list(self.lora_roles) if names == ["all"] else names
        unknown = [r for r in names if r not in self.lora_roles]
        if not names or unknown or len(set(names)) < len(names):
            raise ConfigError(f"{field_name('GPT', 'lora_targets')}: expected distinct roles from "
                              f"{', '.join(self.lora_roles)} or all, got {roles!r}")
        modules: list[str] = []
        for role in names:
            found = self.lora_roles[role]
            modules += [found] if isinstance(found, str) else list(found)
        return {"target_modules": tuple(modules)}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


GPT_ARCH, LLAMA_ARCH = GPTArchitecture(), LlamaArchitecture()
ARCHITECTURES = {t: arch for arch in (GPT_ARCH, LLAMA_ARCH) for t in arch.model_types}


def of_config(config):
    """The architecture of a model config (a GPTConfig or a LlamaConfig)."""
    for arch in (GPT_ARCH, LLAMA_ARCH):
        if isinstance(config, arch.config_class):
            return arch
    raise ConfigError(f"expected a GPTConfig or a LlamaConfig, got {type(config).__name__}")


def of_model(model):
    """The architecture of a model (a GPT or a LlamaForCausalLM), from its config."""
    return of_config(model.config)


def model_type(config) -> str:
    """``gpt2``, ``llama`` or ``qwen2``."""
    return getattr(config, "model_type", "gpt2")


def of_config_dict(d) -> object:
    """The architecture of a config saved as JSON: a LlamaConfig's holds its ``model_type``, a
    GPTConfig's none (checkpoints written before Llama were all GPT's)."""
    kind = d.get("model_type", "gpt2") if isinstance(d, Mapping) else "gpt2"
    arch = ARCHITECTURES.get(kind) if isinstance(kind, str) else None
    if arch is None:
        raise ConfigError(f"model_type {kind!r:.40}: minilora runs train "
                          f"{', '.join(ARCHITECTURES)}")
    return arch


def config_from_dict(d):
    """A model config from its JSON (``model_config`` of a checkpoint), of its architecture."""
    return of_config_dict(d).config_from_dict(d)


def of_directory(path) -> object | None:
    """The architecture of the model in a run directory or a Hugging Face directory, from its
    config alone; None if the directory says nothing readable (the caller's later reading
    reports why)."""
    from minilora.errors import MiniLoRAError
    from minilora.hf import files
    from minilora.train.checkpoint import CHECKPOINT, read_checkpoint

    path = Path(path)
    try:
        if (path / CHECKPOINT).is_file():
            return of_config(read_checkpoint(path).model_config)
        if (path / "config.json").is_file():
            kind = files.read_json(path, "config.json", "model config").get("model_type")
            return ARCHITECTURES.get(kind) if isinstance(kind, str) else None
    except (MiniLoRAError, OSError, AttributeError):
        return None
    return None
