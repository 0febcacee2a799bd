"""How a run records its tokenizer: in the checkpoint's metadata when it is small, in a file
beside the checkpoint when it is not.

A character or byte tokenizer is a few hundred bytes of JSON and sits in the metadata
(``{"type": "char", "chars": "..."}``). A BPE tokenizer is not: GPT-2's is 1.4 MB, and the
metadata is rewritten at every evaluation and parsed by every reader of the checkpoint. A run
therefore writes it once, as ``tokenizer.json`` (the format ``tokenizers`` and ``transformers``
read) in the run directory, and the metadata holds ``{"type": "bpe", "file": "tokenizer.json",
"sha256": "..."}``. The run directory stays whole by itself (its base may move or be deleted;
a full fine-tune no longer needs it), and the digest pins the file: a tokenizer swapped for
another, which would silently give other ids, is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from minilora import io
from minilora.data import Tokenizer, tokenizer_from_dict
from minilora.errors import ConfigError, FileFormatError

TOKENIZER_FILE = "tokenizer.json"
_FILE_ENTRY = {"type": str, "file": str, "sha256": str}


def tokenizer_entry(tokenizer: Tokenizer) -> tuple[dict, dict[str, bytes]]:
    """(what the metadata records, the files to write beside the checkpoint) for ``tokenizer``."""
    if tokenizer.kind != "bpe":
        return tokenizer.to_dict(), {}
    raw = tokenizer.to_dict()["tokenizer_json"].encode("utf-8")
    entry = {"type": "bpe", "file": TOKENIZER_FILE, "sha256": hashlib.sha256(raw).hexdigest()}
    return entry, {TOKENIZER_FILE: raw}


def entry_files(entry, run_dir: Path) -> dict[str, bytes]:
    """The files an entry refers to, read from ``run_dir`` (to copy them to another run)."""
    if not is_file_entry(entry):
        return {}
    return {TOKENIZER_FILE: io.read_bytes(Path(run_dir) / TOKENIZER_FILE, "tokenizer",
                                          io.jsonio.MAX_JSON_BYTES)}


def is_file_entry(entry) -> bool:
    return isinstance(entry, dict) and "file" in entry


def read_tokenizer(entry, run_dir: Path, source: Path) -> Tokenizer | None:
    """The tokenizer ``entry`` (a checkpoint's ``tokenizer``, read from ``source``) describes;
    a file entry is read from ``run_dir`` and checked against its digest. None for None."""
    if entry is None:
        return None
    if not is_file_entry(entry):
        return tokenizer_from_dict(entry, source=str(source))
    try:
        io.check_schema(entry, _FILE_ENTRY, "tokenizer")
    except ConfigError as e:
        raise FileFormatError(f"{source}: {e}") from None
    if entry["type"] != "bpe" or entry["file"] != TOKENIZER_FILE or set(entry) != set(_FILE_ENTRY):
        raise FileFormatError(f"{source}: a tokenizer file entry must be {{'type': 'bpe', 'file': "
                              f"{TOKENIZER_FILE!r}, 'sha256': ...}}, got {entry!r:.120}")
    path = Path(run_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise FileFormatError(f"{source}: its tokenizer {path} is missing (a run keeps a BPE "
                              "tokenizer beside its checkpoint: copy or move the directory whole)")
    raw = io.read_bytes(path, "tokenizer", io.jsonio.MAX_JSON_BYTES)
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise FileFormatError(f"{path}: not the tokenizer the run was trained with (its SHA-256 "
                              f"differs from the one {source} records)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not UTF-8 at byte {e.start}") from None
    return tokenizer_from_dict({"type": "bpe", "tokenizer_json": text}, source=str(path))
