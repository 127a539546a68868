"""Device state declared in Python: QEMU's VMState framework on top of qevm's codec.

A ``VMStateDescription`` lists a device's fields the way a QEMU ``VMStateDescription`` does
(``migration/vmstate.c``, ``include/migration/vmstate.h``; behaviour of QEMU 7.2):
``save_state`` turns an object into the exact bytes QEMU writes and, alongside, the vmdesc
JSON object QEMU's JSON writer emits for it; ``load_state`` reads the bytes back into an
object, checking versions and running the hooks as QEMU does.  ``SaveStateRegistry`` is the
SaveStateEntry list (section ids, instance ids, priorities) and writes or reads whole
streams built from ``qevm.events`` objects.

**Where values live.**  A field's name is the C expression QEMU stringifies (``"divider"``,
``"env.regs"``, ``"channels[0].irq_disabled"``) and it is also how the value is found:

* on an ordinary object (a dataclass, ``State``, anything with attributes) the name is an
  access path: ``.`` / ``->`` select attributes and ``[k]`` selects list items, so
  ``"channels[0].irq_disabled"`` is ``obj.channels[0].irq_disabled``.  Two fields naming the
  same C storage (i8254 declares ``channels[0].next_transition_time`` besides the channel
  array) therefore share one Python value, as they share memory in QEMU.  A name that is not
  such a path is used as one attribute name;
* on a ``dict`` the name is the key, verbatim (``d["env.regs"]``).

Element shapes: integers for the integer types and ``timer`` (``TIMER_NOT_ARMED`` when the
timer is not pending), ``bool`` for ``bool``, ``bytes`` for buffers, an object for a nested
struct; fields declared with ``num``/``num_field`` hold a list of elements.  ``unused``
buffers hold nothing (zeros are written, the bytes are skipped on load).

When loading, missing containers are created: intermediate path objects become ``State``
(or ``list``), nested structs are built by the field's ``factory`` (default: ``State``, or
``dict`` under a dict).  Existing nested objects are loaded in place, like QEMU loads into
the device's memory.

**Hooks** have QEMU's signatures: ``pre_save(obj)``, ``post_save(obj)``, ``pre_load(obj)``,
``post_load(obj, version_id)``, ``needed(obj) -> bool``, field tests
``exists(obj, version_id) -> bool``.  A hook fails by raising or by returning a non-zero
``int`` (QEMU's convention); either becomes a ``HookError`` naming the vmsd and the hook.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DecodeError, EncodeError, QevmError, SchemaError, UsageError
from .events import (
    Configuration,
    DeviceState,
    EndOfFile,
    Event,
    FileHeader,
    Footer,
    Section,
    SectionHeader,
    SectionKind,
    VmDescription,
)
from .types import REGISTRY, TypeCodec
from .wire import Cursor

__all__ = [
    "VersionError", "HookError", "State", "VMStateField", "VMStateDescription", "SavedState",
    "scalar", "equal", "int32_le", "array", "varray", "buffer", "vbuffer", "unused", "timer", "struct",
    "vstruct", "with_tmp", "validate", "save_state", "load_state", "vmdesc_json", "CONFIGURATION",
    "LegacyHandler", "SaveStateEntry", "SaveStateRegistry", "LoadReport", "savevm_state",
    "TIMER_NOT_ARMED", "MIG_PRI_DEFAULT", "MIG_PRI_IOMMU", "MIG_PRI_PCI_BUS", "MIG_PRI_VIRTIO_MEM",
    "MIG_PRI_GICV3_ITS", "MIG_PRI_GICV3",
]

SUBSECTION = 0x05
NULLPTR_MARKER = 0x30
#: the value a ``timer`` field carries when the timer is not pending (be64 -1)
TIMER_NOT_ARMED = 0xFFFF_FFFF_FFFF_FFFF

# Save priorities of QEMU 7.2 (higher saves first).
MIG_PRI_DEFAULT = 0
MIG_PRI_IOMMU = 1
MIG_PRI_PCI_BUS = 2
MIG_PRI_VIRTIO_MEM = 3
MIG_PRI_GICV3_ITS = 4
MIG_PRI_GICV3 = 5

#: types that are not a VMStateInfo of the registry but a structural kind of field
_STRUCTURAL = ("struct", "vstruct", "tmp")


# -- errors ---------------------------------------------------------------------------------------

class VersionError(DecodeError):
    """A stream's version is newer than our description or older than its minimum."""

    def __init__(self, name: str, incoming: int, local: int, too_new: bool, offset: int | None = None) -> None:
        if too_new:
            msg = f"incoming version {incoming} is too new for local version {local}"
        else:
            msg = f"incoming version {incoming} is too old for local minimum version {local}"
        super().__init__(msg, offset, name)  # str(): "offset N (0xN), <name>: incoming version ..."
        self.name = name
        self.incoming = incoming
        self.local = local
        self.too_new = too_new


