"""The golden vectors: a versioned set of LoRA test cases, the same bits on every machine.

``write_vectors(out)`` writes, for people implementing LoRA in another framework or language:

- ``lora_linear/CASE.safetensors``: for the LoRA linear layer (several shapes, ranks, alphas,
  rsLoRA, with and without bias, a given dropout mask) the inputs ``x, W, b, A, B, mask`` and an
  upstream gradient ``G``, and the references ``y, dx, dA, dB, db`` and the merged ``W_merged``;
- ``gpt2_lora/base/`` and ``gpt2_lora/adapter/``: a tiny GPT-2 as ``transformers`` saves it and a
  LoRA adapter as PEFT saves it; ``gpt2_lora/reference.safetensors``: token ids, targets, the
  logits, the loss and the gradient of every parameter;
- ``manifest.json``: every case's settings, the tolerance per dtype and why, each file's SHA-256.

Why the bits cannot depend on the machine: the inputs are multiples of 2^-7 drawn from SHAKE-256
of their names (no random generator whose stream could change), exact in float64, float32,
float16 and bfloat16 alike; every reference is computed in ``minilora.check.oracle``'s 60-digit
decimal arithmetic (no BLAS, no SIMD, sums in one fixed order) and rounded once to float64.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np

from minilora import hf, io
from minilora.check import oracle
from minilora.check.rounding import DTYPES, UNIT_ROUNDOFF, gamma
from minilora.errors import ConfigError
from minilora.lora import LoRAConfig, apply_lora, named_lora_layers
from minilora.models import GPT, GPTConfig

VECTORS_VERSION = 1
MANIFEST = "manifest.json"
_SEED = f"minilora golden vectors v{VECTORS_VERSION}"
GRID_BITS = 7  # inputs are k / 2^7 with |k| <= 127: 8 significant bits at most, exact in bfloat16


@dataclass(frozen=True)
class LayerCase:
    """One LoRA linear layer: x (*lead, in), W (out, in), A (r, in), B (out, r)."""

    name: str
    lead: tuple[int, ...]
    in_features: int
    out_features: int
    r: int
    lora_alpha: int
    use_rslora: bool = False
    bias: bool = True
    lora_dropout: float = 0.0  # 0.5: the mask holds 0 and 2


LAYER_CASES = (
    LayerCase("lecture_3x3_r1", (2,), 3, 3, 1, 1),
    LayerCase("r2_alpha4_no_bias", (3,), 5, 4, 2, 4, bias=False),
    LayerCase("r4_alpha8_rslora", (2,), 8, 6, 4, 8, use_rslora=True),
    LayerCase("r3_alpha6_rslora_irrational_s", (2,), 6, 7, 3, 6, use_rslora=True),
    LayerCase("r2_alpha3_dropout_batched", (2, 3), 4, 5, 2, 3, lora_dropout=0.5),
    LayerCase("r3_alpha1_s_one_third", (2,), 4, 4, 3, 1),
    LayerCase("r4_full_rank", (3,), 4, 4, 4, 2),
)
GPT_CONFIG = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8,
                       dtype="float64")
GPT_LORA = LoRAConfig(r=2, lora_alpha=4, target_modules=("c_attn", "c_fc"))
GPT_BATCH = (2, 6)  # (B, T)
# max |yours - reference| <= rtol * max |reference|, per tensor, for the GPT's outputs
GPT_RTOL = {"float64": 1e-10, "float32": 1e-4}
GPT_RTOL_WHY = (
    "A forward and backward pass through GPT-2 has no useful a-priori elementwise bound (softmax, "
    "layer norm and the loss amplify round-off by amounts that depend on the values), so this "
    "tolerance is stated, not derived: float64 and float32 implementations that compute the "
    "same function in any order land within about 100 unit round-offs (2^-53 and 2^-24) of the "
    "reference relative to each tensor's largest element here, and the tolerance allows "
    "~10^6 float64 and ~10^3 float32 unit round-offs; any real mistake (a missing scale, a "
    "transposed weight, a wrong mask) moves these outputs by 1e-3 or more. Half precision is "
    "not offered for the GPT: after a few hundred bfloat16 roundings no tolerance separates "
    "round-off from mistakes; check those with `minilora check --logits`.")


def grid(name: str, shape: tuple[int, ...], offset: float = 0.0) -> np.ndarray:
    """Values k / 2^7 (|k| <= 127), plus ``offset``, from SHAKE-256 of ``name``: the same on every
    machine and in every version of every library."""
    n = math.prod(shape)
    raw = hashlib.shake_256(f"{_SEED}/{name}".encode()).digest(2 * n)
    k = np.frombuffer(raw, dtype="<u2").astype(np.int64) % 255 - 127
    return (k / 2.0 ** GRID_BITS + offset).reshape(shape)


def scaling(r: int, lora_alpha: int, use_rslora: bool) -> Decimal:
    """s = alpha / r (rsLoRA: alpha / sqrt(r)), in the oracle's 60 digits."""
    with oracle.decimal.localcontext(oracle.CONTEXT):
        return Decimal(lora_alpha) / (Decimal(r).sqrt() if use_rslora else Decimal(r))


