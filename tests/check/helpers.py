"""What the check tests share: merged model directories written by hand in any dtype, correct or
broken on purpose in the ways people break them, and what the check must say about each."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import safetensors.numpy
from hypothesis import assume
from hypothesis import strategies as st

from minilora.check.report import EXACT, ROUND_OFF
from minilora.check.rounding import round_to
from tests.hf.helpers import write_safetensors

# a break -> the diagnosis code the check must give the broken layer
BREAKS = {"doubled": "merged-twice", "merged twice": "merged-twice",
          "transposed": "transposed-delta", "not merged": "not-merged",
          "rsLoRA scaling": "rslora-scaling", "into another layer": "merged-elsewhere"}


def read_file_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of ``directory/model.safetensors`` as float64, in the file's layout."""
    return {k: v.astype(np.float64) for k, v in
            safetensors.numpy.load_file(str(Path(directory) / "model.safetensors")).items()}


def write_model(directory: Path, base_dir: Path, tensors: dict[str, np.ndarray],
                dtype: str) -> Path:
    """A model directory: the base's config.json and ``tensors`` (float64) correctly rounded to
    ``dtype`` (bfloat16 written as its bits, which NumPy cannot hold)."""
    directory.mkdir(parents=True)
    shutil.copy(base_dir / "config.json", directory / "config.json")
    if dtype == "bfloat16":
        raw = {k: ("BF16", v.shape, (round_to(v, "bfloat16").astype(np.float32).view(np.uint32)
                                     >> 16).astype("<u2").tobytes()) for k, v in tensors.items()}
        write_safetensors(directory / "model.safetensors", raw, {"format": "pt"})
    else:
        safetensors.numpy.save_file({k: v.astype(dtype) for k, v in tensors.items()},
                                    str(directory / "model.safetensors"), {"format": "pt"})
    return directory


def merge(base: dict, deltas: dict, dtype: str, breaks: dict[str, str] | None = None,
          r: int = 1) -> tuple[dict, dict[str, str]]:
    """The merged tensors (file layout) and the partner of each "into another layer" break.

    base: file key -> W; deltas: file key -> s B A, both in the file's layout. breaks: file key ->
    a key of BREAKS; "into another layer" adds the layer's delta to the first unbroken layer of
    the same shape that no other break took (its key is returned as the partner): one stray
    delta per layer, so that each can be told apart.
    """
    breaks, out, partners = breaks or {}, dict(base), {}
    for key, delta in deltas.items():
        kind = breaks.get(key)
        W = base[key]
        if kind is None:
            out[key] = W + delta
        elif kind == "doubled":
            out[key] = W + 2 * delta
        elif kind == "merged twice":  # the second merge adds to the stored, rounded first one
            out[key] = round_to(W + delta, dtype) + delta
        elif kind == "transposed":
            out[key] = W + delta.T
        elif kind == "not merged":
            out[key] = W
        elif kind == "rsLoRA scaling":
            out[key] = W + math.sqrt(r) * delta
        elif kind == "into another layer":
            partner = next(k for k, d in deltas.items() if k != key and k not in breaks
                           and k not in partners.values() and d.shape == delta.shape)
            partners[key] = partner
            out[key] = W
    for key, partner in partners.items():
        out[partner] = out[partner] + deltas[key]
    return out, partners


@st.composite
def broken_layers(draw, shapes: dict[str, tuple]) -> dict[str, str]:
    """One to three of the layers (file key -> shape) and a break for each; a transposed delta
    needs a square layer, a delta merged into another layer an unbroken partner of its shape
    that no other such break takes."""
    keys = sorted(shapes)
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True))
    breaks = {key: draw(st.sampled_from(sorted(BREAKS))) for key in chosen}
    for key, kind in breaks.items():
        if kind == "transposed":
            assume(shapes[key][0] == shapes[key][1])
    strays = [shapes[k] for k, kind in breaks.items() if kind == "into another layer"]
    for shape in set(strays):
        assume(sum(k not in breaks and shapes[k] == shape for k in keys) >= strays.count(shape))
    return breaks


def assert_diagnosed(report, breaks: dict[str, str], partners: dict[str, str]) -> None:
    """Each broken layer WRONG with its diagnosis (a partner: the delta of the other layer), and
    every other tensor exact or round-off."""
    rows = {row.name: row for row in report.rows}
    wrong = {**{k: BREAKS[kind] for k, kind in breaks.items()},
             **{p: "delta-of-other" for p in partners.values()}}
    for name, row in rows.items():
        if name in wrong:
            assert row.verdict == "WRONG" and row.code == wrong[name], (name, breaks, row)
        else:
            assert row.verdict in (EXACT, ROUND_OFF), (name, breaks, row)
    for key, partner in partners.items():
        assert rows[key].related == partner.removesuffix(".weight")
        assert rows[partner].related == key.removesuffix(".weight")
    assert report.exit_code == 1
