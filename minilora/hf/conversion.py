"""A PiSSA or OLoRA adapter converted for the original base: a plain LoRA adapter of rank 2r.

PiSSA and OLoRA train on the residual ``W_res = W - s B_0 A_0`` (``lora/residual_init.py``), so
their adapter only fits that residual. With the initial adapter ``(A_0, B_0)`` saved before
training, PEFT's ``save_pretrained(..., path_initial_model_for_weight_conversion=...)`` writes one
that fits the original W instead:

    W_res + s B A = W + s (B A - B_0 A_0) = W + s [B | -B_0] [A ; A_0]

so ``A' = [A ; A_0]`` (2r, in), ``B' = [B | -B_0]`` (out, 2r), and ``r' = 2r``,
``lora_alpha' = 2 lora_alpha`` (rsLoRA: ``sqrt(2) lora_alpha``) keep s, rank and alpha patterns
doubled the same way; ``init_lora_weights`` becomes True (a plain adapter). docs/variants.md
derives it. PEFT keeps only the ``lora_A`` and ``lora_B`` tensors: it would drop trained biases,
``modules_to_save`` and Embedding adapters without a word; minilora refuses them instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minilora import io
from minilora.errors import ConfigError, FileFormatError
from minilora.hf import files

A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


def read_initial(path, weights_name: str) -> tuple[Path, dict[str, np.ndarray]]:
    """(the file, key -> array) of the initial adapter saved in the directory ``path``."""
    directory = files.directory_of(path, "initial adapter")
    headers = files.tensor_headers(directory, weights_name, None, "initial adapter")
    for key, (_, info) in headers.items():
        files.check_float(directory / weights_name, key, info)
    weights = directory / weights_name
    return weights, io.read_tensors(weights, {key: info for key, (_, info) in headers.items()})


def convert_to_lora(tensors: dict[str, np.ndarray], d: dict, initial: tuple[Path, dict]
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, config dict) of the rank-2r plain adapter for the original base, from the
    trained adapter's (PEFT's keys and ``adapter_config.json`` fields) and the initial one's."""
    path, start = initial
    if d["use_rslora"] and (d["rank_pattern"] or d["alpha_pattern"]):
        raise ConfigError("save_adapter: path_initial_model_for_weight_conversion does not "
                          "combine use_rslora with rank_pattern or alpha_pattern (as in PEFT)")
    others = [k for k in tensors if not k.endswith((A_KEY, B_KEY))]
    if others:
        raise ConfigError(f"save_adapter: path_initial_model_for_weight_conversion converts "
                          f"lora_A and lora_B only; the adapter also holds {others[:3]} (PEFT "
                          "would drop them silently)")
    out = {}
    for key, array in tensors.items():
        init = start.get(key)
        if init is None or init.shape != array.shape:
            got = "nothing" if init is None else f"shape {init.shape}"
            raise FileFormatError(f"{path}: the initial adapter's {key!r} must have shape "
                                  f"{array.shape} (the adapter's), got {got}")
        init = init.astype(array.dtype, copy=False)
        out[key] = np.concatenate([array, init], axis=0) if key.endswith(A_KEY) else \
            np.concatenate([array, -init], axis=1)
    d = dict(d, init_lora_weights=True, r=2 * d["r"],
             lora_alpha=d["lora_alpha"] * (2 ** 0.5 if d["use_rslora"] else 2))
    for field in ("rank_pattern", "alpha_pattern"):
        d[field] = {k: 2 * v for k, v in d[field].items()}
    return out, d
