"""Counting parameters: what LoRA trains against what full fine-tuning would.

An adapted (out, in) weight has ``in * out`` entries; its adapter ``A: (r, in)`` and ``B: (out, r)``
has ``r * (in + out)``. Two worked examples: a 3x3 weight with r=1, 9 against 6; a 4096x4096
weight with r=4, 16,777,216 against 32,768, exactly 1/512. DoRA adds its magnitude m: (out,),
``r * (in + out) + out``. ``LoRALayerCount`` does the arithmetic on shapes alone, so it needs no
4096x4096 array.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from minilora.configs import positive_int
from minilora.lora.plan import named_lora_layers
from minilora.lora.state import adapter_names
from minilora.nn import Module


@dataclass(frozen=True)
class LoRALayerCount:
    """The parameter accounting of one adapted layer: weight (out, in), adapter of rank r."""

    name: str
    in_features: int
    out_features: int
    r: int
    slice_rows: tuple[int, ...] = ()  # an adapter on slices of a fused output: their widths
    adapter_name: str = "default"
    magnitude: bool = False  # DoRA: m, one entry per output row

    def __post_init__(self) -> None:
        for field in ("in_features", "out_features", "r"):
            positive_int("LoRALayerCount", field, getattr(self, field))
        for width in self.slice_rows:
            positive_int("LoRALayerCount", "slice_rows", width)

    @property
    def weight_params(self) -> int:
        """in * out: what full fine-tuning of this weight trains."""
        return self.in_features * self.out_features

    @property
    def lora_params(self) -> int:
        """r * (in + out): the entries of A (r, in) and B (out, r); on slices of widths w_i, the
        sum of r * (in + w_i), an adapter per slice; with DoRA's magnitude, + out."""
        if self.slice_rows:
            return sum(self.r * (self.in_features + w) for w in self.slice_rows)
        return self.r * (self.in_features + self.out_features) + \
            (self.out_features if self.magnitude else 0)

    @property
    def fraction(self) -> Fraction:
        """lora_params / weight_params, exactly (``Fraction(1, 512)`` for 4096x4096 with r=4)."""
        return Fraction(self.lora_params, self.weight_params)

    def __str__(self) -> str:
        return (f"{self.name}: ({self.out_features}, {self.in_features}) weight, r={self.r}: "
                f"{self.lora_params:,} LoRA parameters against {self.weight_params:,} weights "
                f"({self.fraction})")


def lora_parameter_counts(model: Module, adapter_name: str | list[str] | None = None
                          ) -> list[LoRALayerCount]:
    """One ``LoRALayerCount`` per LoRA layer of ``model`` and adapter named (default: the active
    ones), in module order. Their ``lora_params`` add up to the adapter's size,
    ``Σ r (in + out)``. An Embedding counts ``in`` as its vocabulary and ``out`` as its width."""
    names = adapter_names(model, adapter_name)
    return [LoRALayerCount(name, layer.in_features, layer.out_features, adapter.r,
                           adapter.counted_rows(layer.out_features), adapter_name=n,
                           magnitude="lora_magnitude_vector" in adapter.PARAMETERS)
            for name, layer in named_lora_layers(model)
            for n, adapter in layer.adapters.items() if n in names]


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
