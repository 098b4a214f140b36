"""Hostile and broken safetensors files: `kdd_jax.io.read_safetensors` must either return arrays
exactly as the header describes them or raise CheckpointError naming the file (and the tensor at
fault) -- never another exception, never a crash, never an allocation sized by the header's claims.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdd_jax.io import MAX_HEADER_BYTES, SAFETENSORS_DTYPES, CheckpointError, read_safetensors

# ---------------------------------------------------------------------------------------- helpers


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", *, declared_len: int | None = None) -> Path:
    """A safetensors-shaped file: u64 little-endian header length, header bytes, data bytes."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", n) + h + data)
    return path


def expect_error(path: Path, *fragments: str) -> str:
    """read_safetensors(path) raises CheckpointError whose message names the file and each fragment."""
    with pytest.raises(CheckpointError) as info:
        read_safetensors(path)
    msg = str(info.value)
    assert str(path) in msg, f"message does not name the file: {msg!r}"
    for frag in fragments:
        assert frag in msg, f"message does not mention {frag!r}: {msg!r}"
    return msg


def peak_bytes(fn) -> int:
    """Peak Python-heap bytes (numpy allocations included) while fn() runs."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            fn()
        except CheckpointError:
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        if not was_tracing:
            tracemalloc.stop()


def valid_blob(tmp_path: Path) -> tuple[Path, bytes]:
    """A small valid file written by the reference implementation (f16, bf16, f32 + metadata)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "conv.weight": torch.randn(2, 3, 2, 2, generator=g).to(torch.float16),
        "bn.running_var": torch.rand(5, generator=g).to(torch.bfloat16),
        "fc.weight": torch.randn(3, 4, generator=g),
    }
    path = tmp_path / "valid.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, path.read_bytes()


def layout(blob: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8 : 8 + n])


# ------------------------------------------------------------------------------- valid round trip

TORCH_DTYPES = ["float16", "bfloat16", "float32", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"]
ST_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64", "int64": "I64",
            "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_round_trip_matches_reference_writer(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    tdt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1)
    shapes = {"scalar": (), "empty": (0, 3), "vec": (7,), "conv.weight": (4, 3, 3, 3)}
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 50
        tensors[name] = (t > 0) if dtype == "bool" else t.to(tdt)
    tensors["extreme"] = torch.tensor([0.0, -0.0, 1e-7, 65504.0, -3.0e38]).to(tdt) if tdt.is_floating_point else (
        torch.tensor([0, 1, -1, 127]).to(tdt))
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "héllo \u202e"})

    arrays, metadata = read_safetensors(path)

    assert metadata == {"format": "pt", "note": "héllo \u202e"}
    assert set(arrays) == set(tensors)
    for name, t in tensors.items():
        a = arrays[name]
        assert a.shape == tuple(t.shape), name
        assert a.dtype == SAFETENSORS_DTYPES[ST_NAMES[dtype]], name
        assert not a.flags.writeable, "views of a read-only map must not be writable"
        if dtype == "bfloat16":
            assert a.dtype == np.dtype(ml_dtypes.bfloat16)
            expected_bits = t.view(torch.int16).numpy().view(np.uint16)
            np.testing.assert_array_equal(a.view(np.uint16), expected_bits)
            np.testing.assert_array_equal(a.astype(np.float32), t.float().numpy())
        else:
            np.testing.assert_array_equal(a, t.numpy())
            if dtype.startswith("float"):  # bit-exact, -0.0 included
                np.testing.assert_array_equal(a.view(f"u{a.itemsize}"), t.numpy().view(f"u{a.itemsize}"))


def test_round_trip_agrees_with_safetensors_numpy(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float16),
               "c": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path = tmp_path / "np.safetensors"
    save_file(tensors, str(path))
    ours, _ = read_safetensors(path)
    ref = load_file(str(path))
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(ours[k], ref[k])


def test_empty_header_is_an_empty_checkpoint(tmp_path):
    assert read_safetensors(write_raw(tmp_path / "e.safetensors", {})) == ({}, {})
    path = write_raw(tmp_path / "m.safetensors", {"__metadata__": {"k": "v"}})
    assert read_safetensors(path) == ({}, {"k": "v"})


