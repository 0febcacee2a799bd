"""The files of a Hugging Face directory, read only from inside it and written atomically.

A directory is trusted no further than its own files: a name that leads outside it (``../x``, an
absolute path, a symlink out) is refused before anything is read, except that a snapshot of the
Hugging Face cache (``.../snapshots/REV/``) may link into its repository's ``blobs`` folder,
which is how the cache stores every file. Pickle files (``pytorch_model.bin``, ``.pt``,
``.ckpt``, ...) are never opened: they can run code.
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.numpy

from minilora import io
from minilora.errors import ConfigError, FileFormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_FLOATS = ("F64", "F32", "F16", "BF16")


def pickle_message(path: Path) -> str:
    return (f"{path}: a pickle file, which minilora never opens (loading it can run code); save "
            "the model as safetensors (transformers and PEFT: save_pretrained(dir), the default)")


def directory_of(path, what: str) -> Path:
    """``path`` as an existing directory, or a FileFormatError saying what it is instead."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise FileFormatError(pickle_message(path))
        raise FileFormatError(f"{path}: expected a {what} directory, found a file")
    if not path.is_dir():
        raise FileFormatError(f"{path}: {what} directory does not exist")
    return path


def member(directory: Path, name, what: str) -> Path:
    """The file ``name`` inside ``directory``, refused if the name or a symlink leads outside it."""
    if not isinstance(name, str) or not name or name in (".", "..") \
            or any(c in name for c in "/\\\0") or os.path.isabs(name):
        raise FileFormatError(f"{directory}: {what} {name!r:.80} is not a file name inside the "
                              "directory; refused")
    path = directory / name
    if name.endswith(PICKLE_SUFFIXES):
        raise FileFormatError(pickle_message(path))
    try:
        real, home = path.resolve(), directory.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise FileFormatError(f"{path}: cannot resolve {what}: {e}") from None
    cache_blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
    if real.parent != home and not (cache_blobs is not None and real.parent == cache_blobs):
        raise FileFormatError(f"{path}: {what} links to {real}, outside {directory}; refused")
    return path


def refuse_pickle_only(directory: Path, safetensors_names: tuple[str, ...]) -> None:
    """A directory with pickle weights and no safetensors: one line saying what to use instead."""
    if any((directory / n).exists() for n in safetensors_names):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FileFormatError(pickle_message(directory / pickles[0]))


def read_json(directory: Path, name: str, what: str, schema=None):
    return io.load_json(member(directory, name, what), schema)


def tensor_headers(directory: Path, single: str, index: str | None,
                   what: str) -> dict[str, tuple[Path, io.TensorInfo]]:
    """key -> (file, TensorInfo) for every tensor of ``single`` or, without it, of the shards an
    ``index`` file names; only headers are read. A shard outside the directory, a key mapped to
    a shard that lacks it, or held by two shards, is refused."""
    refuse_pickle_only(directory, (single,) if index is None else (single, index))
    if (directory / single).exists() or index is None or not (directory / index).exists():
        if not (directory / single).exists():
            raise FileFormatError(f"{directory}: no {single}"
                                  f"{'' if index is None else f' (nor {index})'}: not a {what} "
                                  "directory as Hugging Face writes it")
        path = member(directory, single, what)
        infos, _ = io.read_header(path)
        return {key: (path, info) for key, info in infos.items()}
    weight_map = read_json(directory, index, "shard index", {"weight_map": {}})["weight_map"]
    shards: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.endswith(".safetensors"):
            member(directory, name, "shard")  # names the pickle or the odd name
            raise FileFormatError(f"{directory / index}: shard {name!r:.80} of {key!r} is not a "
                                  ".safetensors file")
        shards.setdefault(name, []).append(key)
    out: dict[str, tuple[Path, io.TensorInfo]] = {}
    for name, keys in shards.items():
        path = member(directory, name, "shard")
        infos, _ = io.read_header(path)
        for key in infos:
            if key in out:
                raise FileFormatError(f"{path}: tensor {key!r} is also in {out[key][0].name}")
            out[key] = (path, infos[key])
        absent = [k for k in keys if k not in infos]
        extra = [k for k in infos if weight_map.get(k) != name]
        if absent or extra:
            raise FileFormatError(f"{path}: the index maps {absent[:3]} to it, which it lacks, "
                                  f"or it holds {extra[:3]}, which the index maps elsewhere")
    return out


def check_float(path: Path, key: str, info: io.TensorInfo) -> None:
    if info.dtype not in _FLOATS:
        raise FileFormatError(f"{path}: tensor {key!r} has dtype {info.dtype}, expected a "
                              f"floating-point one ({', '.join(_FLOATS)})")


def write_files(directory, files: dict[str, bytes | str]) -> Path:
    """Create ``directory`` if needed and write each file atomically, in the order given."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory}: exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileFormatError(f"{directory}: cannot create the directory: {e.strerror}") from None
    for name, data in files.items():
        io.write_atomic_bytes(directory / name, data.encode("utf-8") if isinstance(data, str)
                              else data)
    return directory


def safetensors_bytes(tensors: dict, what: str) -> bytes:
    """A safetensors file as ``transformers`` and PEFT write it (metadata ``format: pt``)."""
    try:
        return safetensors.numpy.save(tensors, metadata={"format": "pt"})
    except Exception as e:  # safetensors' own errors, wrapped
        raise ConfigError(f"{what}: safetensors cannot hold these tensors: {e}") from None
