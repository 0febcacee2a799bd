"""Safe files: atomic writes, checked safetensors and npz, strict JSON, one writer per run.

No pickle anywhere: tensors are safetensors (or ``.npz`` read with ``allow_pickle=False``), the rest
JSON. Reading a missing, damaged or hostile file raises FileFormatError naming the file and the
fault, never another exception; writing never leaves a half-written file behind.
"""

from minilora.io.atomic import (
    atomic_write,
    fsync_dir,
    read_bytes,
    remove_temp_files,
    write_atomic_bytes,
    write_atomic_text,
)
from minilora.io.jsonio import (
    append_jsonl,
    check_schema,
    dumps_json,
    generator_state,
    load_json,
    read_jsonl,
    restore_generator,
    save_json,
    strict_loads,
)
from minilora.io.lock import RunLock
from minilora.io.tensors import (
    CHECKSUM_KEY,
    TensorInfo,
    check_tensors,
    load_metadata,
    load_tensors,
    read_header,
    read_tensors,
    save_tensors,
)

__all__ = [
    "CHECKSUM_KEY", "RunLock", "TensorInfo", "append_jsonl", "atomic_write", "check_schema",
    "check_tensors", "dumps_json", "fsync_dir", "generator_state", "load_json", "load_metadata",
    "load_tensors", "read_bytes", "read_header", "read_jsonl", "read_tensors", "remove_temp_files",
    "restore_generator", "save_json", "save_tensors", "strict_loads", "write_atomic_bytes",
    "write_atomic_text",
]
