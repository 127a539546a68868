"""Codec vectors in both directions, and properties (hypothesis) for the type registry, vmsd bodies,
XBZRLE deltas and the parser's fuzz rule."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qevm.codec.types import REGISTRY, BytesCodec, IntCodec
from qevm.codec.vmsd import NULL, decode_vmsd, encode_struct
from qevm.codec.wire import Cursor
from qevm.errors import DecodeError, EncodeError
from qevm.format.parser import Parser
from qevm.format.xbzrle import apply_delta, make_delta

VECTORS = [
    ("uint8", 1, 0xAB, b"\xab"),
    ("int8", 1, -1, b"\xff"),
    ("uint16", 2, 0x1234, b"\x12\x34"),
    ("int16", 2, -2, b"\xff\xfe"),
    ("uint32", 4, 0xDEADBEEF, b"\xde\xad\xbe\xef"),
    ("int32", 4, -5, b"\xff\xff\xff\xfb"),
    ("int32 le", 4, 7, b"\x00\x00\x00\x07"),  # "le" is a load-time check, the bytes are big-endian
    ("int32 equal", 4, 2, b"\x00\x00\x00\x02"),
    ("uint64", 8, 1 << 63, b"\x80" + bytes(7)),
    ("int64", 8, -(1 << 63), b"\x80" + bytes(7)),
    ("int64 equal", 8, 1 << 64 - 1, (1 << 64 - 1).to_bytes(8, "big")),
    ("timer", 8, 0xFFFFFFFFFFFFFFFF, b"\xff" * 8),
    ("bool", 1, True, b"\x01"),
    ("bool", 1, False, b"\x00"),
    ("bool", 1, 2, b"\x02"),  # any non-zero loads as true in QEMU; kept as is
    ("buffer", 3, b"abc", b"abc"),
    ("pci config", 4, b"\x86\x80\x37\x12", b"\x86\x80\x37\x12"),
    ("capability", 0, "x-ignore-shared", b"\x0fx-ignore-shared"),
]


@pytest.mark.parametrize(("name", "size", "value", "wire"), VECTORS, ids=[f"{v[0]}-{i}" for i, v in
                                                                        enumerate(VECTORS)])
def test_vectors_both_directions(name: str, size: int, value: object, wire: bytes) -> None:
    codec = REGISTRY[name]
    assert codec.encode(value, size) == wire
    cur = Cursor(wire)
    assert codec.decode(cur, size) == value
    assert cur.pos == len(wire)


def test_encode_rejects_out_of_range_and_wrong_sizes() -> None:
    with pytest.raises(EncodeError):
        REGISTRY["uint8"].encode(256, 1)
    with pytest.raises(EncodeError):
        REGISTRY["int16"].encode(-40000, 2)
    with pytest.raises(EncodeError):
        REGISTRY["buffer"].encode(b"ab", 3)
    with pytest.raises(EncodeError):
        REGISTRY["uint32"].from_json("zz", 4)
    assert REGISTRY["uint32"].from_json("0x10", 4) == 16
    assert REGISTRY["bool"].from_json("true", 1) is True
    assert REGISTRY["buffer"].from_json("0a0b", 2) == b"\n\x0b"


def test_truncated_decode_names_offset() -> None:
    with pytest.raises(DecodeError) as ei:
        REGISTRY["uint32"].decode(Cursor(b"\x00\x01", base=100), 4)
    assert ei.value.offset == 100


@given(st.data())
def test_int_codecs_round_trip(data: st.DataObject) -> None:
    codec = data.draw(st.sampled_from([c for c in REGISTRY.values() if isinstance(c, IntCodec)]))
    bits = codec.nbytes * 8
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if codec.signed else (0, (1 << bits) - 1)
    v = data.draw(st.integers(lo, hi))
    b = codec.encode(v, codec.nbytes)
    assert len(b) == codec.nbytes
    assert codec.decode(Cursor(b), codec.nbytes) == v
    n = data.draw(st.integers(0, 5))
    assert codec.decode_many(Cursor(b * n), codec.nbytes, n) == [v] * n


@given(st.binary(max_size=64))
def test_bytes_codec_round_trip(b: bytes) -> None:
    c = BytesCodec("buffer")
    assert c.decode(Cursor(c.encode(b, len(b))), len(b)) == b
    assert c.from_json(c.to_json(b), len(b)) == b


def _desc() -> dict:
    inner = {"vmsd_name": "inner", "version": 1,
             "fields": [{"name": "a", "type": "uint16", "size": 2}, {"name": "b", "type": "bool", "size": 1}]}
    return {
        "vmsd_name": "dev", "version": 3,
        "fields": [
            {"name": "i8", "type": "int8", "size": 1},
            {"name": "u32", "type": "uint32", "size": 4},
            {"name": "i64", "type": "int64", "size": 8},
            {"name": "arr", "array_len": 4, "type": "uint32", "size": 4},
            {"name": "buf", "type": "buffer", "size": 5},
            {"name": "st", "type": "struct", "struct": inner, "size": 3},
            {"name": "sts", "array_len": 2, "type": "struct", "struct": inner, "size": 3},
            {"name": "ptr", "array_len": 2, "type": "nullptr", "size": 1},
        ],
        "subsections": [{"vmsd_name": "dev/sub", "version": 2, "fields": [{"name": "x", "type": "uint64",
                                                                             "size": 8}]}],
    }


@settings(max_examples=60)
@given(i8=st.integers(-128, 127), u32=st.integers(0, 2**32 - 1), i64=st.integers(-(2**63), 2**63 - 1),
       arr=st.lists(st.integers(0, 2**32 - 1), min_size=4, max_size=4), buf=st.binary(min_size=5, max_size=5),
       a=st.integers(0, 65535), b=st.booleans(), x=st.integers(0, 2**64 - 1))
def test_vmsd_body_round_trip(i8: int, u32: int, i64: int, arr: list[int], buf: bytes, a: int, b: bool,
                              x: int) -> None:
    wire = (i8.to_bytes(1, "big", signed=True) + u32.to_bytes(4, "big") + i64.to_bytes(8, "big", signed=True)
            + b"".join(v.to_bytes(4, "big") for v in arr) + buf + (a.to_bytes(2, "big") + bytes((b,))) * 3
            + b"00" + b"\x05\x07dev/sub" + (2).to_bytes(4, "big") + x.to_bytes(8, "big"))
    s = decode_vmsd(Cursor(wire), _desc(), "dev")
    assert s.size == len(wire)
    assert s.field("arr").value == arr and s.field("i64").value == i64 and s.field("ptr").value == [NULL, NULL]
    assert s.subsections[0].body.field("x").value == x
    assert encode_struct(s) == wire


@settings(max_examples=100)
@given(st.binary(min_size=64, max_size=64), st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)),
                                                     max_size=20))
def test_xbzrle_round_trip(old: bytes, changes: list[tuple[int, int]]) -> None:
    new = bytearray(old)
    for i, v in changes:
        new[i] = v
    delta = make_delta(old, bytes(new))
    page = bytearray(old)
    apply_delta(page, delta)
    assert page == new


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_parser_fuzz_rule(tail: bytes) -> None:
    """Any input gives events or the library's own DecodeError, never another exception."""
    for prefix in (b"", b"QEVM\x00\x00\x00\x03", b"QEVM\x00\x00\x00\x03\x07\x00\x00\x00\x02pc"):
        p = Parser()
        p.feed(prefix + tail)
        p.close()
        try:
            list(p.events())
        except DecodeError as e:
            assert e.offset is not None