# ------------------------------------------------------------------------------ truncation / size


def test_every_truncation_is_a_clear_error(tmp_path):
    src, blob = valid_blob(tmp_path)
    n, header = layout(blob)
    names = [k for k in header if k != "__metadata__"]
    assert len(blob) < 1024  # keep the exhaustive sweep cheap
    path = tmp_path / "cut.safetensors"
    for k in range(len(blob)):  # every cut point, header and data alike
        path.write_bytes(blob[:k])
        msg = expect_error(path)
        if k >= 8 + n:  # header intact: the error names the tensor that no longer fits
            assert any(repr(name) in msg for name in names), (k, msg)


def test_appended_bytes_do_not_change_tensors(tmp_path):
    src, blob = valid_blob(tmp_path)
    ref, _ = read_safetensors(src)
    path = tmp_path / "padded.safetensors"
    path.write_bytes(blob + b"\x00" * 13)
    got, _ = read_safetensors(path)
    for k in ref:
        np.testing.assert_array_equal(got[k].view(np.uint8), ref[k].view(np.uint8))


@pytest.mark.parametrize("size", [0, 1, 7])
def test_shorter_than_length_field(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    expect_error(path, "too short")


@pytest.mark.parametrize("extra", [1, 2, 1000])
def test_header_length_larger_than_file(tmp_path, extra):
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = write_raw(tmp_path / "long.safetensors", header, b"\0" * 4, declared_len=len(header) + 4 + extra)
    expect_error(path, "header declares")


@pytest.mark.parametrize("declared", [MAX_HEADER_BYTES + 1, 2**40, 2**63 - 1, 2**64 - 1])
def test_memory_bomb_header_length_is_refused_without_allocating(tmp_path, declared):
    path = write_raw(tmp_path / "bomb.safetensors", b"{}", declared_len=declared)
    expect_error(path, "header declares")
    assert peak_bytes(lambda: read_safetensors(path)) < 1 << 20


def test_header_over_cap_is_refused_even_when_file_is_that_large(tmp_path):
    """A (sparse) file bigger than the cap whose header claims > 100 MB: refused before reading it."""
    path = tmp_path / "huge_header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 8))
        f.truncate(MAX_HEADER_BYTES + 4096)  # sparse: no disk use
    expect_error(path, "header declares", "limit")
    assert peak_bytes(lambda: read_safetensors(path)) < 1 << 20


def test_reading_is_zero_copy(tmp_path):
    """A 4 MB tensor is mapped, not read: Python-heap peak stays far below the file size."""
    from safetensors.numpy import save_file

    path = tmp_path / "big.safetensors"
    save_file({"w": np.ones((1024, 1024), np.float32)}, str(path))
    holder = {}
    assert peak_bytes(lambda: holder.update(read_safetensors(path)[0])) < 512 * 1024
    assert holder["w"].shape == (1024, 1024) and float(holder["w"][-1, -1]) == 1.0


# -------------------------------------------------------------------------------- header syntax

BAD_HEADERS = {
    "not_json": b"{this is not json",
    "unterminated": b'{"a": {"dtype": "F32"',
    "empty": b"",
    "spaces": b"        ",
    "non_utf8": b'{"\xff\xfe": 1}',
    "latin1": '{"caf\xe9": {}}'.encode("latin-1"),
    "nul_bytes": b"\x00" * 16,
    "array": b"[]",
    "number": b"1",
    "null": b"null",
    "string": b'"header"',
    "true": b"true",
    "deep_lists": b"[" * 100_000,
    "deep_objects": b'{"a":' * 100_000,
    "deep_in_entry": b'{"t": {"dtype": ' + b"[" * 100_000 + b"]" * 100_000 + b', "shape": [], "data_offsets": [0, 0]}}',
    "huge_int_literal": b'{"t": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}',
    "huge_float_exponent": b'{"t": {"dtype": "F32", "shape": [1e999999], "data_offsets": [0, 4]}}',
    "nan_literal": b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}',
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_malformed_header_is_a_clear_error(tmp_path, name):
    path = write_raw(tmp_path / f"{name}.safetensors", BAD_HEADERS[name], b"\0" * 4)
    expect_error(path, "header")


# ---------------------------------------------------------------------------- header semantics

GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def bad_entry(**kw):
    e = {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}
    e.update(kw)
    return {k: v for k, v in e.items() if v is not _DROP}


_DROP = object()

BAD_ENTRIES = {
    "unknown_dtype": (bad_entry(dtype="Q7"), "dtype"),
    "lowercase_dtype": (bad_entry(dtype="f32"), "dtype"),
    "numeric_dtype": (bad_entry(dtype=7), "dtype"),
    "null_dtype": (bad_entry(dtype=None), "dtype"),
    "list_dtype": (bad_entry(dtype=["F32"]), "dtype"),
    "negative_dim": (bad_entry(shape=[-1]), "shape"),
    "float_dim": (bad_entry(shape=[1.0]), "shape"),
    "string_dim": (bad_entry(shape=["1"]), "shape"),
    "bool_dim": (bad_entry(shape=[True]), "shape"),
    "nested_dim": (bad_entry(shape=[[1]]), "shape"),
    "shape_not_list": (bad_entry(shape=1), "shape"),
    "shape_null": (bad_entry(shape=None), "shape"),
    "offsets_past_end": (bad_entry(data_offsets=[8, 20]), "outside"),
    "offsets_far_past_end": (bad_entry(data_offsets=[2**62, 2**62 + 4], ), "outside"),
    "offsets_negative": (bad_entry(data_offsets=[-4, 0]), "outside"),
    "offsets_reversed": (bad_entry(data_offsets=[12, 8]), "outside"),
    "offsets_one": (bad_entry(data_offsets=[8]), "data_offsets"),
    "offsets_three": (bad_entry(data_offsets=[8, 12, 16]), "data_offsets"),
    "offsets_float": (bad_entry(data_offsets=[8.0, 12.0]), "data_offsets"),
    "offsets_bool": (bad_entry(data_offsets=[False, True]), "data_offsets"),
    "offsets_not_list": (bad_entry(data_offsets="8-12"), "data_offsets"),
    "too_few_bytes_for_shape": (bad_entry(shape=[2]), "needs 8 bytes"),
    "too_many_bytes_for_shape": (bad_entry(data_offsets=[8, 16]), "needs 4 bytes"),
    "dtype_size_mismatch": (bad_entry(dtype="F64"), "needs 8 bytes"),
    "huge_shape_small_offsets": (bad_entry(shape=[2**40, 2**40]), "shape"),
    "huge_shape_overflowing_int64": (bad_entry(shape=[2**70, 2**70, 2**70]), "shape"),
    "missing_shape": (bad_entry(shape=_DROP), "exactly dtype, shape, data_offsets"),
    "missing_dtype": (bad_entry(dtype=_DROP), "exactly dtype, shape, data_offsets"),
    "extra_key": ({**bad_entry(), "offset": 0}, "exactly dtype, shape, data_offsets"),
    "entry_is_list": (["F32", [1], [8, 12]], "exactly dtype, shape, data_offsets"),
    "entry_is_string": ("F32", "exactly dtype, shape, data_offsets"),
    "entry_is_null": (None, "exactly dtype, shape, data_offsets"),
    "overlaps_good": (bad_entry(data_offsets=[4, 8]), "overlap"),
    "same_bytes_as_good": (bad_entry(shape=[2], data_offsets=[0, 8]), "overlap"),
    # zero-element tensors are legal, but their dims must still be something numpy can represent
    "zero_size_dim_beyond_int64": (bad_entry(shape=[2**64, 0], data_offsets=[8, 8]), "shape"),
    "zero_size_nbytes_overflow": (bad_entry(shape=[2**62, 0], data_offsets=[8, 8]), "shape"),
    "too_many_dims": (bad_entry(shape=[1] * 100), "shape"),
    "too_many_dims_empty": (bad_entry(shape=[0] * 100, data_offsets=[8, 8]), "shape"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_invalid_entry_names_file_and_tensor(tmp_path, case):
    entry, fragment = BAD_ENTRIES[case]
    header = {"good": GOOD, "bad_tensor": entry}
    path = write_raw(tmp_path / f"{case}.safetensors", header, b"\0" * 16)
    msg = expect_error(path, "'bad_tensor'", fragment)
    if fragment == "overlap":
        assert "'good'" in msg


def test_every_problem_is_reported_together(tmp_path):
    header = {
        "ok": GOOD,
        "p1": bad_entry(dtype="NOPE"),
        "p2": bad_entry(shape=[-3]),
        "p3": bad_entry(data_offsets=[0, 10**6]),
    }
    path = write_raw(tmp_path / "many.safetensors", header, b"\0" * 12)
    expect_error(path, "'p1'", "'p2'", "'p3'")


def test_many_problems_are_capped_in_the_message(tmp_path):
    header = {f"t{i}": bad_entry(dtype="NOPE") for i in range(500)}
    path = write_raw(tmp_path / "spam.safetensors", header, b"\0" * 12)
    msg = expect_error(path, "'t0'", "more")
    assert len(msg) < 10_000


@pytest.mark.parametrize("meta", [[], "x", 1, {"k": 1}, {"k": None}, {"k": ["v"]}])
def test_bad_metadata(tmp_path, meta):
    path = write_raw(tmp_path / "meta.safetensors", {"__metadata__": meta, "good": GOOD}, b"\0" * 8)
    expect_error(path, "__metadata__")


def test_huge_zero_element_shape_that_numpy_can_hold_is_valid(tmp_path):
    path = write_raw(tmp_path / "z.safetensors", {"z": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
                                                   "good": GOOD}, b"\0" * 8)
    arrays, _ = read_safetensors(path)
    assert arrays["z"].shape == (2**40, 0) and arrays["z"].size == 0
    assert arrays["good"].shape == (2,)


# ------------------------------------------------------------------- names are just names


HOSTILE_NAMES = ["../../etc/passwd", "/abs/path", "\u202eevil", "a\x00b", "\ud800", "名前.weight", "", " ", "__init__",
                 "a" * 10_000, "x\ny"]


def test_hostile_tensor_names_are_plain_keys(tmp_path):
    header = {}
    for i, name in enumerate(HOSTILE_NAMES):
        header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
    data = np.arange(len(HOSTILE_NAMES), dtype="<f4").tobytes()
    # ensure_ascii escapes the lone surrogate so the header is valid UTF-8 JSON
    path = write_raw(tmp_path / "names.safetensors", json.dumps(header, ensure_ascii=True).encode(), data)
    before = sorted(p.name for p in tmp_path.iterdir())
    arrays, _ = read_safetensors(path)
    assert list(arrays) == HOSTILE_NAMES
    for i, name in enumerate(HOSTILE_NAMES):
        assert float(arrays[name][0]) == i
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert not Path("/abs/path").exists()


def test_hostile_names_from_reference_writer(tmp_path):
    import torch
    from safetensors.torch import save_file

    names = ["../../etc/passwd", "\u202e", "a\x00b"]
    path = tmp_path / "ref_names.safetensors"
    save_file({n: torch.full((2,), float(i)) for i, n in enumerate(names)}, str(path))
    arrays, _ = read_safetensors(path)
    assert sorted(arrays) == sorted(names)
    for i, n in enumerate(names):
        assert arrays[n].tolist() == [float(i)] * 2


def test_bad_name_in_error_is_escaped(tmp_path):
    """A right-to-left override or newline in a tensor name must not spoof the error text."""
    path = write_raw(tmp_path / "spoof.safetensors", {"\u202eevil\nline": bad_entry(dtype="NOPE")}, b"\0" * 12)
    msg = expect_error(path, "NOPE")
    assert "\u202e" not in msg and "evil\nline" not in msg


def test_missing_and_directory_paths(tmp_path):
    expect_error(tmp_path / "nope.safetensors", "cannot open")
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    expect_error(d, "cannot open")


# --------------------------------------------------------------------------- property tests


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prop")


_counter = itertools.count()


def check_read(dirpath: Path, blob: bytes) -> None:
    """The property: CheckpointError naming the file, or arrays exactly as the header describes."""
    path = dirpath / f"f{next(_counter)}.safetensors"  # fresh name: earlier maps stay valid
    path.write_bytes(blob)
    try:
        try:
            arrays, metadata = read_safetensors(path)
        except CheckpointError as e:
            assert str(path) in str(e)
            return
        n, header = layout(blob)
        assert isinstance(header, dict)
        declared = {k: v for k, v in header.items() if k != "__metadata__"}
        assert set(arrays) == set(declared)
        assert metadata == header.get("__metadata__", {})
        data = blob[8 + n :]
        for name, info in declared.items():
            a = arrays[name]
            b, e = info["data_offsets"]
            assert a.dtype == SAFETENSORS_DTYPES[info["dtype"]]
            assert list(a.shape) == info["shape"]
            assert 0 <= b <= e <= len(data) and e - b == math.prod(info["shape"]) * a.dtype.itemsize
            assert a.tobytes() == data[b:e]
        spans = sorted((info["data_offsets"][0], info["data_offsets"][1]) for info in declared.values()
                       if info["data_offsets"][1] > info["data_offsets"][0])
        assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:]))
    finally:
        path.unlink()