class HookError(QevmError):
    """A pre_save/post_save/pre_load/post_load/needed/test hook failed."""

    def __init__(self, vmsd: str, hook: str, detail: str) -> None:
        super().__init__(f"{vmsd}: {hook} failed: {detail}")
        self.vmsd = vmsd
        self.hook = hook


# -- the default object -----------------------------------------------------------------------------

class State:
    """A plain attribute bag for device state (what ``load_state`` creates when nothing else exists)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"State({inner})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, State) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]


# -- access paths ---------------------------------------------------------------------------------

_TOKEN = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]|(\.|->)")
Step = tuple[bool, str | int]  # (is_index, key)


def _parse_path(name: str) -> tuple[Step, ...]:
    """``a.b[2]->c`` -> ((False,'a'), (False,'b'), (True,2), (False,'c')); a non-path is one attribute."""
    steps: list[Step] = []
    pos = 0
    want_name = True
    while pos < len(name):
        m = _TOKEN.match(name, pos)
        if m is None:
            return ((False, name),)
        ident, idx, dot = m.groups()
        if ident is not None:
            if not want_name:
                return ((False, name),)
            steps.append((False, ident))
            want_name = False
        elif idx is not None:
            if want_name:
                return ((False, name),)
            steps.append((True, int(idx)))
        else:
            if want_name:
                return ((False, name),)
            want_name = True
        pos = m.end()
    if want_name or not steps:
        return ((False, name),)
    return tuple(steps)


_MISSING = object()


def _step_get(obj: Any, step: Step) -> Any:
    is_index, key = step
    if is_index:
        try:
            return obj[key]
        except (IndexError, KeyError, TypeError):
            return _MISSING
    return getattr(obj, str(key), _MISSING)


def _lookup(obj: Any, name: str, steps: tuple[Step, ...]) -> Any:
    """The value at a field name, or ``_MISSING``."""
    if isinstance(obj, dict):
        return obj.get(name, _MISSING)
    for st in steps:
        if obj is _MISSING or obj is None:
            return _MISSING
        obj = _step_get(obj, st)
    return obj


def _store(obj: Any, name: str, steps: tuple[Step, ...], value: Any) -> None:
    """Set the value at a field name, creating missing containers on the way."""
    if isinstance(obj, dict):
        obj[name] = value
        return
    for i, st in enumerate(steps[:-1]):
        nxt = _step_get(obj, st)
        if nxt is _MISSING or nxt is None:
            nxt = [] if steps[i + 1][0] else State()
            _step_set(obj, st, nxt)
        obj = nxt
    _step_set(obj, steps[-1], value)


def _step_set(obj: Any, step: Step, value: Any) -> None:
    is_index, key = step
    if is_index:
        assert isinstance(key, int)
        while len(obj) <= key:
            obj.append(None)
        obj[key] = value
    else:
        setattr(obj, str(key), value)


# -- declarations -------------------------------------------------------------------------------

Test = Callable[[Any, int], bool]
Factory = Callable[[], Any]


@dataclass(eq=False)
class VMStateField:
    """One field of a vmsd (QEMU's ``VMStateField``).  Build them with the constructors below."""

    name: str
    type: str  # the VMStateInfo name written to vmdesc, or "struct" / "vstruct" / "tmp"
    version_id: int = 0
    exists: Test | None = None  # QEMU's field_exists
    size: int | None = None  # element size; None = the type's natural size
    size_field: str | None = None  # VMS_VBUFFER: element size is this field's value ...
    size_multiply: int = 1  # ... times this (VMS_MULTIPLY)
    num: int | None = None  # VMS_ARRAY: fixed element count
    num_field: str | None = None  # VMS_VARRAY_*: element count is this field's value ...
    multiply: int = 1  # ... times this (VMS_MULTIPLY_ELEMENTS)
    vmsd: VMStateDescription | None = None  # struct / vstruct / tmp
    struct_version_id: int = 0  # vstruct: the version the nested vmsd is written and read at
    must_exist: bool = False  # VMSTATE_VALIDATE
    pointers: bool = False  # VMS_ARRAY_OF_POINTER: None elements are the 0x30 marker
    discard: bool = False  # unused buffers: zeros written, bytes skipped on load
    check: Callable[[Any, Any], Any] | None = None  # load-time check (local value, incoming) -> value to store
    factory: Factory | None = None  # builds a nested struct / tmp object when loading
    attr: str | None = None  # where the value lives, when not at ``name``
    codec: TypeCodec | None = field(default=None, repr=False)
    steps: tuple[Step, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.type in _STRUCTURAL:
            if self.vmsd is None:
                raise SchemaError(f"field {self.name!r}: a {self.type} field needs a vmsd")
        elif not self.must_exist:
            codec = REGISTRY.get(self.type)
            if codec is None:
                raise SchemaError(f"field {self.name!r}: unknown vmstate type {self.type!r} (not in qevm.types)")
            self.codec = codec
            if self.size is None and self.size_field is None:
                if codec.natural_size is None:
                    raise SchemaError(f"field {self.name!r}: type {self.type!r} needs an explicit size")
                self.size = codec.natural_size
            elif self.size is not None and codec.natural_size not in (None, self.size):
                raise SchemaError(f"field {self.name!r}: type {self.type!r} has {codec.natural_size} bytes, "
                                  f"not {self.size}")
        self.steps = _parse_path(self.attr or self.name)
        self._num_steps = _parse_path(self.num_field) if self.num_field else ()
        self._size_steps = _parse_path(self.size_field) if self.size_field else ()

    @property
    def is_array(self) -> bool:
        return self.num is not None or self.num_field is not None

    def present(self, obj: Any, version_id: int, vmsd: str) -> bool:
        if self.exists is not None:
            return bool(_hook(vmsd, f"test of field {self.name!r}", self.exists, obj, version_id, value=True))
        return self.version_id <= version_id

    def count(self, obj: Any, path: str) -> int:
        if self.num_field is not None:
            n = _lookup(obj, self.num_field, self._num_steps)
            if isinstance(n, bool) or not isinstance(n, int):
                raise _missing(path, f"element count field {self.num_field!r}", n)
            return n * self.multiply
        return self.num if self.num is not None else 1

    def elem_size(self, obj: Any, path: str) -> int:
        if self.size_field is not None:
            s = _lookup(obj, self.size_field, self._size_steps)
            if isinstance(s, bool) or not isinstance(s, int):
                raise _missing(path, f"size field {self.size_field!r}", s)
            return s * self.size_multiply
        return self.size or 0

    def can_compress(self) -> bool:
        """QEMU's rule for describing an array with one ``array_len`` entry."""
        if self.exists is not None:
            return False
        if self.type == "struct":
            assert self.vmsd is not None
            if self.vmsd.subsections:
                return False
            return all(f.can_compress() for f in self.vmsd.fields)
        return True


def _missing(path: str, what: str, got: Any) -> EncodeError:
    if got is _MISSING:
        return EncodeError(f"{path}: the object has no {what}")
    return EncodeError(f"{path}: {what} is {got!r}, not an integer")


@dataclass(eq=False)
class VMStateDescription:
    """A vmsd: name, versions, fields, subsections, hooks and save priority."""

    name: str
    version_id: int = 0
    minimum_version_id: int = 0
    fields: Sequence[VMStateField] = ()
    subsections: Sequence[VMStateDescription] = ()
    needed: Callable[[Any], bool] | None = None
    pre_save: Callable[[Any], Any] | None = None
    post_load: Callable[[Any, int], Any] | None = None
    pre_load: Callable[[Any], Any] | None = None
    post_save: Callable[[Any], Any] | None = None
    priority: int = MIG_PRI_DEFAULT

    def __post_init__(self) -> None:
        self.fields = tuple(self.fields)
        self.subsections = tuple(self.subsections)
        if len(self.name.encode("latin-1", "replace")) > 255:
            raise SchemaError(f"vmsd name longer than 255 bytes: {self.name[:40]!r}...")
        # vmdesc names: a name declared more than once becomes "name[k]" (k = its rank among them)
        counts: dict[str, int] = {}
        for f in self.fields:
            counts[f.name] = counts.get(f.name, 0) + 1
        seen: dict[str, int] = {}
        self._json_names: list[str] = []
        for f in self.fields:
            if counts[f.name] > 1:
                k = seen.get(f.name, 0)
                seen[f.name] = k + 1
                self._json_names.append(f"{f.name}[{k}]")
            else:
                self._json_names.append(f.name)
        self._subs = {s.name: s for s in self.subsections}

    def is_needed(self, obj: Any) -> bool:
        if self.needed is None:
            return True
        return bool(_hook(self.name, "needed", self.needed, obj, value=True))

    def subsection(self, name: str) -> VMStateDescription | None:
        return self._subs.get(name)


# -- field constructors (QEMU's VMSTATE_* macros) ------------------------------------------------------

def scalar(name: str, type: str, version_id: int = 0, exists: Test | None = None, *,
           attr: str | None = None) -> VMStateField:
    """VMSTATE_UINT8/INT32/BOOL/UINT64/... (``type`` is the vmdesc type name: "uint8", "int64", "bool", ...).
    A type ending in " equal" or "int32 le" gets QEMU's load-time check."""
    check = _check_equal if type.endswith(" equal") else _check_le if type == "int32 le" else None
    return VMStateField(name, type, version_id, exists, check=check, attr=attr)


def equal(name: str, type: str, version_id: int = 0, exists: Test | None = None) -> VMStateField:
    """VMSTATE_*_EQUAL: ``type`` "int32 equal", "uint8 equal", ...; loading fails unless the value equals ours."""
    if not type.endswith(" equal"):
        raise SchemaError(f"field {name!r}: {type!r} is not an '... equal' type")
    return VMStateField(name, type, version_id, exists, check=_check_equal)


def int32_le(name: str, version_id: int = 0, exists: Test | None = None) -> VMStateField:
    """VMSTATE_INT32_POSITIVE_LE: loading requires 0 <= incoming <= our value, then takes it."""
    return VMStateField(name, "int32 le", version_id, exists, check=_check_le)


def array(name: str, type: str, num: int, version_id: int = 0, exists: Test | None = None, *,
          size: int | None = None, pointers: bool = False) -> VMStateField:
    """VMSTATE_*_ARRAY: ``num`` elements of ``type`` (a list)."""
    return VMStateField(name, type, version_id, exists, size=size, num=num, pointers=pointers)


def varray(name: str, type: str, num_field: str, version_id: int = 0, exists: Test | None = None, *,
           multiply: int = 1, size: int | None = None) -> VMStateField:
    """VMSTATE_VARRAY_INT32/UINT32/UINT16/UINT8 (and _MULTIPLY): the count is another field's value."""
    return VMStateField(name, type, version_id, exists, size=size, num_field=num_field, multiply=multiply)


def buffer(name: str, size: int, version_id: int = 0, exists: Test | None = None) -> VMStateField:
    """VMSTATE_BUFFER / STATIC_BUFFER / PARTIAL_BUFFER: ``size`` raw bytes."""
    return VMStateField(name, "buffer", version_id, exists, size=size)


def vbuffer(name: str, size_field: str, version_id: int = 0, exists: Test | None = None, *,
            multiply: int = 1) -> VMStateField:
    """VMSTATE_VBUFFER / VBUFFER_UINT32 / VBUFFER_ALLOC_UINT32 / VBUFFER_MULTIPLY: the byte count
    is another field's value (times ``multiply``)."""
    return VMStateField(name, "buffer", version_id, exists, size_field=size_field, size_multiply=multiply)


def unused(size: int, version_id: int = 0, exists: Test | None = None, *,
           num_field: str | None = None) -> VMStateField:
    """VMSTATE_UNUSED / UNUSED_V / UNUSED_BUFFER / UNUSED_VARRAY_UINT32: zeros, named "unused"."""
    return VMStateField("unused", "unused_buffer", version_id, exists, size=size, num_field=num_field,
                        discard=True)


def timer(name: str, version_id: int = 0, exists: Test | None = None) -> VMStateField:
    """VMSTATE_TIMER / TIMER_PTR (and _V, _TEST): be64 expiry, ``TIMER_NOT_ARMED`` when not pending."""
    return VMStateField(name, "timer", version_id, exists)


def struct(name: str, vmsd: VMStateDescription, version_id: int = 0, exists: Test | None = None, *,
           num: int | None = None, num_field: str | None = None, factory: Factory | None = None,
           pointers: bool = False) -> VMStateField:
    """VMSTATE_STRUCT / STRUCT_TEST / STRUCT_ARRAY / STRUCT_VARRAY_* / STRUCT_POINTER: a nested vmsd,
    written at the nested vmsd's own ``version_id``; ``num``/``num_field`` make it an array."""
    return VMStateField(name, "struct", version_id, exists, num=num, num_field=num_field, vmsd=vmsd,
                        factory=factory, pointers=pointers)


def vstruct(name: str, vmsd: VMStateDescription, struct_version_id: int, version_id: int = 0,
            exists: Test | None = None, *, factory: Factory | None = None) -> VMStateField:
    """VMSTATE_VSTRUCT / VSTRUCT_TEST / VSTRUCT_V: a nested vmsd at ``struct_version_id``."""
    return VMStateField(name, "vstruct", version_id, exists, vmsd=vmsd, struct_version_id=struct_version_id,
                        factory=factory)


def with_tmp(vmsd: VMStateDescription, factory: Factory | None = None) -> VMStateField:
    """VMSTATE_WITH_TMP: ``vmsd`` runs on a temporary object whose ``parent`` is the current object."""
    return VMStateField("tmp", "tmp", vmsd=vmsd, factory=factory)


def validate(name: str, test: Test) -> VMStateField:
    """VMSTATE_VALIDATE: writes nothing; loading fails when ``test(obj, version_id)`` is false."""
    return VMStateField(name, "validate", exists=test, num=0, must_exist=True)


def _check_equal(local: Any, incoming: Any) -> Any:
    if local is not _MISSING and local != incoming:
        raise ValueError(f"{incoming!r} != our {local!r}")
    return incoming


def _check_le(local: Any, incoming: Any) -> Any:
    if incoming < 0 or (local is not _MISSING and incoming > local):
        raise ValueError(f"invalid value {incoming}, expecting a positive value <= {local!r}")
    return incoming


# -- hooks --------------------------------------------------------------------------------------------

def _hook(vmsd: str, what: str, fn: Callable[..., Any], *args: Any, value: bool = False) -> Any:
    try:
        ret = fn(*args)
    except QevmError:
        raise
    except Exception as e:
        raise HookError(vmsd, what, f"{type(e).__name__}: {e}") from e
    if not value and isinstance(ret, int) and not isinstance(ret, bool) and ret != 0:
        raise HookError(vmsd, what, f"returned {ret}")
    return ret


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
        _hook(vmsd.name, "pre_save", vmsd.pre_save, obj)
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
            _hook(vmsd.name, "post_save", vmsd.post_save, obj)


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
        v = _lookup(obj, f.name if f.attr is None else f.attr, f.steps)
        if v is _MISSING:
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
        _hook(vmsd.name, "pre_load", vmsd.pre_load, obj)
    for f in vmsd.fields:
        fpath = f"{path}/{f.name}"
        if f.present(obj, version, vmsd.name):
            _load_field(f, obj, cur, fpath)
        elif f.must_exist:
            raise DecodeError(f"input validation failed: {vmsd.name}/{f.name}", cur.offset, fpath)
    _load_subsections(vmsd, obj, cur, path)
    if vmsd.post_load is not None:
        _hook(vmsd.name, "post_load", vmsd.post_load, obj, version)


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
        if not f.discard and not f.must_exist and _lookup(obj, f.attr or f.name, f.steps) is _MISSING:
            _store(obj, f.attr or f.name, f.steps, [])
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
    local = _lookup(obj, key, f.steps)
    if f.type in ("struct", "vstruct"):
        assert f.vmsd is not None
        version = f.vmsd.version_id if f.type == "struct" else f.struct_version_id
        if not f.is_array:
            target = local if local is not _MISSING and local is not None else _new(f, obj)
            _load(f.vmsd, target, cur, version, path)
            if target is not local:
                _store(obj, key, f.steps, target)
            return
        lst = local if isinstance(local, list) else []
        for k in range(n):
            epath = f"{path}[{k}]"
            cur_elem = lst[k] if k < len(lst) else _MISSING
            if f.pointers and cur_elem is None:
                _nullptr(cur, epath)
                continue
            target = cur_elem if cur_elem is not _MISSING and cur_elem is not None else _new(f, obj)
            _load(f.vmsd, target, cur, version, epath)
            if k < len(lst):
                lst[k] = target
            else:
                lst.append(target)
        if lst is not local:
            _store(obj, key, f.steps, lst)
        return
    assert f.codec is not None
    try:
        if not f.is_array:
            v = f.codec.decode(cur, size)
            if f.check is not None:
                v = _checked(f, local, v, cur, path)
            _store(obj, key, f.steps, v)
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
        vals = [_checked(f, lst[k] if k < len(lst) else _MISSING, v, cur, f"{path}[{k}]")
                for k, v in enumerate(vals)]
    lst[:n] = vals
    if isinstance(local, list):
        local[:] = lst
    else:
        _store(obj, key, f.steps, lst)


def _checked(f: VMStateField, local: Any, v: Any, cur: Cursor, path: str) -> Any:
    assert f.check is not None
    try:
        return f.check(local, v)
    except ValueError as e:
        raise DecodeError(f"{f.type}: {e}", cur.offset, path) from None


def _nullptr(cur: Cursor, path: str) -> None:
    off = cur.offset
    b = cur.u8()
    if b != NULLPTR_MARKER:
        raise DecodeError(f"NULL pointer element: marker 0x30 expected, found 0x{b:02x}", off, path)


# -- QEMU's JSON writer ------------------------------------------------------------------------------

def vmdesc_json(value: Any) -> str:
    """``value`` as QEMU's compact JSON writer prints it: ``", "`` and ``": "`` separators,
    ``\\uXXXX`` (upper case) for control and non-ASCII characters, '/' unescaped."""
    parts: list[str] = []
    _json(value, parts)
    return "".join(parts)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(s: str) -> str:
    out = ['"']
    for ch in s:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
            continue
        cp = ord(ch)
        if cp > 0xFFFF:
            cp -= 0x10000
            out.append(f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _json(v: Any, out: list[str]) -> None:
    if isinstance(v, dict):
        out.append("{")
        for k, (key, item) in enumerate(v.items()):
            if k:
                out.append(", ")
            out.append(_quote(str(key)))
            out.append(": ")
            _json(item, out)
        out.append("}")
    elif isinstance(v, list | tuple):
        out.append("[")
        for k, item in enumerate(v):
            if k:
                out.append(", ")
            _json(item, out)
        out.append("]")
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif v is None:
        out.append("null")
    elif isinstance(v, int):
        out.append(str(v))
    elif isinstance(v, str):
        out.append(_quote(v))
    else:
        raise EncodeError(f"cannot write {type(v).__name__} into vmdesc JSON")


# -- the configuration record's vmsd (migration/savevm.c, QEMU 7.2) ----------------------------------------

#: ``vmstate_configuration`` without its subsections: used to describe the configuration record in
#: the vmdesc the way QEMU >= 8.2 does (``{"configuration": {...}, "page_size": ..., "devices": ...}``).
CONFIGURATION = VMStateDescription(
    "configuration", 1, 0,
    fields=[scalar("len", "uint32"), vbuffer("name", "len")],
)


# -- SaveStateEntry registry ---------------------------------------------------------------------------

@dataclass(eq=False)
class LegacyHandler:
    """An old-style handler (``register_savevm_live`` with ``save_state``/``load_state``): its
    payload is free-form bytes; vmdesc describes it as one ``data`` buffer."""

    idstr: str
    version_id: int
    save_state: Callable[[Any], bytes] | None = None
    load_state: Callable[[Any, bytes, int], Any] | None = None


@dataclass(eq=False)
class SaveStateEntry:
    idstr: str
    instance_id: int
    section_id: int
    version_id: int
    opaque: Any
    vmsd: VMStateDescription | None = None
    handler: LegacyHandler | None = None
    alias_id: int = -1
    compat_idstr: str | None = None  # the bare vmsd name of a device with a qdev path
    compat_instance_id: int = 0

    @property
    def priority(self) -> int:
        return self.vmsd.priority if self.vmsd is not None else MIG_PRI_DEFAULT

    def describe(self) -> str:
        return f"{self.idstr!r} instance {self.instance_id} (section id {self.section_id})"


@dataclass
class LoadReport:
    """What ``SaveStateRegistry.load`` did: entries loaded (in stream order) and sections skipped."""

    loaded: list[tuple[SaveStateEntry, Section]] = field(default_factory=list)
    skipped: list[Section] = field(default_factory=list)
    configuration: Configuration | None = None


class SaveStateRegistry:
    """QEMU's ``savevm_state.handlers``: entries ordered by priority (higher first, then registration
    order), each with a section id from a counter global to the registry and an instance id."""

    def __init__(self) -> None:
        self.handlers: list[SaveStateEntry] = []
        self.global_section_id = 0

    # -- registration ---------------------------------------------------------------------------------
    def register(self, what: VMStateDescription | LegacyHandler, opaque: Any = None, *,
                 instance_id: int | None = None, path: str | None = None, alias_id: int = -1) -> SaveStateEntry:
        """Register a vmsd (``vmstate_register_with_alias_id``) or an old-style handler
        (``register_savevm_live``).  ``instance_id=None`` picks one like QEMU: one more than the
        highest instance already registered under the same idstr (0 for the first).  ``path`` is
        the qdev path: the idstr becomes ``path/name`` and a compat entry (bare name) is kept."""
        if opaque is None:
            opaque = State()
        if isinstance(what, VMStateDescription):
            vmsd, handler, name, version = what, None, what.name, what.version_id
        elif isinstance(what, LegacyHandler):
            if path is not None:
                raise UsageError("old-style handlers have no qdev path")
            vmsd, handler, name, version = None, what, what.idstr, what.version_id
        else:
            raise UsageError(f"cannot register {type(what).__name__}: a VMStateDescription or LegacyHandler")
        se = SaveStateEntry("", 0, self.global_section_id, version, opaque, vmsd, handler, alias_id)
        self.global_section_id += 1
        if path:
            idstr = f"{path}/{name}"
            se.compat_idstr = name
            se.compat_instance_id = (self._next_compat_instance(name) if instance_id is None else instance_id)
            instance_id = None
        else:
            idstr = name
        if len(idstr.encode("latin-1", "replace")) > 255:
            raise UsageError(f"idstr longer than 255 bytes: {idstr[:40]!r}...")
        se.idstr = idstr
        se.instance_id = self._next_instance(idstr) if instance_id is None else instance_id
        self._insert(se)
        return se

    def _next_instance(self, idstr: str) -> int:
        n = 0
        for se in self.handlers:
            if se.idstr == idstr and n <= se.instance_id:
                n = se.instance_id + 1
        return n

    def _next_compat_instance(self, name: str) -> int:
        n = 0
        for se in self.handlers:
            if se.compat_idstr == name and n <= se.compat_instance_id:
                n = se.compat_instance_id + 1
        return n

    def _insert(self, se: SaveStateEntry) -> None:
        for k, other in enumerate(self.handlers):
            if other.priority < se.priority:
                self.handlers.insert(k, se)
                return
        self.handlers.append(se)

    def unregister(self, se: SaveStateEntry) -> None:
        self.handlers.remove(se)

    def find(self, idstr: str, instance_id: int) -> SaveStateEntry | None:
        """The entry a stream section ``(idstr, instance_id)`` loads into (QEMU's ``find_se``)."""
        for se in self.handlers:
            if se.idstr == idstr and instance_id in (se.instance_id, se.alias_id):
                return se
            if (se.compat_idstr is not None and idstr in se.idstr and se.compat_idstr == idstr
                    and instance_id in (se.compat_instance_id, se.alias_id)):
                return se
        return None

    # -- saving ---------------------------------------------------------------------------------------
    def save_entry(self, se: SaveStateEntry) -> tuple[bytes, dict[str, Any]] | None:
        """One entry's FULL payload and vmdesc device object, or None when it is not sent."""
        head: dict[str, Any] = {"name": se.idstr, "instance_id": se.instance_id}
        if se.vmsd is not None:
            if not se.vmsd.is_needed(se.opaque):
                return None
            saved = save_state(se.vmsd, se.opaque)
            head.update(saved.desc)
            return saved.data, head
        assert se.handler is not None
        if se.handler.save_state is None:
            return None
        data = _hook(se.idstr, "save_state", se.handler.save_state, se.opaque, value=True)
        if not isinstance(data, bytes | bytearray):
            raise EncodeError(f"{se.idstr}: save_state returned {type(data).__name__}, not bytes")
        head["size"] = len(data)
        head["fields"] = [{"name": "data", "size": len(data), "type": "buffer"}]
        return bytes(data), head

    def events(self, *, machine: str | None = "pc-i440fx-7.2", page_size: int = 4096, footers: bool = True,
               vmdesc: bool = True, describe_configuration: bool = False) -> list[Event]:
        """A complete stream as events: header, configuration (when ``machine`` is given), one FULL
        section (+ footer) per entry in list order, EOF, and the vmdesc trailer.  With
        ``describe_configuration`` the vmdesc also describes the configuration (QEMU >= 8.2)."""
        evs: list[Event] = []
        off = 0

        def add(ev: Event) -> None:
            nonlocal off
            evs.append(ev)
            off += len(ev.encode())

        add(FileHeader(0))
        top: dict[str, Any] = {}
        if machine is not None:
            add(Configuration(off, machine, []))
            if describe_configuration:
                name = machine.encode("latin-1")
                top["configuration"] = save_state(CONFIGURATION, State(len=len(name), name=name)).desc
        top["page_size"] = page_size
        devices: list[dict[str, Any]] = []
        top["devices"] = devices
        for se in self.handlers:
            saved = self.save_entry(se)
            if saved is None:
                continue
            data, entry = saved
            sec = Section(se.section_id, se.idstr, se.instance_id, se.version_id, "device")
            add(SectionHeader(off, SectionKind.FULL, sec))
            add(DeviceState(off, sec, data))
            if footers:
                add(Footer(off, se.section_id))
            devices.append(entry)
        add(EndOfFile(off))
        if vmdesc:
            add(VmDescription(off, vmdesc_json(top).encode("utf-8")))
        return evs

    def encode(self, **kw: Any) -> bytes:
        """The stream ``events(**kw)`` describes, as bytes."""
        return b"".join(ev.encode() for ev in self.events(**kw))

    def write(self, path: str, **kw: Any) -> int:
        """Write the stream to ``path``; returns its length."""
        data = self.encode(**kw)
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    # -- loading --------------------------------------------------------------------------------------
    def load(self, source: str | bytes | bytearray, *, strict: bool = True) -> LoadReport:
        """Load every FULL device section of a stream (a path, or the bytes) into the registered
        objects, in stream order, like QEMU's loader: find the entry by (idstr, instance), refuse a
        version above ours, load the body with its hooks.  ``strict=False`` skips sections no entry
        claims (e.g. the devices of a real machine we did not declare) instead of failing.
        Live sections (``ram``...) are not handled here and are always skipped."""
        from .parser import Parser
        from .reader import read_stream

        report = LoadReport()
        pairs: list[tuple[Section, int, bytes]] = []
        if isinstance(source, str):
            an = read_stream(source, strict=False)
            report.configuration = an.configuration
            pairs = [(d.section, d.offset, d.data) for d in an.devices]
        else:
            p = Parser(count_pages=True)
            p.feed(bytes(source))
            p.close()
            for ev in p.events():
                if isinstance(ev, DeviceState):
                    pairs.append((ev.section, ev.offset, ev.data))
                elif isinstance(ev, Configuration):
                    report.configuration = ev
        for sec, off, data in pairs:
            if sec.handler != "device":
                report.skipped.append(sec)
                continue
            se = self.find(sec.idstr, sec.instance_id)
            where = f"section {sec.idstr!r} (id {sec.section_id}, instance {sec.instance_id})"
            if se is None:
                if strict:
                    raise DecodeError(f"unknown savevm section or instance {sec.idstr!r} {sec.instance_id}",
                                      off, where)
                report.skipped.append(sec)
                continue
            if sec.version > se.version_id:
                raise VersionError(sec.idstr, sec.version, se.version_id, True, off)
            if se.vmsd is not None:
                load_state(se.vmsd, se.opaque, data, sec.version, name=sec.idstr, offset=off)
            else:
                assert se.handler is not None
                if se.handler.load_state is None:
                    raise DecodeError(f"{sec.idstr}: this old-style handler cannot load", off, where)
                _hook(sec.idstr, "load_state", se.handler.load_state, se.opaque, data, sec.version)
            report.loaded.append((se, sec))
        return report


#: the process-wide registry, like QEMU's ``savevm_state`` (tests and tools usually make their own)
savevm_state = SaveStateRegistry()
