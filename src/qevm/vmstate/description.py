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

from qevm.codec.types import REGISTRY, TypeCodec
from qevm.errors import DecodeError, EncodeError, QevmError, SchemaError

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


MISSING = object()


def _step_get(obj: Any, step: Step) -> Any:
    is_index, key = step
    if is_index:
        try:
            return obj[key]
        except (IndexError, KeyError, TypeError):
            return MISSING
    return getattr(obj, str(key), MISSING)


def lookup_path(obj: Any, name: str, steps: tuple[Step, ...]) -> Any:
    """The value at a field name, or ``MISSING``."""
    if isinstance(obj, dict):
        return obj.get(name, MISSING)
    for st in steps:
        if obj is MISSING or obj is None:
            return MISSING
        obj = _step_get(obj, st)
    return obj


def store_path(obj: Any, name: str, steps: tuple[Step, ...], value: Any) -> None:
    """Set the value at a field name, creating missing containers on the way."""
    if isinstance(obj, dict):
        obj[name] = value
        return
    for i, st in enumerate(steps[:-1]):
        nxt = _step_get(obj, st)
        if nxt is MISSING or nxt is None:
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
            return bool(call_hook(vmsd, f"test of field {self.name!r}", self.exists, obj, version_id, value=True))
        return self.version_id <= version_id

    def count(self, obj: Any, path: str) -> int:
        if self.num_field is not None:
            n = lookup_path(obj, self.num_field, self._num_steps)
            if isinstance(n, bool) or not isinstance(n, int):
                raise _missing(path, f"element count field {self.num_field!r}", n)
            return n * self.multiply
        return self.num if self.num is not None else 1

    def elem_size(self, obj: Any, path: str) -> int:
        if self.size_field is not None:
            s = lookup_path(obj, self.size_field, self._size_steps)
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
    if got is MISSING:
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
        return bool(call_hook(self.name, "needed", self.needed, obj, value=True))

    def subsection(self, name: str) -> VMStateDescription | None:
        return self._subs.get(name)


# -- hooks --------------------------------------------------------------------------------------------

def call_hook(vmsd: str, what: str, fn: Callable[..., Any], *args: Any, value: bool = False) -> Any:
    try:
        ret = fn(*args)
    except QevmError:
        raise
    except Exception as e:
        raise HookError(vmsd, what, f"{type(e).__name__}: {e}") from e
    if not value and isinstance(ret, int) and not isinstance(ret, bool) and ret != 0:
        raise HookError(vmsd, what, f"returned {ret}")
    return ret


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
    if local is not MISSING and local != incoming:
        raise DecodeError(f"{incoming!r} != our {local!r}")
    return incoming


def _check_le(local: Any, incoming: Any) -> Any:
    if incoming < 0 or (local is not MISSING and incoming > local):
        raise DecodeError(f"invalid value {incoming}, expecting a positive value <= {local!r}")
    return incoming



# -- the configuration record's vmsd (migration/savevm.c, QEMU 7.2) ----------------------------------------

#: ``vmstate_configuration`` without its subsections: used to describe the configuration record in
#: the vmdesc the way QEMU >= 8.2 does (``{"configuration": {...}, "page_size": ..., "devices": ...}``).
CONFIGURATION = VMStateDescription(
    "configuration", 1, 0,
    fields=[scalar("len", "uint32"), vbuffer("name", "len")],
)