_BASE_BLOB: list[bytes] = []


def base_blob(dirpath: Path) -> bytes:
    if not _BASE_BLOB:
        _BASE_BLOB.append(valid_blob(dirpath)[1])
    return _BASE_BLOB[0]


PROP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                database=None)


@PROP
@given(data=st.data())
def test_property_random_mutations(prop_dir, data):
    blob = bytearray(base_blob(prop_dir))
    (n,) = struct.unpack("<Q", blob[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "set_data", "insert", "delete", "truncate", "length"]))
        if len(blob) < 9:
            break
        lo = 8 + n if kind == "set_data" and 8 + n < len(blob) else 0
        i = data.draw(st.integers(lo, len(blob) - 1))
        if kind == "flip":
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind in ("set", "set_data"):
            blob[i] = data.draw(st.sampled_from([0, 0x20, 0x22, 0x2C, 0x2D, 0x30, 0x31, 0x39, 0x5B, 0x5D, 0x7B, 0x7D,
                                                 0xFF, 0x80]) | st.integers(0, 255))
        elif kind == "insert":
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del blob[i : i + data.draw(st.integers(1, 8))]
        elif kind == "truncate":
            del blob[i:]
        else:  # rewrite the header length field: near the truth, or anything at all
            claim = data.draw(st.integers(-16, 16).map(lambda d: max(0, n + d)) | st.integers(0, 2**64 - 1))
            blob[:8] = struct.pack("<Q", claim)
    check_read(prop_dir, bytes(blob))


