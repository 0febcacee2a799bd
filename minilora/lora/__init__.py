"""LoRA: the config, the adapted Linear layer, applying it to a model by name, and undoing it."""

from minilora.lora.accounting import (
    LoRALayerCount,
    get_nb_trainable_parameters,
    lora_parameter_counts,
    print_trainable_parameters,
    trainable_parameters_report,
)
from minilora.lora.config import LoRAConfig, lora_scaling, matches_target
from minilora.lora.layer import LoRALinear
from minilora.lora.model import (
    apply_lora,
    disable_adapter,
    disable_adapters,
    mark_only_lora_as_trainable,
    merge_adapter,
    merge_and_unload,
    named_lora_layers,
    plan_lora,
    unload,
    unmerge_adapter,
)
from minilora.lora.state import load_lora_state_dict, lora_state_dict


def __getattr__(name: str):
    """``save_adapter`` and ``load_adapter`` (PEFT's files) live in ``minilora.hf``, which sits
    above this package; they are found here too, imported when first asked for."""
    if name in ("save_adapter", "load_adapter"):
        from minilora import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'minilora.lora' has no attribute {name!r}")


__all__ = [
    "LoRAConfig", "LoRALayerCount", "LoRALinear", "apply_lora", "disable_adapter",
    "disable_adapters", "get_nb_trainable_parameters", "load_adapter", "load_lora_state_dict",
    "lora_parameter_counts", "lora_scaling", "lora_state_dict", "mark_only_lora_as_trainable",
    "matches_target", "merge_adapter", "merge_and_unload", "named_lora_layers", "plan_lora",
    "print_trainable_parameters", "save_adapter", "trainable_parameters_report", "unload",
    "unmerge_adapter",
]
