"""Safe files: atomic writes, checked safetensors and npz, strict JSON, the run lock."""

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora import ConfigError, FileFormatError, RunLockedError
from minilora.io import (
    CHECKSUM_KEY,
    RunLock,
    append_jsonl,
    atomic_write,
    check_tensors,
    generator_state,
    load_json,
    load_metadata,
    load_tensors,
    read_jsonl,
    remove_temp_files,
    restore_generator,
    save_json,
    save_tensors,
    write_atomic_bytes,
)

FIXTURE_OK = [HealthCheck.function_scoped_fixture]  # tmp_path is reused: each example overwrites
TENSORS = {
    "transformer.wte.weight": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "transformer.ln_f.bias": np.array([1.5, -2.0, 0.25], np.float32),
    "step": np.array(7, np.int64),
    "mask": np.array([True, False]),
    "f64": np.linspace(0, 1, 5),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A good checkpoint file and its bytes."""
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_tensors(path, TENSORS, {"config": '{"n_layer": 4}'})
    return path, path.read_bytes()


def write(tmp_path, data: bytes, name="damaged.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---- atomic writes ------------------------------------------------------------------------
def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    write_atomic_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"half of the new cont")
        raise RuntimeError("crash in the middle")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_into_a_missing_directory_is_a_file_format_error(tmp_path):
    with pytest.raises(FileFormatError, match="nowhere"):
        write_atomic_bytes(tmp_path / "nowhere" / "f.bin", b"x")


def test_remove_temp_files_cleans_what_a_killed_writer_left(tmp_path):
    (tmp_path / ".model.safetensors.abc123.tmp").write_bytes(b"torn")
    (tmp_path / "model.safetensors").write_bytes(b"kept")
    assert [p.name for p in remove_temp_files(tmp_path)] == [".model.safetensors.abc123.tmp"]
    assert os.listdir(tmp_path) == ["model.safetensors"]


# ---- safetensors: round trip --------------------------------------------------------------
def test_tensors_round_trip_bit_for_bit_with_dtype_kept(saved):
    path, _ = saved
    loaded = load_tensors(path)
    assert set(loaded) == set(TENSORS)
    for name, a in TENSORS.items():
        assert loaded[name].dtype == a.dtype and loaded[name].shape == a.shape
        np.testing.assert_array_equal(loaded[name], a)
        assert loaded[name].flags.writeable
    assert load_metadata(path) == {"config": '{"n_layer": 4}'}


def test_non_contiguous_arrays_are_saved_by_value(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a transposed view
    save_tensors(tmp_path / "t.safetensors", {"a": a})
    np.testing.assert_array_equal(load_tensors(tmp_path / "t.safetensors")["a"], a)


@pytest.mark.parametrize(("tensors", "metadata"), [
    ({"a": np.array(["x"], dtype=object)}, None),
    ({"a": [1.0, 2.0]}, None),
    ({"a": np.zeros(2)}, {"k": 1}),
    ({"a": np.zeros(2)}, {CHECKSUM_KEY: "mine"}),
])
def test_what_safetensors_cannot_hold_is_refused_before_writing(tmp_path, tensors, metadata):
    with pytest.raises(ConfigError):
        save_tensors(tmp_path / "t.safetensors", tensors, metadata)
    assert not os.listdir(tmp_path)


# ---- safetensors: damaged and hostile files -----------------------------------------------
def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(FileFormatError, match="directory"):
        load_tensors(tmp_path)


@pytest.mark.parametrize(("damage", "match"), [
    (lambda raw: raw[:5], "truncated"),
    (lambda raw: raw[:-3], "truncated|damaged"),
    (lambda raw: raw[:100], "exceeds|truncated|damaged"),
    (lambda raw: struct.pack("<Q", 2**62) + raw[8:], "header length"),
    (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "header length"),
    (lambda raw: raw[:8] + b"[" + raw[9:], "not valid JSON"),
    (lambda raw: raw + b"\0\0\0\0", "after the last tensor"),
    (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), "checksum"),
    (lambda raw: b"PK\x03\x04" + raw[4:], "header length|damaged"),
], ids=["8 bytes", "tail cut", "mid cut", "huge header length", "header past end", "not JSON",
        "trailing bytes", "data bit flip", "zip magic"])
def test_damaged_safetensors_is_refused_with_the_fault_named(saved, tmp_path, damage, match):
    _, raw = saved
    path = write(tmp_path, damage(raw))
    with pytest.raises(FileFormatError, match=match) as info:
        load_tensors(path)
    assert "damaged.safetensors" in str(info.value)


def header_file(tmp_path, header: dict, data: bytes = b"") -> os.PathLike:
    text = json.dumps(header).encode()
    return write(tmp_path, struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("header", [
    {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},  # size does not fit the shape
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
     "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},  # overlapping
    {"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}},  # dtype numpy cannot hold
    {"a": {"dtype": "O", "shape": [1], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "extra": 1}},
    {"a": [1, 2, 3]},
    {"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
    {"a": {"dtype": "F32", "shape": [1, 2**40], "data_offsets": [0, 4]}},
])
def test_hostile_headers_are_refused(tmp_path, header):
    with pytest.raises(FileFormatError):
        load_tensors(header_file(tmp_path, header, b"\0" * 4), require_checksum=False)


def test_a_file_without_the_checksum_is_refused_unless_asked(tmp_path):
    import safetensors.numpy

    path = write(tmp_path, safetensors.numpy.save({"a": np.ones(3, np.float32)}), "foreign.st")
    with pytest.raises(FileFormatError, match="sha256"):
        load_tensors(path)
    np.testing.assert_array_equal(load_tensors(path, require_checksum=False)["a"], np.ones(3))


@given(data=st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
def test_any_single_bit_flip_is_refused_with_file_format_error(saved, tmp_path, data):
    _, raw = saved
    bit = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
    damaged = bytearray(raw)
    damaged[bit // 8] ^= 1 << (bit % 8)
    path = write(tmp_path, bytes(damaged))
    with pytest.raises(FileFormatError):
        load_tensors(path)


@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
def test_any_truncation_is_refused_with_file_format_error(saved, tmp_path, data):
    _, raw = saved
    n = data.draw(st.integers(0, len(raw) - 1), label="kept bytes")
    with pytest.raises(FileFormatError):
        load_tensors(write(tmp_path, raw[:n]))


@given(junk=st.binary(max_size=300))
@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
def test_arbitrary_bytes_are_refused_with_file_format_error(tmp_path, junk):
    with pytest.raises(FileFormatError):
        load_tensors(write(tmp_path, junk))


def test_a_big_endian_array_is_stored_little_endian_with_its_values(tmp_path):
    values = np.arange(6, dtype=">f4").reshape(2, 3)
    save_tensors(tmp_path / "be.safetensors", {"w": values, "n": np.array(7, dtype=">i8")})
    loaded = load_tensors(tmp_path / "be.safetensors")
    np.testing.assert_array_equal(loaded["w"], values)
    assert loaded["w"].dtype == np.dtype("<f4") and loaded["n"] == 7


# ---- npz --------------------------------------------------------------------------------------
def test_npz_loads_without_pickle(tmp_path):
    np.savez(tmp_path / "a.npz", w=np.ones((2, 2), np.float32), n=np.int64(3))
    loaded = load_tensors(tmp_path / "a.npz")
    assert loaded["w"].dtype == np.float32 and int(loaded["n"]) == 3


def test_a_missing_npz_is_refused_like_a_missing_safetensors_file(tmp_path):
    for name in ("nope.npz", "nope.safetensors"):
        with pytest.raises(FileFormatError, match=f"{name}.*does not exist"):
            load_tensors(tmp_path / name)


def test_npz_with_object_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(FileFormatError, match="pickle"):
        load_tensors(tmp_path / "evil.npz")


@given(data=st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=FIXTURE_OK)
def test_damaged_npz_never_raises_anything_but_file_format_error(tmp_path, data):
    path = tmp_path / "good.npz"
    if not path.exists():
        np.savez(path, w=np.arange(20, dtype=np.float32))
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="kept")]
    else:
        bit = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit")
        raw[bit // 8] ^= 1 << (bit % 8)
    bad = write(tmp_path, bytes(raw), "bad.npz")
    try:
        load_tensors(bad)  # a flip in zip padding may go unnoticed: then it must load cleanly
    except FileFormatError:
        pass


# ---- checking loaded tensors ------------------------------------------------------------------
EXPECTED = {"w": ((2, 3), np.float32), "b": ((3,), None)}


@pytest.mark.parametrize(("tensors", "match"), [
    ({"b": np.zeros(3)}, "missing tensors.*'w'"),
    ({"w": np.zeros((3, 2), np.float32), "b": np.zeros(3)}, r"'w' has shape \(3, 2\)"),
    ({"w": np.zeros((2, 3), np.float64), "b": np.zeros(3)}, "'w' has dtype float64"),
    ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(3), "x": np.zeros(1)}, "unexpected.*'x'"),
])
def test_check_tensors_names_the_file_and_key(tensors, match):
    with pytest.raises(FileFormatError, match=match) as info:
        check_tensors("adapter.safetensors", tensors, EXPECTED)
    assert "adapter.safetensors" in str(info.value)


def test_check_tensors_accepts_a_match_and_extras_when_allowed():
    tensors = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.int8), "x": np.zeros(1)}
    check_tensors("f", tensors, EXPECTED, allow_extra=True)


# ---- JSON -----------------------------------------------------------------------------------
SCHEMA = {"n_layer": int, "lr": float, "name": str, "targets": [str], "dropout?": float}


def test_json_round_trip_with_numpy_scalars(tmp_path):
    path = tmp_path / "config.json"
    save_json(path, {"n_layer": np.int64(4), "lr": np.float32(0.5), "name": "x", "targets": []})
    assert load_json(path, SCHEMA) == {"n_layer": 4, "lr": 0.5, "name": "x", "targets": []}


@pytest.mark.parametrize(("text", "match"), [
    (b'{"n_layer": 4', "not valid JSON"),
    (b'{"n_layer": "4", "lr": 1, "name": "x", "targets": []}', r"\$\.n_layer: expected int"),
    (b'{"n_layer": true, "lr": 1, "name": "x", "targets": []}', "expected int, got bool"),
    (b'{"n_layer": 4, "lr": 1, "name": "x", "targets": [1]}', r"\$\.targets\[0\]"),
    (b'{"n_layer": 4, "lr": 1, "name": "x"}', "missing key 'targets'"),
    (b'{"n_layer": 4, "lr": NaN, "name": "x", "targets": []}', "NaN"),
    (b'{"n_layer": 4, "n_layer": 5, "lr": 1, "name": "x", "targets": []}', "duplicate key"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
    (b'{"name": "\xff"}', "not UTF-8 at byte 10"),
    (b"[1, 2]", "expected an object"),
])
def test_bad_json_is_a_file_format_error_naming_the_file(tmp_path, text, match):
    path = write(tmp_path, text, "config.json")
    with pytest.raises(FileFormatError, match=match) as info:
        load_json(path, SCHEMA)
    assert "config.json" in str(info.value)


def test_save_json_refuses_nan_and_unknown_types_and_writes_nothing(tmp_path):
    for obj in ({"loss": float("nan")}, {"a": object()}):
        with pytest.raises(ConfigError):
            save_json(tmp_path / "m.json", obj)
    assert not os.listdir(tmp_path)


def test_jsonl_drops_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"iter": 0, "loss": 1.5})
    append_jsonl(path, {"iter": 1, "loss": 1.25})
    with open(path, "ab") as f:
        f.write(b'{"iter": 2, "lo')  # killed mid-write
    assert read_jsonl(path) == [{"iter": 0, "loss": 1.5}, {"iter": 1, "loss": 1.25}]
    path.write_bytes(b'{"iter": 0}\n{"it\n{"iter": 2}\n')
    with pytest.raises(FileFormatError, match="line 2"):
        read_jsonl(path)


# ---- random generators ----------------------------------------------------------------------
def test_generator_state_survives_json_and_continues_bit_identically():
    rng = np.random.default_rng(42)
    rng.integers(100, size=10)
    state = json.loads(json.dumps(generator_state(rng)))
    expected = rng.integers(1_000_000, size=20)
    np.testing.assert_array_equal(restore_generator(state).integers(1_000_000, size=20), expected)


@pytest.mark.parametrize("state", [
    None, {}, {"bit_generator": "os.system"}, {"bit_generator": "PCG64"},
    {"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}, "has_uint32": 0, "uinteger": 0},
])
def test_a_damaged_generator_state_is_a_file_format_error(state):
    with pytest.raises(FileFormatError, match=r"rng\.json"):
        restore_generator(state, "run/rng.json")


def _pcg64_state(**changes) -> dict:
    state = generator_state(np.random.default_rng(0))
    for key, value in changes.items():
        if key in ("state", "inc"):
            state["state"][key] = value
        else:
            state[key] = value
    return state


@pytest.mark.parametrize("changes", [
    {"state": 2**128}, {"inc": -1}, {"has_uint32": 2}, {"uinteger": 2**32}, {"uinteger": -1},
], ids=lambda c: ", ".join(f"{k}={v}" for k, v in c.items()))
def test_a_generator_state_out_of_range_is_refused_by_its_own_check(changes):
    with pytest.raises(FileFormatError, match=r"run/rng\.json: damaged PCG64 state \(a field "
                                              r"missing, unknown or out of range\)"):
        restore_generator(_pcg64_state(**changes), "run/rng.json")


@pytest.mark.parametrize("changes", [
    {"state": 0}, {"state": 2**128 - 1}, {"inc": 0}, {"has_uint32": 1, "uinteger": 2**32 - 1},
], ids=lambda c: ", ".join(f"{k}={v}" for k, v in c.items()))
def test_a_generator_state_at_the_edges_of_its_range_loads(changes):
    assert isinstance(restore_generator(_pcg64_state(**changes)), np.random.Generator)


# ---- the run lock -------------------------------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from minilora.io import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def start_holder(directory):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_file_holds_the_pid_and_is_removed_on_release(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())
    assert not lock.path.exists() and not lock.held


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunLockedError, match=str(os.getpid())):
        RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # free again once released


def test_a_live_process_holding_the_lock_is_refused_by_pid(tmp_path):
    proc = start_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"in use by process {proc.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    proc = start_holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run.lock").read_text().strip() == str(proc.pid)  # stale, still on disk
    deadline = time.monotonic() + 5
    with RunLock(tmp_path) as lock:
        assert time.monotonic() < deadline
        assert lock.path.read_text().strip() == str(os.getpid())


def test_locking_a_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileFormatError, match="does not exist"):
        RunLock(tmp_path / "missing").acquire()