# ---- the LoRA linear layer ------------------------------------------------------------------

def layer_inputs(case: LayerCase) -> dict[str, np.ndarray]:
    """x, W, b, A, B, mask, G of ``case`` (float64, exact in every dtype)."""
    shapes = {"x": (*case.lead, case.in_features), "W": (case.out_features, case.in_features),
              "b": (case.out_features,), "A": (case.r, case.in_features),
              "B": (case.out_features, case.r), "G": (*case.lead, case.out_features)}
    out = {k: grid(f"lora_linear/{case.name}/{k}", shape) for k, shape in shapes.items()}
    if not case.bias:
        del out["b"]
    if case.lora_dropout:
        keep = grid(f"lora_linear/{case.name}/mask", shapes["x"]) >= 0
        out["mask"] = keep * (1.0 / (1.0 - case.lora_dropout))
    return out


# roundings on the longest path to each output (products, sums, the mask, s and s's own)
def _roundings(case: LayerCase, n: int) -> dict[str, int]:
    i, o, r = case.in_features, case.out_features, case.r
    return {"y": i + r + 5, "dx": o + r + 5, "dA": o + n + 4, "dB": i + n + 4, "db": n,
            "W_merged": r + 3}


def layer_reference(case: LayerCase) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(the case's inputs and references, float64; atol per dtype per output)."""
    inputs = layer_inputs(case)
    s = scaling(case.r, case.lora_alpha, case.use_rslora)
    rows = int(math.prod(case.lead))

    def run(arrays, s):
        flat = {k: v.reshape(rows, -1) if k in ("x", "G", "mask") else v
                for k, v in arrays.items()}
        d = {k: oracle.decimals(v) for k, v in flat.items()}
        return oracle.lora_linear_reference(d["x"], d["W"], d.get("b"), d["A"], d["B"], s,
                                            d.get("mask"), d["G"])

    exact = run(inputs, s)
    magnitude = run({k: np.abs(v) for k, v in inputs.items()}, abs(s))  # |expr| on |inputs|
    shapes = {"y": (*case.lead, case.out_features), "dx": (*case.lead, case.in_features)}
    outputs = {k: oracle.to_float64(v).reshape(shapes.get(k, np.shape(v)))
               for k, v in _renamed(exact).items()}
    roundings = _roundings(case, rows)
    atol = {dtype: {k: (gamma(roundings[k], UNIT_ROUNDOFF[dtype]) + UNIT_ROUNDOFF["float64"])
                    * float(np.max(oracle.to_float64(v))) for k, v in _renamed(magnitude).items()}
            for dtype in DTYPES}
    return {**inputs, **outputs}, atol


def _renamed(d: dict) -> dict:
    return {("W_merged" if k == "merged_weight" else k): v for k, v in d.items()}


def _layer_entry(case: LayerCase, tensors: dict, atol: dict) -> dict:
    s = scaling(case.r, case.lora_alpha, case.use_rslora)
    inputs = [k for k in ("x", "W", "b", "A", "B", "mask", "G") if k in tensors]
    return {"name": case.name, "file": f"lora_linear/{case.name}.safetensors",
            "r": case.r, "lora_alpha": case.lora_alpha, "use_rslora": case.use_rslora,
            "scaling": float(s), "lora_dropout": case.lora_dropout, "bias": case.bias,
            "inputs": inputs, "outputs": [k for k in tensors if k not in inputs],
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "roundings": _roundings(case, int(math.prod(case.lead))), "atol": atol}


# ---- the tiny GPT-2 with LoRA ---------------------------------------------------------------

def gpt_model(adapted: bool = True) -> GPT:
    """The vectors' GPT (float64): every weight on the grid, LayerNorm weights near 1; adapted,
    with the adapter's A and B on the grid too (B non-zero, so every gradient is)."""
    model = GPT(GPT_CONFIG, seed=0)
    for name, p in model.named_parameters():
        p.data = grid(f"gpt2_lora/{name}", p.shape, 1.0 if ".ln_" in name and
                      name.endswith("weight") else 0.0)
    if adapted:
        apply_lora(model, GPT_LORA, rng=0)
        for name, layer in named_lora_layers(model):
            layer.lora_A.data = grid(f"gpt2_lora/{name}.lora_A", layer.lora_A.shape)
            layer.lora_B.data = grid(f"gpt2_lora/{name}.lora_B", layer.lora_B.shape)
    return model


def gpt_reference(model: GPT) -> dict[str, np.ndarray]:
    """Token ids, targets, logits, loss and every gradient, keyed as the files name them:
    ``grad/transformer.h.0.attn.c_attn.weight`` in the model file's layout (GPT-2's Conv1D
    (in, out)), ``grad/base_model.model....lora_A.weight`` as PEFT's adapter file names it."""
    b, t = GPT_BATCH
    tokens = grid("gpt2_lora/tokens", (b, t + 1))
    tokens = (np.abs(tokens * 2.0 ** GRID_BITS).astype(np.int64)) % GPT_CONFIG.vocab_size
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    layers = dict(named_lora_layers(model))
    params = {n: p.data for n, p in model.named_parameters()
              if not n.endswith((".lora_A", ".lora_B"))}
    lora = {n: (layer.lora_A.data, layer.lora_B.data,
                scaling(layer.r, int(layer.lora_alpha), layer.use_rslora))
            for n, layer in layers.items()}
    ref = oracle.gpt_reference(params, lora, GPT_CONFIG, idx, targets)
    out = {"input_ids": idx, "targets": targets, "logits": ref["logits"], "loss": ref["loss"]}
    where = {**hf.model_file_map(model), **hf.adapter_file_map(model)}
    for key, grad in ref.items():
        if key.startswith("grad:"):
            file = where[key.removeprefix("grad:")]
            out[f"grad/{file.key}"] = np.ascontiguousarray(grad.T if file.transposed else grad)
    return out


def _gpt_entry() -> dict:
    return {"base": "gpt2_lora/base", "adapter": "gpt2_lora/adapter",
            "reference": "gpt2_lora/reference.safetensors", "config": asdict(GPT_CONFIG),
            "lora": {"r": GPT_LORA.r, "lora_alpha": GPT_LORA.lora_alpha,
                     "target_modules": list(GPT_LORA.target_modules)},
            "loss": "the mean over all B*T positions of cross_entropy(logits[b, t], "
                    "targets[b, t]) (nanoGPT's model(idx, targets); transformers' labels= "
                    "shifts by one position, so compute it from the logits)",
            "gradients": "grad/KEY is d loss / d (the tensor KEY of base/model.safetensors or "
                         "adapter/adapter_model.safetensors), in that file's layout; the tied "
                         "lm_head's gradient is part of transformer.wte.weight's",
            "rtol": GPT_RTOL, "rtol_why": GPT_RTOL_WHY}


# ---- writing --------------------------------------------------------------------------------

LAYER_ATOL_WHY = (
    "atol[dtype][output] = (gamma_K(u) + 2^-53) * max|e|(abs), where |e|(abs) is the output's "
    "expression evaluated on the absolute values of the inputs (and |s|), u the dtype's unit "
    "round-off (2^-53, 2^-24, 2^-11, 2^-8) and K ('roundings') the longest chain of roundings "
    "any term goes through (each product and sum, the mask, the scaling and s itself): the "
    "classic bound |fl(e) - e| <= gamma_K |e|(abs), gamma_K = K u / (1 - K u), which holds for "
    "any order of summation and any accumulation at least as precise as the dtype; the 2^-53 "
    "is the reference's own rounding to float64. The inputs are multiples of 2^-7 below 1, "
    "exact in every dtype, so reading them adds nothing. Compare with "
    "max|yours - reference| <= atol (rtol = 0).")


def write_vectors(out) -> Path:
    """Write the golden vectors into the new directory ``out`` (it must not exist); all or
    nothing: they are built beside it and moved into place at the end. Returns ``out``."""
    out = Path(out)
    if out.exists():
        raise ConfigError(f"vectors: {out} already exists; remove it or choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as e:
        raise ConfigError(f"vectors: cannot create {out}: {e.strerror}") from None
    try:
        manifest = _write_all(tmp)
        io.save_json(tmp / MANIFEST, manifest)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_all(root: Path) -> dict:
    (root / "lora_linear").mkdir()
    cases = []
    for case in LAYER_CASES:
        tensors, atol = layer_reference(case)
        io.save_tensors(root / "lora_linear" / f"{case.name}.safetensors", tensors)
        cases.append(_layer_entry(case, tensors, atol))
    model = gpt_model()
    reference = gpt_reference(model)
    hf.save_adapter(model, root / "gpt2_lora" / "adapter")
    hf.save_pretrained(gpt_model(adapted=False), root / "gpt2_lora" / "base")
    io.save_tensors(root / "gpt2_lora" / "reference.safetensors", reference)
    digests = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(root.rglob("*")) if p.is_file()}
    return {"format": "minilora golden vectors", "version": VECTORS_VERSION,
            "notation": "W: (out, in), A: (r, in), B: (out, r), s = lora_alpha / r (rsLoRA: "
                        "lora_alpha / sqrt(r)); y = x W^T + b + s (d(x) A^T) B^T with d(x) = x * "
                        "mask; G = dL/dy; dx, dA, dB, db the gradients; W_merged = W + s B A",
            "how_computed": "inputs: multiples of 2^-7 from SHAKE-256 of their names; "
                            "references: 60-digit decimal arithmetic, rounded once to float64",
            "lora_linear": cases, "lora_linear_atol_why": LAYER_ATOL_WHY,
            "gpt2_lora": _gpt_entry(), "sha256": digests}
