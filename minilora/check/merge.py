"""``minilora check --merged``: a merged model against ``W' = W + s B A``, tensor by tensor.

For every tensor of the merged model the reference says what it must hold (an adapted layer's
weight ``W + s B A``, any other tensor the base's, or the adapter's trained value of it) and the
merged file's dtype says how far a correct merge may land from it (``rounding.merge_bound``). A
tensor outside that bound is WRONG, and the check then tries the mistakes people make, each as
the value it would have stored, under the same bound: the first ones that fit are the diagnosis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from minilora import hf
from minilora.check.reference import AdaptedLayer, Reference, load_reference
from minilora.check.report import EXACT, ROUND_OFF, UNRESOLVABLE, WRONG, Report, Row
from minilora.check.rounding import (
    FILE_DTYPES,
    UNIT_ROUNDOFF,
    is_correctly_rounded,
    merge_bound,
    reference_error,
    wider,
)
from minilora.errors import FileFormatError
from minilora.lora import lora_scaling


@dataclass(frozen=True)
class Mistake:
    """A way to get a merge wrong: what it would have stored, and the words for it."""

    code: str
    text: str
    value: np.ndarray  # the tensor it would have stored (float64, minilora's layout)
    delta_abs: np.ndarray | float  # s |B| |A| of the delta(s) it adds, for its bound
    transposed: bool = False  # compare with the stored tensor transposed
    related: str = ""  # the other layer it involves


def check_merge(base, adapter, merged) -> Report:
    """Compare the model directory ``merged`` with ``base`` plus ``adapter`` merged in float64.

    Rows: every tensor the merged model must hold, in the model's order, then every tensor it
    holds and should not. A fault in any of the three directories themselves (not a model, a
    damaged file) is a MiniLoRAError naming the file.
    """
    ref = load_reference(base, adapter)
    _, hf_config, stored = hf.stored_tensors(merged)
    if hf_config["model_type"] != ref.model_type:
        raise FileFormatError(f"{merged}: model_type {hf_config['model_type']!r}, the base's is "
                              f"{ref.model_type!r}: not a merge of this base")
    rows: list[Row] = []
    for name in ref.expected:
        if name in stored:
            rows.append(_check_tensor(ref, name, stored[name], name))
        else:
            rows.append(Row(name, _kind(ref, name), None, WRONG, diagnosis="missing from the "
                            "merged model", code="missing"))
    ties = ref.arch.tied(ref.model.config)
    for name, tensor in stored.items():
        if name in ref.expected:
            continue
        tied = ties.get(name)
        if tied in ref.expected:  # a tied copy saved anyway must equal what it is tied to
            rows.append(_check_tensor(ref, tied, tensor, name, kind=f"tied to {tied}"))
        else:
            rows.append(_extra(name, tensor))
    _point_to_destinations(rows)
    return Report("merge", rows, _notes(rows), {
        "base": str(base), "adapter": str(adapter), "merged": str(merged),
        "adapted_layers": [layer.name for layer in ref.layers.values()],
        "unit_roundoff": {d: UNIT_ROUNDOFF[d] for d in sorted({r.dtype for r in rows
                                                               if r.dtype in UNIT_ROUNDOFF})}})


def _kind(ref: Reference, name: str) -> str:
    if name in ref.layers:
        return "adapted"
    return "base" if ref.expected[name] is ref.base.get(name) else "trained by the adapter"


def _extra(name: str, tensor: hf.StoredTensor) -> Row:
    peft_names = ".base_layer." in tensor.file_key or ".lora_" in tensor.file_key
    why = ("PEFT's adapter names: the model was saved with its adapter in place (merge_and_unload "
           "returns the plain model to save)" if peft_names else "not a tensor of the base model")
    return Row(name, "extra", FILE_DTYPES.get(tensor.info.dtype, tensor.info.dtype), WRONG,
               diagnosis=f"extra tensor {tensor.file_key!r}: {why}", code="extra")


def _check_tensor(ref: Reference, name: str, tensor: hf.StoredTensor, shown: str,
                  kind: str | None = None) -> Row:
    """The row of one stored tensor against ``ref.expected[name]``."""
    kind = kind or _kind(ref, name)
    dtype = FILE_DTYPES.get(tensor.info.dtype)
    row = Row(shown, kind, dtype or tensor.info.dtype, WRONG)
    if dtype is None:
        row.diagnosis, row.code = f"dtype {tensor.info.dtype}, not a floating-point one", "dtype"
        return row
    expected = ref.expected[name]
    stored = tensor.read(ref.arch)
    if stored.shape != expected.shape:
        want = ref.arch.to_file(name, expected).shape
        row.code = "transposed-weight" if stored.T.shape == expected.shape else "shape"
        row.diagnosis = (f"shape {tensor.info.shape} in the file, expected {want}"
                         + (": stored transposed" if row.code == "transposed-weight" else ""))
        return row
    if not np.all(np.isfinite(stored)):
        row.diagnosis, row.code = "holds NaN or infinity", "not-finite"
        return row
    fit = _Fit(ref, name, stored, dtype)
    err = np.abs(stored - expected)
    row.max_abs = float(err.max(initial=0.0))
    scale = float(np.abs(expected).max(initial=0.0))
    row.max_rel = row.max_abs / scale if scale > 0 else row.max_abs
    row.of_bound = fit.of_bound(expected, fit.delta_abs)
    if row.of_bound <= 1:
        row.verdict = EXACT if fit.exact() else ROUND_OFF
        if fit.layer is not None and fit.of_bound(fit.base, 0.0) <= 1:
            row.verdict = UNRESOLVABLE
            row.diagnosis = (f"s B A is below what {dtype} resolves here: the base's weight fits "
                             "as well, so the file cannot show whether it was merged")
        return row
    found = [m for m in fit.mistakes() if fit.of_bound(m.value, m.delta_abs, m.transposed) <= 1]
    if not found and fit.layer is not None:
        found = [m for m in [fit.fitted_scale()] if m is not None
                 and fit.of_bound(m.value, m.delta_abs) <= 1]
    if found:
        row.diagnosis, row.code = " or ".join(m.text for m in found), found[0].code
        row.related = found[0].related
    else:
        what = "W + s B A" if fit.layer is not None else (
            "the base's" if kind == "base" else "the expected value")
        row.diagnosis = f"differs from {what} by up to {row.of_bound:.3g} times the bound; no " \
                        "known mistake fits"
    return row


class _Fit:
    """One stored tensor, its reference and the bound of its dtype; the mistakes to try."""

    def __init__(self, ref: Reference, name: str, stored: np.ndarray, dtype: str):
        self.ref, self.name, self.stored, self.dtype = ref, name, stored, dtype
        self.layer: AdaptedLayer | None = ref.layers.get(name)
        self.base = ref.base.get(name, ref.expected[name])
        self.base_abs = np.abs(self.base)
        self.delta_abs = 0.0 if self.layer is None else self.layer.delta_abs
        base_dtype = ref.base_dtypes.get(name, "float64")
        self.bound_args = {
            "dtype": dtype, "r": 0 if self.layer is None else self.layer.r,
            "base_wider": self.layer is not None and wider(base_dtype, dtype),
            "adapter_wider": self.layer is not None and wider(self.layer.adapter_dtype, dtype)}

    def of_bound(self, value: np.ndarray, delta_abs, transposed: bool = False) -> float:
        """max |stored - value| / bound: <= 1 means ``value`` explains the stored tensor."""
        stored = self.stored.T if transposed else self.stored
        bound = merge_bound(value, self.base_abs, delta_abs, **self.bound_args)
        return float(np.max(np.abs(stored - value) / bound, initial=0.0))

    def exact(self) -> bool:
        slack = reference_error(self.base_abs + self.delta_abs, self.bound_args["r"] + 3)
        return is_correctly_rounded(self.stored, self.ref.expected[self.name], self.dtype, slack)

    def mistakes(self) -> list[Mistake]:
        W, out = self.base, []
        if self.layer is not None:
            delta, S = self.layer.delta, self.layer.delta_abs
            out += [Mistake(code, text, W + f * delta, abs(f) * S)
                    for code, f, text in scaling_mistakes(self.layer, self.ref.config)]
            if W.shape[0] == W.shape[1]:
                out.append(Mistake("transposed-delta", "delta transposed: (B A)^T was added "
                                   "(fan_in_fan_out, the (in, out) layout, mixed up)",
                                   W + delta.T, S.T))
        elif self.ref.expected[self.name] is not W:
            out.append(Mistake("untrained", "holds the base's value: the adapter's trained value "
                               "is missing", W, 0.0))
        if W.ndim == 2 and W.shape[0] == W.shape[1]:
            out.append(Mistake("transposed-weight", "the whole tensor is stored transposed",
                               self.ref.expected[self.name], self.delta_abs, transposed=True))
        for other in self.ref.layers.values():
            if other.name == getattr(self.layer, "name", None) or other.weight.shape != W.shape:
                continue
            if self.layer is None:
                out.append(Mistake("delta-of-other", f"holds the delta of {other.name}: merged "
                                   "into the wrong layer", W + other.delta, other.delta_abs,
                                   related=other.name))
            else:
                out += [Mistake("delta-of-other", f"holds the delta of {other.name} instead of "
                                "its own", W + other.delta, other.delta_abs, related=other.name),
                        Mistake("delta-of-other", f"holds the delta of {other.name} on top of "
                                "its own", self.ref.expected[self.name] + other.delta,
                                self.delta_abs + other.delta_abs, related=other.name)]
        return out

    def fitted_scale(self) -> Mistake | None:
        """The delta times the factor c that fits best (least squares), when no named one does."""
        delta = self.layer.delta
        norm = float(np.sum(delta * delta))
        if norm == 0:
            return None
        c = float(np.sum((self.stored - self.base) * delta)) / norm
        s = self.layer.scaling
        return Mistake("scaled", f"delta scaled by {c:.4g}: s = {c * s:.4g} was used, the "
                       f"adapter's is {s:.4g}", self.base + c * delta,
                       abs(c) * self.layer.delta_abs)


def scaling_factors(layer: AdaptedLayer, config) -> list[tuple[str, float, str]]:
    """(code, factor f, words) for each common mistake that stores W + f s B A instead of
    W + s B A (or runs the layer with f s): the scaling's known wrong values."""
    s, r, alpha = layer.scaling, layer.r, layer.lora_alpha
    found = [("not-merged", 0.0, "not merged: the weight is the base's"),
             ("merged-twice", 2.0, "delta added twice (merged twice, or its scaling doubled)"),
             ("subtracted", -1.0, "delta subtracted (unmerged instead of merged)"),
             ("scaling-missing", 1 / s, f"scaling missing: B A added without s = {s:g}"),
             ("scaling-squared", s, f"scaling applied twice: s^2 B A with s = {s:g}"),
             ("alpha-not-divided", alpha / s, f"s = lora_alpha = {alpha:g}, not divided by "
                                              f"{'sqrt(r)' if layer.use_rslora else 'r'}")]
    if layer.use_rslora:
        found.append(("plain-scaling", math.sqrt(r) / r, f"plain scaling alpha/r = {alpha / r:g} "
                      f"used where the adapter says rsLoRA alpha/sqrt(r) = {s:g}"))
    else:
        found.append(("rslora-scaling", math.sqrt(r), f"rsLoRA scaling alpha/sqrt(r) = "
                      f"{alpha / math.sqrt(r):g} used where the adapter says alpha/r = {s:g}"))
    plain = lora_scaling(config.r, config.lora_alpha, layer.use_rslora)
    if (config.r, config.lora_alpha) != (r, alpha):
        found.append(("pattern-ignored", plain / s, f"the config's r = {config.r}, lora_alpha = "
                      f"{config.lora_alpha:g} used, not the pattern's r = {r}, lora_alpha = "
                      f"{alpha:g}"))
    return found


