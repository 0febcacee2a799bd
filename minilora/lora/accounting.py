"""Counting parameters: what LoRA trains against what full fine-tuning would.

An adapted (out, in) weight has ``in * out`` entries; its adapter ``A: (r, in)`` and ``B: (out, r)``
has ``r * (in + out)``. Two worked examples: a 3x3 weight with r=1, 9 against 6; a 4096x4096
weight with r=4, 16,777,216 against 32,768, exactly 1/512. ``LoRALayerCount`` does the arithmetic
on shapes alone, so it needs no 4096x4096 array.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from minilora.configs import positive_int
from minilora.lora.model import named_lora_layers
from minilora.nn import Module


@dataclass(frozen=True)
class LoRALayerCount:
    """The parameter accounting of one adapted layer: weight (out, in), adapter of rank r."""

    name: str
    in_features: int
    out_features: int
    r: int

    def __post_init__(self) -> None:
        for field in ("in_features", "out_features", "r"):
            positive_int("LoRALayerCount", field, getattr(self, field))

    @property
    def weight_params(self) -> int:
        """in * out: what full fine-tuning of this weight trains."""
        return self.in_features * self.out_features

    @property
    def lora_params(self) -> int:
        """r * (in + out): the entries of A (r, in) and B (out, r)."""
        return self.r * (self.in_features + self.out_features)

    @property
    def fraction(self) -> Fraction:
        """lora_params / weight_params, exactly (``Fraction(1, 512)`` for 4096x4096 with r=4)."""
        return Fraction(self.lora_params, self.weight_params)

    def __str__(self) -> str:
        return (f"{self.name}: ({self.out_features}, {self.in_features}) weight, r={self.r}: "
                f"{self.lora_params:,} LoRA parameters against {self.weight_params:,} weights "
                f"({self.fraction})")


def lora_parameter_counts(model: Module) -> list[LoRALayerCount]:
    """One ``LoRALayerCount`` per LoRA layer of ``model``, in module order. Their ``lora_params``
    add up to the adapter's size, ``Σ r (in + out)``."""
    return [LoRALayerCount(name, layer.in_features, layer.out_features, layer.r)
            for name, layer in named_lora_layers(model)]


def get_nb_trainable_parameters(model: Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, each shared (tied) parameter once, as PEFT's method."""
    params = list(model.parameters())
    return sum(p.size for p in params if p.requires_grad), sum(p.size for p in params)


def trainable_parameters_report(model: Module) -> str:
    """PEFT's line: ``trainable params: 2,816 || all params: 32,416 || trainable%: 8.6871``."""
    trainable, total = get_nb_trainable_parameters(model)
    percent = 100 * trainable / total if total else 0.0
    return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {percent:.4f}")


def print_trainable_parameters(model: Module) -> None:
    """Print ``trainable_parameters_report(model)``, as PEFT's ``print_trainable_parameters``."""
    print(trainable_parameters_report(model))
