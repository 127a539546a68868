"""Saving and loading a device's state by its ``VMStateDescription``: the bytes QEMU writes (and the
vmdesc entry it emits alongside), and QEMU's load with version checks and hooks (``migration/vmstate.c``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qevm.codec.vmsd import NULLPTR_MARKER, SUBSECTION
from qevm.codec.wire import Cursor
from qevm.errors import DecodeError, EncodeError
from qevm.vmstate.description import (
    MISSING,
    State,
    VersionError,
    VMStateDescription,
    VMStateField,
    call_hook,
    lookup_path,
    store_path,
)

# -- saving ---------------------------------------------------------------------------------------------

@dataclass
class SavedState:
    """The bytes of one vmsd body and its vmdesc object (``vmsd_name``, ``version``, ``fields``...)."""

    data: bytes
    desc: dict[str, Any]


def save_state(vmsd: VMStateDescription, obj: Any, version_id: int | None = None) -> SavedState:
    """Serialise ``obj`` as QEMU's ``vmstate_save_state_v`` does (``version_id`` defaults to the vmsd's)."""
    out = bytearray()
    desc: dict[str, Any] = {}
    _save(vmsd, obj, out, desc, vmsd.version_id if version_id is None else version_id, vmsd.name)
    return SavedState(bytes(out), desc)


def _save(vmsd: VMStateDescription, obj: Any, out: bytearray, desc: dict[str, Any] | None, version: int,
          path: str) -> None:
    if vmsd.pre_save is not None:
        call_hook(vmsd.name, "pre_save", vmsd.pre_save, obj)
    try:
        fields: list[dict[str, Any]] | None = None
        if desc is not None:
            desc["vmsd_name"] = vmsd.name
            desc["version"] = version
            fields = desc["fields"] = []
        for i, f in enumerate(vmsd.fields):
            if not f.present(obj, version, vmsd.name):
                if f.must_exist:
                    raise EncodeError(f"{path}/{f.name}: output state validation failed")
                continue
            _save_field(vmsd, i, f, obj, out, fields, version, f"{path}/{f.name}")
        subs: list[dict[str, Any]] | None = None
        for sub in vmsd.subsections:
            if not sub.is_needed(obj):
                continue
            name = sub.name.encode("latin-1")
            out += bytes((SUBSECTION, len(name))) + name + sub.version_id.to_bytes(4, "big")
            sd: dict[str, Any] | None = None
            if desc is not None:
                if subs is None:
                    subs = desc["subsections"] = []
                sd = {}
            _save(sub, obj, out, sd, sub.version_id, f"{path}/{sub.name}")
            if subs is not None and sd is not None:
                subs.append(sd)
    finally:
        if vmsd.post_save is not None:
            call_hook(vmsd.name, "post_save", vmsd.post_save, obj)


def _save_field(vmsd: VMStateDescription, i: int, f: VMStateField, obj: Any, out: bytearray,
                fields: list[dict[str, Any]] | None, version: int, path: str) -> None:
    n = f.count(obj, path)
    if n <= 0:
        if n < 0:
            raise EncodeError(f"{path}: element count {n} (from {f.num_field!r}) is negative")
        return
    size = f.elem_size(obj, path) if f.codec is not None else 0
    if f.discard:
        elems: list[Any] = [b"\x00" * size] * n
    elif f.type == "tmp":
        elems = [obj]
    else:
        v = lookup_path(obj, f.name if f.attr is None else f.attr, f.steps)
        if v is MISSING:
            raise EncodeError(f"{path}: the object has no value for this field")
        if f.is_array:
            if not isinstance(v, list | tuple | bytes | bytearray):
                raise EncodeError(f"{path}: an array field needs a list, got {type(v).__name__}")
            if len(v) < n:
                raise EncodeError(f"{path}: {n} elements to write, the list has {len(v)}")
            elems = list(v[:n])
        else:
            elems = [v]
    jl = fields
    compress = f.can_compress()
    for k, e in enumerate(elems):
        fd: dict[str, Any] | None = None
        if jl is not None:
            fd = {"name": vmsd._json_names[i]}
            if n > 1:
                fd["array_len" if compress else "index"] = n if compress else k
            fd["type"] = f.type
        start = len(out)
        epath = f"{path}[{k}]" if f.is_array else path
        if e is None and f.pointers:
            if fd is not None and f.type == "struct":
                fd["struct"] = {}
            out.append(NULLPTR_MARKER)
        elif f.type == "struct":
            assert f.vmsd is not None
            sd: dict[str, Any] | None = None
            if fd is not None:
                sd = fd["struct"] = {}
            _save(f.vmsd, e, out, sd, f.vmsd.version_id, epath)
        elif f.type == "vstruct":
            assert f.vmsd is not None
            _save(f.vmsd, e, out, fd, f.struct_version_id, epath)
        elif f.type == "tmp":
            assert f.vmsd is not None
            tmp = _new(f, obj)
            _set_parent(tmp, obj)
            _save(f.vmsd, tmp, out, fd, f.vmsd.version_id, epath)
        else:
            assert f.codec is not None
            try:
                out += f.codec.encode(e, size)
            except EncodeError as err:
                raise EncodeError(f"{epath}: {err}") from None
        if fd is not None and jl is not None:
            fd["size"] = len(out) - start
            jl.append(fd)
            if compress:
                jl = None


def _new(f: VMStateField, parent: Any) -> Any:
    if f.factory is not None:
        return f.factory()
    return {} if isinstance(parent, dict) else State()


def _set_parent(tmp: Any, parent: Any) -> None:
    if isinstance(tmp, dict):
        tmp["parent"] = parent
    else:
        tmp.parent = parent


# -- loading -------------------------------------------------------------------------------------------

def load_state(vmsd: VMStateDescription, obj: Any, data: bytes | bytearray | memoryview | Cursor,
               version_id: int, *, name: str | None = None, offset: int = 0) -> Any:
    """Load one vmsd body at ``version_id`` into ``obj`` (QEMU's ``vmstate_load_state``); returns ``obj``.

    ``data`` is the whole body (every byte must be used) or a ``Cursor`` (left after the body).
    ``name`` (e.g. the section idstr) is used in errors; ``offset`` is the stream offset of ``data``."""
    label = name or vmsd.name
    if isinstance(data, Cursor):
        cur = data
    else:
        cur = Cursor(data, 0, len(data), offset, True, label)
    _load(vmsd, obj, cur, version_id, label)
    if not isinstance(data, Cursor) and cur.pos != cur.end:
        raise DecodeError(f"{cur.end - cur.pos} bytes left over after the {vmsd.name!r} body", cur.offset, label)
    return obj


def _load(vmsd: VMStateDescription, obj: Any, cur: Cursor, version: int, path: str) -> None:
    who = path if path.endswith(vmsd.name) else f"{path} ({vmsd.name})"
    if version > vmsd.version_id:
        raise VersionError(who, version, vmsd.version_id, True, cur.offset)
    if version < vmsd.minimum_version_id:
        raise VersionError(who, version, vmsd.minimum_version_id, False, cur.offset)
    if vmsd.pre_load is not None:
        call_hook(vmsd.name, "pre_load", vmsd.pre_load, obj)
    for f in vmsd.fields:
        fpath = f"{path}/{f.name}"
        if f.present(obj, version, vmsd.name):
            _load_field(f, obj, cur, fpath)
        elif f.must_exist:
            raise DecodeError(f"input validation failed: {vmsd.name}/{f.name}", cur.offset, fpath)
    _load_subsections(vmsd, obj, cur, path)
    if vmsd.post_load is not None:
        call_hook(vmsd.name, "post_load", vmsd.post_load, obj, version)


def _load_subsections(vmsd: VMStateDescription, obj: Any, cur: Cursor, path: str) -> None:
    prefix = vmsd.name.encode("latin-1")
    while cur.pos < cur.end and cur.buf[cur.pos] == SUBSECTION:
        if cur.pos + 1 >= cur.end:
            return
        ln = cur.buf[cur.pos + 1]
        if ln < len(prefix) + 1 or cur.pos + 2 + ln > cur.end:
            return
        raw = bytes(cur.buf[cur.pos + 2:cur.pos + 2 + ln])
        if not raw.startswith(prefix):
            return  # it belongs to an enclosing vmsd
        sname = raw.decode("latin-1")
        sub = vmsd.subsection(sname)
        if sub is None:
            raise DecodeError(f"subsection {sname!r} is not declared by vmsd {vmsd.name!r}", cur.offset, path)
        cur.pos += 2 + ln
        version = cur.be32() & 0xFF  # QEMU keeps the subsection version in a uint8_t
        _load(sub, obj, cur, version, f"{path}/{sname}")


def _load_field(f: VMStateField, obj: Any, cur: Cursor, path: str) -> None:
    n = f.count(obj, path)
    if n < 0:
        raise DecodeError(f"element count {n} (from {f.num_field!r}) is negative", cur.offset, path)
    if n == 0 and f.is_array:
        if not f.discard and not f.must_exist and lookup_path(obj, f.attr or f.name, f.steps) is MISSING:
            store_path(obj, f.attr or f.name, f.steps, [])
        return
    size = f.elem_size(obj, path) if f.codec is not None else 0
    key = f.attr or f.name
    if f.discard:
        try:
            cur.take(size * n)
        except DecodeError as e:
            e.path = path
            raise
        return
    if f.type == "tmp":
        assert f.vmsd is not None
        tmp = _new(f, obj)
        _set_parent(tmp, obj)
        _load(f.vmsd, tmp, cur, f.version_id, path)
        return
    local = lookup_path(obj, key, f.steps)
    if f.type in ("struct", "vstruct"):
        assert f.vmsd is not None
        version = f.vmsd.version_id if f.type == "struct" else f.struct_version_id
        if not f.is_array:
            target = local if local is not MISSING and local is not None else _new(f, obj)
            _load(f.vmsd, target, cur, version, path)
            if target is not local:
                store_path(obj, key, f.steps, target)
            return
        lst = local if isinstance(local, list) else []
        for k in range(n):
            epath = f"{path}[{k}]"
            cur_elem = lst[k] if k < len(lst) else MISSING
            if f.pointers and cur_elem is None:
                _nullptr(cur, epath)
                continue
            target = cur_elem if cur_elem is not MISSING and cur_elem is not None else _new(f, obj)
            _load(f.vmsd, target, cur, version, epath)
            if k < len(lst):
                lst[k] = target
            else:
                lst.append(target)
        if lst is not local:
            store_path(obj, key, f.steps, lst)
        return
    assert f.codec is not None
    try:
        if not f.is_array:
            v = f.codec.decode(cur, size)
            if f.check is not None:
                v = _checked(f, local, v, cur, path)
            store_path(obj, key, f.steps, v)
            return
        lst = list(local) if isinstance(local, list | tuple) else []
        if f.pointers:
            vals: list[Any] = []
            for k in range(n):
                if k < len(lst) and lst[k] is None:
                    _nullptr(cur, f"{path}[{k}]")
                    vals.append(None)
                else:
                    vals.append(f.codec.decode(cur, size))
        else:
            vals = f.codec.decode_many(cur, size, n)
    except DecodeError as e:
        e.path = path
        raise
    if f.check is not None:
        vals = [_checked(f, lst[k] if k < len(lst) else MISSING, v, cur, f"{path}[{k}]")
                for k, v in enumerate(vals)]
    lst[:n] = vals
    if isinstance(local, list):
        local[:] = lst
    else:
        store_path(obj, key, f.steps, lst)


def _checked(f: VMStateField, local: Any, v: Any, cur: Cursor, path: str) -> Any:
    assert f.check is not None
    try:
        return f.check(local, v)
    except DecodeError as e:  # the checks of equal() and int32_le()
        raise DecodeError(f"{f.type}: {e.msg}", cur.offset, path) from None
    except ValueError as e:  # a check written by hand
        raise DecodeError(f"{f.type}: {e}", cur.offset, path) from None


def _nullptr(cur: Cursor, path: str) -> None:
    off = cur.offset
    b = cur.u8()
    if b != NULLPTR_MARKER:
        raise DecodeError(f"NULL pointer element: marker 0x30 expected, found 0x{b:02x}", off, path)
