"""Hugging Face model directories, both ways: ``config.json`` plus ``model.safetensors`` (or its
shards), for every architecture in ``ARCHITECTURES`` (``model_type`` -> a module each, its config
map and tensor map: see ``gpt2.py``, ``llama.py``, ``qwen2.py``).

Reading checks everything it can before it allocates: the config against what minilora runs, then
every tensor's name, shape and dtype in the headers against the shapes the config implies. Only
then is the model built and filled, one tensor at a time; on any error nothing is returned.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minilora import io
from minilora.errors import ConfigError, FileFormatError
from minilora.hf import files, gpt2, llama, qwen2
from minilora.lora import named_lora_layers
from minilora.nn import Module

ARCHITECTURES = {arch.MODEL_TYPE: arch for arch in (gpt2, llama, qwen2)}
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def is_pretrained_dir(path) -> bool:
    """Whether ``path`` looks like a Hugging Face model directory (a ``config.json`` with a
    ``model_type``), as opposed to a minilora run directory. Reads only that small file."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    try:
        return isinstance(files.read_json(path, CONFIG, "model config").get("model_type"), str)
    except (FileFormatError, AttributeError):
        return False


def architecture_of(model: Module, what: str):
    """The architecture module for ``model``'s class (and its config's ``model_type``, where the
    class serves several), or a ConfigError."""
    for arch in ARCHITECTURES.values():
        kind = getattr(getattr(model, "config", None), "model_type", arch.MODEL_TYPE)
        if isinstance(model, arch.MODEL_CLASS) and kind == arch.MODEL_TYPE:
            return arch
    known = sorted({arch.MODEL_CLASS.__name__ for arch in ARCHITECTURES.values()})
    raise ConfigError(f"{what}: expected one of {known}, got {type(model).__name__}")


@dataclass(frozen=True)
class FileTensor:
    """Where a parameter is kept in a Hugging Face file: its ``key``, whether the file holds its
    transpose (GPT-2's Conv1D weights), and ``tied_to``: the parameter whose tensor it shares, if
    the file leaves it out for that (a tied ``lm_head.weight``)."""

    key: str
    transposed: bool = False
    tied_to: str | None = None


def model_file_map(model: Module) -> dict[str, FileTensor]:
    """minilora parameter name -> where ``save_pretrained`` (and ``transformers``) keep it in
    ``model.safetensors``, for every parameter of the model's architecture (an adapted model:
    those of its base layers). Data for a caller that reads the files itself, e.g. to compare a
    merge: ``array.T`` if ``transposed``."""
    arch = architecture_of(model, "model_file_map")
    out = {key: FileTensor(key, key.endswith(arch.TRANSPOSED))
           for key, _ in arch.tensor_shapes(model.config)}
    for key, target in arch.tied(model.config).items():
        out[key] = FileTensor(target, out[target].transposed, tied_to=target)
    return out


def from_pretrained(path, dtype: str = "float32", dropout: float | None = None,
                    model_type: str | tuple[str, ...] | None = None) -> Module:
    """The model a Hugging Face directory holds, in eval mode (as ``from_pretrained`` returns it):
    a [`GPT`][minilora.models.GPT] for ``model_type`` "gpt2", a
    [`LlamaForCausalLM`][minilora.models.LlamaForCausalLM] for "llama" and "qwen2"; any other is
    refused.

    path: a directory with ``config.json`` and ``model.safetensors`` (or
        ``model.safetensors.index.json`` and its shards), as ``save_pretrained`` writes it.
    dtype: "float32" or "float64"; float16 and bfloat16 tensors are read exactly and converted.
    dropout: replaces the file's dropout rates (they matter only when training; GPT-2 only).
    model_type: if given, the ``model_type`` (or one of those) the config must have
        (``GPT.from_pretrained``: "gpt2").
    Damaged or hostile files, variants minilora does not run: a MiniLoRAError naming the file and
    the field or tensor.
    """
    if dtype not in ("float32", "float64"):
        raise ConfigError(f"from_pretrained: dtype must be 'float32' or 'float64', got {dtype!r}")
    arch, hf_config, stored = stored_tensors(path, model_type)
    try:
        config = arch.config_from_hf(hf_config, dtype, dropout)
    except ConfigError as e:
        raise FileFormatError(f"{Path(path) / CONFIG}: {e}") from None
    plan = _plan(arch, config, stored)
    model = arch.MODEL_CLASS(config, seed=0)  # every size now agrees with the files
    _fill(model, plan, np.dtype(config.dtype), arch.from_file, arch.tied(config))
    return model.eval()