dims = st.one_of(st.integers(0, 6), st.integers(-2, 2**70), st.sampled_from([0, 2**31, 2**32, 2**63, 2**64]))
entry_values = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(list(SAFETENSORS_DTYPES)), st.sampled_from(["F8_E4M3", "U32", "", "f32"]),
                           st.integers(), st.none()),
        "shape": st.one_of(st.lists(dims, max_size=4), st.integers(), st.lists(st.floats(allow_nan=False), max_size=2)),
        "data_offsets": st.one_of(
            st.lists(st.integers(-4, 96), min_size=2, max_size=2),
            st.lists(st.integers(-2, 2**66), min_size=0, max_size=3),
            st.lists(st.booleans(), min_size=2, max_size=2),
            st.integers(0, 96).map(lambda b: [b, b]),  # zero-length spans
        ),
    }
)
json_junk = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                         lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                         max_leaves=8)


@PROP
@given(
    entries=st.dictionaries(st.text(max_size=6), st.one_of(entry_values, entry_values, entry_values, json_junk),
                            max_size=5),
    metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2), json_junk),
    data=st.binary(max_size=96),
    length_delta=st.sampled_from([0, 0, 0, 0, -1, 1, 2**32]),
)
def test_property_random_headers(prop_dir, entries, metadata, data, length_delta):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    n = max(0, len(h) + length_delta)
    check_read(prop_dir, struct.pack("<Q", n) + h + data)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(claim=st.integers(0, 2**64 - 1), body=st.binary(max_size=64))
def test_property_memory_stays_bounded(prop_dir, claim, body):
    """Whatever the length field claims, reading a tiny file allocates next to nothing."""
    path = prop_dir / f"m{next(_counter)}.safetensors"
    path.write_bytes(struct.pack("<Q", claim) + body)
    try:
        assert peak_bytes(lambda: read_safetensors(path)) < 256 * 1024
    finally:
        path.unlink()
