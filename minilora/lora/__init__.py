"""LoRA: the config, the adapted layers (Linear, Embedding, slices of a fused projection), adapters
by name, applying them to a model, combining and undoing them."""

from minilora.lora.accounting import (
    LoRALayerCount,
    get_nb_trainable_parameters,
    lora_parameter_counts,
    print_trainable_parameters,
    trainable_parameters_report,
)
from minilora.lora.adapters import DoraAdapter, EmbeddingAdapter, LinearAdapter, SlicedAdapter
from minilora.lora.combine import add_weighted_adapter
from minilora.lora.config import LoRAConfig, lora_scaling, matches_target
from minilora.lora.layer import DEFAULT, LoRAEmbedding, LoRALayer, LoRALinear, parameter_name
from minilora.lora.model import (
    active_adapters,
    add_adapter,
    apply_lora,
    delete_adapter,
    disable_adapter,
    disable_adapters,
    mark_only_lora_as_trainable,
    merge_adapter,
    merge_and_unload,
    plan_lora,
    set_adapter,
    unload,
    unmerge_adapter,
)
from minilora.lora.plan import named_lora_layers
from minilora.lora.state import load_lora_state_dict, lora_state_dict


def __getattr__(name: str):
    """``save_adapter`` and ``load_adapter`` (PEFT's files) live in ``minilora.hf``, which sits
    above this package; they are found here too, imported when first asked for."""
    if name in ("save_adapter", "load_adapter"):
        from minilora import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'minilora.lora' has no attribute {name!r}")


__all__ = [
    "DEFAULT", "DoraAdapter", "EmbeddingAdapter", "LinearAdapter", "LoRAConfig", "LoRAEmbedding",
    "LoRALayer", "LoRALayerCount", "LoRALinear", "SlicedAdapter", "active_adapters",
    "add_adapter", "add_weighted_adapter", "apply_lora", "delete_adapter", "disable_adapter",
    "disable_adapters", "get_nb_trainable_parameters", "load_adapter", "load_lora_state_dict",
    "lora_parameter_counts", "lora_scaling", "lora_state_dict", "mark_only_lora_as_trainable",
    "matches_target", "merge_adapter", "merge_and_unload", "named_lora_layers", "parameter_name",
    "plan_lora", "print_trainable_parameters", "save_adapter", "set_adapter",
    "trainable_parameters_report", "unload", "unmerge_adapter",
]
