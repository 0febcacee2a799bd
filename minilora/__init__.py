"""minilora: LoRA from first principles, on a small NumPy autograd engine."""

from minilora.errors import (
    ConfigError,
    DataError,
    FileFormatError,
    GradError,
    MiniLoRAError,
    NonFiniteError,
    RunLockedError,
    ShapeError,
    StateDictError,
    TargetModuleError,
)
from minilora.hf import from_pretrained, load_adapter, save_adapter
from minilora.lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    add_adapter,
    add_weighted_adapter,
    apply_lora,
    delete_adapter,
    disable_adapter,
    disable_adapters,
    load_lora_state_dict,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    unload,
    unmerge_adapter,
)
from minilora.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM
from minilora.runtime import parallel, tune_malloc
from minilora.tensor import Tensor, is_grad_enabled, no_grad

__version__ = "0.1.0"

__all__ = [
    "GPT", "ConfigError", "DataError", "FileFormatError", "GPTConfig", "GradError", "LlamaConfig",
    "LlamaForCausalLM", "LoRAConfig", "LoRAEmbedding", "LoRALinear", "MiniLoRAError",
    "NonFiniteError", "RunLockedError", "ShapeError", "StateDictError", "TargetModuleError",
    "Tensor", "add_adapter", "add_weighted_adapter", "apply_lora", "delete_adapter",
    "disable_adapter", "disable_adapters", "from_pretrained", "is_grad_enabled", "load_adapter",
    "load_lora_state_dict", "lora_state_dict", "mark_only_lora_as_trainable", "merge_adapter",
    "merge_and_unload", "no_grad", "parallel", "print_trainable_parameters", "save_adapter",
    "set_adapter", "tune_malloc", "unload", "unmerge_adapter",
]