def _open(path, model_type) -> tuple[Path, dict, object]:
    """(the directory, its ``config.json``, the architecture module for its ``model_type``)."""
    directory = files.directory_of(path, "model")
    hf_config = files.read_json(directory, CONFIG, "model config", {"model_type": str})
    kind = hf_config["model_type"]
    wanted = sorted(ARCHITECTURES) if model_type is None else \
        [model_type] if isinstance(model_type, str) else list(model_type)
    arch = ARCHITECTURES.get(kind)
    if arch is None or kind not in wanted:
        raise FileFormatError(f"{directory / CONFIG}: model_type {kind!r}; minilora reads "
                              f"{', '.join(wanted)}")
    return directory, hf_config, arch


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a model directory as its files hold it: the file, the key in it, and what
    the header says (``info.dtype`` is the file's name for the dtype: ``"BF16"``, ``"F32"``)."""

    path: Path
    file_key: str
    info: io.TensorInfo

    def read(self, arch) -> np.ndarray:
        """The tensor in minilora's layout (``arch.from_file``), as float64: float16 and bfloat16
        are widened exactly, so every bit of the stored value is kept."""
        array = io.read_tensors(self.path, {self.file_key: self.info}, np.float64)[self.file_key]
        return arch.from_file(self.file_key, array)


def stored_tensors(path, model_type=None) -> tuple[object, dict, dict[str, StoredTensor]]:
    """(the architecture module, ``config.json``, name -> StoredTensor for every tensor) of a model
    directory, headers only, for comparing a file with what it should hold (``minilora check``):
    nothing is checked against the config, so a missing, extra or mis-shaped tensor is the
    caller's to report. Names are the architecture's (``canonical_key``: minilora's parameter
    names); a buffer it skips is left out; two keys for one name are refused."""
    directory, hf_config, arch = _open(path, model_type)
    out: dict[str, StoredTensor] = {}
    for file_key, (file, info) in files.tensor_headers(directory, WEIGHTS, WEIGHTS_INDEX,
                                                        "model").items():
        name = arch.canonical_key(file_key)
        if name is None:
            continue
        if name in out:
            raise FileFormatError(f"{file}: tensors {out[name].file_key!r} and {file_key!r} are "
                                  f"the same tensor {name!r}")
        out[name] = StoredTensor(file, file_key, info)
    return arch, hf_config, out


def _plan(arch, config, stored: dict[str, StoredTensor]) -> dict[str, tuple[Path, str,
                                                                             io.TensorInfo]]:
    """key (as ``tensor_shapes`` names it) -> (file, key in the file, info) of ``stored``
    ([`stored_tensors`][]), checked: every tensor the config implies present once with its
    shape and a float dtype, and nothing else."""
    plan = {key: (t.path, t.file_key, t.info) for key, t in stored.items()}
    # no more names than the files hold tensors, plus one: enough to see that some are missing
    expected = dict(itertools.islice(arch.tensor_shapes(config), len(plan) + 1))
    missing = [k for k in expected if k not in plan]
    if missing:
        where = sorted({str(p) for p, _, _ in plan.values()}) or ["the directory"]
        raise FileFormatError(f"{where[0]}: missing tensors {missing[:4]}"
                              f"{' and more' if len(missing) > 4 else ''} (the config implies "
                              "them)")
    for key, (path, file_key, info) in plan.items():
        shape = expected.get(key, expected.get(arch.tied(config).get(key)))
        if shape is None:
            raise FileFormatError(f"{path}: unexpected tensor {file_key!r} (not part of "
                                  f"{arch.ARCHITECTURES[0]})")
        if info.shape != shape:
            raise FileFormatError(f"{path}: tensor {file_key!r} has shape {info.shape}, the "
                                  f"config implies {shape}")
        files.check_float(path, file_key, info)
    return plan


def _fill(model: Module, plan: dict, dtype: np.dtype, from_file, tied: dict[str, str]) -> None:
    """Read the planned tensors file by file into ``model``'s parameters; a tied copy in the file
    must equal the tensor it is tied to."""
    params = dict(model.named_parameters())
    by_file: dict[Path, dict[str, str]] = {}
    for key, (path, file_key, _) in plan.items():
        by_file.setdefault(path, {})[file_key] = key
    tied_copies = {}
    for path, keys in by_file.items():
        infos = {fk: plan[k][2] for fk, k in keys.items()}
        for file_key, array in io.read_tensors(path, infos, dtype).items():
            key = keys[file_key]
            if not np.all(np.isfinite(array)):
                raise FileFormatError(f"{path}: tensor {file_key!r} holds NaN or infinity")
            if key in tied:
                tied_copies[key] = (path, file_key, array)
                continue
            params[key].data = from_file(key, array)
    for key, (path, file_key, array) in tied_copies.items():
        if not np.array_equal(array, params[tied[key]].data):
            raise FileFormatError(f"{path}: {file_key!r} differs from {tied[key]!r}, which the "
                                  "config ties it to (tie_word_embeddings): untied embeddings")


def save_pretrained(model: Module, path) -> Path:
    """Write ``model`` as ``transformers`` would: ``config.json`` and ``model.safetensors`` (tied
    weights once, GPT-2's Conv1D weights as (in, out)), each file atomically, for
    ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` to load. Returns the
    directory.

    A model with LoRA layers is refused: merge it (``merge_and_unload``) or save the adapter
    (``save_adapter``)."""
    arch = architecture_of(model, "save_pretrained")
    adapted = [name for name, _ in named_lora_layers(model)]
    if adapted:
        raise ConfigError(f"save_pretrained: the model has LoRA layers ({adapted[:3]}); "
                          "merge_and_unload(model) first, or save the adapter with save_adapter")
    hf_config = arch.config_to_hf(model.config)
    params = dict(model.named_parameters())
    tensors = {key: arch.to_file(key, params[key].data)
               for key, _ in arch.tensor_shapes(model.config)}
    return files.write_files(path, {WEIGHTS: files.safetensors_bytes(tensors, "save_pretrained"),
                                    CONFIG: io.dumps_json(hf_config) + "\n"})