def scaling_mistakes(layer: AdaptedLayer, config) -> list[tuple[str, float, str]]:
    """[`scaling_factors`][], with a factor two mistakes share as one entry naming both and
    a factor of 1 (no mistake at all for this layer) left out."""
    merged: list[tuple[str, float, str]] = []
    for code, f, text in scaling_factors(layer, config):
        if math.isclose(f, 1.0, rel_tol=1e-12):
            continue
        same = next((i for i, m in enumerate(merged) if math.isclose(m[1], f, rel_tol=1e-12)),
                    None)
        if same is None:
            merged.append((code, f, text))
        else:
            merged[same] = (merged[same][0], f, f"{merged[same][2]} or {text}")
    return merged


def _point_to_destinations(rows: list[Row]) -> None:
    """A layer not merged whose delta another layer holds: say where it went."""
    by_name = {row.name: row for row in rows}
    for row in rows:
        source = by_name.get(f"{row.related}.weight") if row.code == "delta-of-other" else None
        if source is not None and source.code == "not-merged":
            source.diagnosis += f"; its delta was merged into {row.name.rpartition('.')[0]}"
            source.code, source.related = "merged-elsewhere", row.name.rpartition(".")[0]


def _notes(rows: list[Row]) -> list[str]:
    notes = []
    unresolvable = [row.name for row in rows if row.verdict == UNRESOLVABLE]
    if unresolvable:
        notes.append(f"{len(unresolvable)} layer(s) unresolvable in their dtype: the logits check "
                     "(minilora check --logits) can show whether the adapter took effect")
    return notes
