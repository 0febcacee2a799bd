"""``minilora check --logits``: someone's logits for given token ids against the reference
forward (the base with its adapter, in float64), position by position.

A whole forward pass has no elementwise bound as simple as a merge's, so a position is compared
by its relative error, ``max_v |L - R| / max_v |R|`` over the vocabulary, against a tolerance per
dtype the logits were computed in (``LOGITS_TOLERANCE``, docs/conformance.md says where each
comes from; ``tolerance=`` replaces it). Where the logits are WRONG, the check reruns the
reference with each common scaling mistake made in every adapted layer at once (the adapter left
out, its scaling doubled, squared, missing, rsLoRA for plain): one that fits is the diagnosis.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np

from minilora import io
from minilora.check.merge import scaling_factors
from minilora.check.reference import Reference, load_reference
from minilora.check.report import EXACT, ROUND_OFF, UNRESOLVABLE, WRONG, Report, Row
from minilora.check.rounding import FILE_DTYPES, dtype_name, is_correctly_rounded
from minilora.errors import ConfigError, FileFormatError
from minilora.hf import files
from minilora.lora import named_lora_layers
from minilora.tensor import no_grad

# max_v |L - R| / max_v |R| that round-off in each dtype explains at a position of a small model
LOGITS_TOLERANCE = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


def check_logits(base, adapter, logits, input_ids=None, computed_in: str | None = None,
                 tolerance: float | None = None) -> Report:
    """Compare the logits in the file ``logits`` with the reference's for the same token ids.

    logits: a ``.npy`` (read without pickle) or ``.safetensors`` file holding (B, T, V) or
        (T, V) logits (in a safetensors file, the tensor ``logits`` or its only tensor).
    input_ids: a ``.npy`` or ``.safetensors`` file of (B, T) or (T,) integer ids; None: the
        tensor ``input_ids`` of the logits' safetensors file.
    computed_in: the dtype the other side computed in (default: the logits file's dtype), which
        picks the tolerance; tolerance: replaces it.
    """
    values, file_dtype = read_array(logits, "logits")
    if input_ids is None and Path(logits).suffix != ".safetensors":
        raise ConfigError(f"check_logits: {logits} holds logits alone; give the token ids too "
                          "(--input-ids FILE), or both in one .safetensors file")
    ids, _ = read_array(logits if input_ids is None else input_ids, "input_ids",
                        hint="" if input_ids is not None else " (or give --input-ids FILE)")
    computed_in = dtype_name(computed_in or file_dtype)
    tol = LOGITS_TOLERANCE[computed_in] if tolerance is None else float(tolerance)
    if not tol > 0:
        raise ConfigError(f"check_logits: tolerance must be positive, got {tolerance!r}")
    ref = load_reference(base, adapter)
    ids, values = _shapes(ids, values, ref, logits, input_ids)
    reference = _forward(ref, ids)
    rows = [_position_row(b, t, ids, values, reference, file_dtype, tol)
            for b in range(ids.shape[0]) for t in range(ids.shape[1])]
    base_logits = _forward(ref, ids, {layer.name: 0.0 for layer in ref.layers.values()})
    for row, (b, t) in zip(rows, np.ndindex(*ids.shape), strict=True):
        if row.verdict in (EXACT, ROUND_OFF) and _relative(values[b, t],
                                                           base_logits[b, t]) <= tol:
            row.verdict = UNRESOLVABLE
            row.diagnosis = "the base model without the adapter fits as well"
    notes, summary = [], {"base": str(base), "adapter": str(adapter), "logits": str(logits),
                          "computed_in": computed_in, "tolerance": tol,
                          "max_rel": max(row.max_rel for row in rows)}
    if any(row.verdict == WRONG for row in rows):
        diagnosis = _diagnose(ref, ids, values, tol)
        for row in rows:
            if row.verdict == WRONG:
                row.diagnosis, row.code = diagnosis
        first = next(i for i, row in enumerate(rows) if row.verdict == WRONG)
        if 0 < first and all(row.verdict == WRONG for row in rows[first:]) and ids.shape[0] == 1:
            notes.append(f"positions {first} onwards are WRONG, the ones before are right: "
                         "something that depends on the position (the causal mask, position "
                         "ids, a key/value cache)")
        summary["diagnosis"] = diagnosis[0]
        if not diagnosis[0]:
            notes.append("no scaling mistake made in every adapted layer fits: if you have the "
                         "merged model, --merged DIR finds the layer that is wrong")
    if all(row.verdict == UNRESOLVABLE for row in rows):
        notes.append("the adapter changes these logits by less than the tolerance: choose "
                     "inputs where it matters, or a larger adapter, to see whether it was applied")
    return Report("logits", rows, notes, summary)


def read_array(path, key: str, hint: str = "") -> tuple[np.ndarray, str]:
    """(the array, its dtype name) of ``key`` in a ``.safetensors`` file (or its only tensor),
    or of a ``.npy`` file (read with ``allow_pickle=False``); bfloat16 widened exactly."""
    path = Path(path)
    if path.suffix in files.PICKLE_SUFFIXES:
        raise FileFormatError(files.pickle_message(path))
    if path.suffix == ".npy":
        io.read_bytes(path, "npy")  # a missing file or a directory: the usual one line
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise FileFormatError(f"{path}: not a .npy array minilora reads without pickle: "
                                  f"{e}") from None
        except Exception as e:  # numpy's own errors for a damaged file, wrapped
            raise FileFormatError(f"{path}: damaged .npy file: {e}") from None
        return array, str(array.dtype)
    if path.suffix != ".safetensors":
        raise FileFormatError(f"{path}: expected a .npy or .safetensors file")
    infos, _ = io.read_header(path)
    if key not in infos and (key == "input_ids" or len(infos) != 1):
        raise FileFormatError(f"{path}: no tensor {key!r}{hint}; it holds {sorted(infos)[:6]}")
    name = key if key in infos else next(iter(infos))
    array = io.read_tensors(path, {name: infos[name]})[name]
    return array, FILE_DTYPES.get(infos[name].dtype, str(array.dtype))


def _shapes(ids: np.ndarray, values: np.ndarray, ref: Reference, logits, input_ids):
    """ids (B, T) and logits (B, T, V), checked against each other and against the model."""
    where = input_ids or logits
    if not np.issubdtype(ids.dtype, np.integer):
        raise FileFormatError(f"{where}: input_ids must be integers, got {ids.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        raise FileFormatError(f"{logits}: logits must be floating-point, got {values.dtype}")
    ids = ids[None] if ids.ndim == 1 else ids
    values = values[None] if values.ndim == 2 else values
    config = ref.model.config
    if ids.ndim != 2 or values.ndim != 3 or values.shape != (*ids.shape, config.vocab_size):
        raise FileFormatError(f"{logits}: logits of shape {values.shape} for input_ids of shape "
                              f"{ids.shape}; expected (B, T, {config.vocab_size}) for (B, T)")
    context = getattr(config, "block_size", None) or config.max_position_embeddings
    if ids.size == 0 or ids.shape[1] > context:
        raise FileFormatError(f"{where}: {ids.shape[1]} positions; the model takes 1 to "
                              f"{context}")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise FileFormatError(f"{where}: token ids from {ids.min()} to {ids.max()}; the "
                              f"vocabulary has {config.vocab_size}")
    if not np.all(np.isfinite(values)):
        raise FileFormatError(f"{logits}: logits hold NaN or infinity")
    return ids.astype(np.int64), values.astype(np.float64)


def _forward(ref: Reference, ids: np.ndarray, factors: dict[str, float] | None = None):
    """The reference logits (B, T, V), float64, with each named layer's scaling times its
    factor (the mistakes) for the duration of the call."""
    layers = dict(named_lora_layers(ref.model))
    with contextlib.ExitStack() as undo, no_grad():
        for name, f in (factors or {}).items():
            held = layers[name].adapters
            for a in layers[name].active_adapters:
                undo.callback(held.__setitem__, a, held[a])
                held[a] = copy.copy(held[a])
                # the mistakes include f <= 0, which a config refuses: set past its check
                object.__setattr__(held[a], "lora_alpha", held[a].lora_alpha * f)
        return ref.model(ids)[0].data


def _relative(values: np.ndarray, reference: np.ndarray) -> float:
    scale = float(np.max(np.abs(reference)))
    err = float(np.max(np.abs(values - reference)))
    return err / scale if scale > 0 else err


def _position_row(b: int, t: int, ids, values, reference, dtype: str, tol: float) -> Row:
    theirs, ours = values[b, t], reference[b, t]
    rel = _relative(theirs, ours)
    row = Row(f"{b},{t}", f"token {int(ids[b, t])}", dtype, WRONG,
              max_abs=float(np.max(np.abs(theirs - ours))), max_rel=rel, of_bound=rel / tol)
    if rel <= tol:
        slack = LOGITS_TOLERANCE["float64"] * float(np.max(np.abs(ours)))
        row.verdict = EXACT if dtype in FILE_DTYPES.values() and is_correctly_rounded(
            theirs, ours, dtype, slack) else ROUND_OFF
    return row


def _diagnose(ref: Reference, ids, values, tol: float) -> tuple[str, str]:
    """(words, code) of the first scaling mistake, made in every adapted layer, whose logits fit
    every position; ("", "") if none does."""
    per_layer = {layer.name: {code: (f, text)
                              for code, f, text in scaling_factors(layer, ref.config)}
                 for layer in ref.layers.values()}
    first = next(iter(per_layer.values()), {})
    for code in first:
        factors = {name: mistakes.get(code, (1.0, ""))[0] for name, mistakes in per_layer.items()}
        guess = _forward(ref, ids, factors)
        if all(_relative(values[i], guess[i]) <= tol for i in np.ndindex(*ids.shape)):
            text = "the adapter was not applied: these are the base model's logits" \
                if code == "not-merged" else f"every adapted layer: {first[code][1]}"
            return text, code
    return "", ""
