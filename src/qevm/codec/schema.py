"""Device descriptions used to decode sections: a stream's vmdesc, or QEMU's ``-dump-vmstate``.

A vmdesc describes exactly what was written (sizes, array lengths, subsections sent), so
it decodes a section exactly.  ``qemu-system-* -dump-vmstate FILE`` describes the vmsds of a
QEMU build instead: field names, element sizes and versions but no types and no array
lengths.  Descriptions derived from it are guesses: a section is decoded with one only when
the guess accounts for every byte of the payload, otherwise it stays raw.
"""

from __future__ import annotations

from typing import Any

from qevm.errors import SchemaError

__all__ = ["Schema"]

_INT_BY_SIZE = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}


class Schema(dict[tuple[str, int], dict[str, Any]]):
    """(idstr, instance_id) -> vmdesc device entry, plus an optional ``-dump-vmstate`` catalog."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.catalog: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_vmdesc(cls, vmdesc: Any) -> Schema:
        if not isinstance(vmdesc, dict) or not isinstance(vmdesc.get("devices", []), list):
            raise SchemaError("vmdesc is not an object with a 'devices' list")
        out = cls()
        for d in vmdesc.get("devices", []):
            if not isinstance(d, dict) or "name" not in d:
                raise SchemaError("vmdesc device entry without a name")
            try:
                out[(str(d["name"]), int(d.get("instance_id", 0)))] = d
            except (TypeError, ValueError):
                raise SchemaError(f"vmdesc device {d.get('name')!r} has a bad instance_id") from None
        if isinstance(vmdesc.get("configuration"), dict):
            out[("configuration", 0)] = vmdesc["configuration"]
        return out

    @classmethod
    def from_dump_vmstate(cls, dump: Any) -> Schema:
        if not isinstance(dump, dict):
            raise SchemaError("-dump-vmstate JSON is not an object")
        out = cls()
        for entry in dump.values():
            if isinstance(entry, dict) and isinstance(entry.get("Description"), dict):
                d = entry["Description"]
                out.catalog.setdefault(str(d.get("name", entry.get("Name", ""))), d)
        if not out.catalog:
            raise SchemaError("no vmsd descriptions in the -dump-vmstate JSON")
        return out

    def describe(self, idstr: str, instance_id: int, version: int) -> tuple[dict[str, Any] | None, bool]:
        """The description for a section and whether it is exact (vmdesc) or a guess (catalog)."""
        d = self.get((idstr, instance_id))
        if d is not None:
            return d, True
        vmsd = self.catalog.get(idstr.rsplit("/", 1)[-1])
        if vmsd is None:
            return None, False
        return _from_dump(vmsd, version), False


def _from_dump(d: dict[str, Any], version: int) -> dict[str, Any]:
    fields: list[dict[str, Any]] = []
    for f in d.get("Fields", []):
        if int(f.get("version_id", 0)) > version or f.get("field_exists"):
            continue
        size = int(f.get("size", 0))
        name = str(f.get("field", "?"))
        sub = f.get("Description")
        if isinstance(sub, dict):
            fields.append({"name": name, "type": "struct", "size": size, "unsized": True,
                           "struct": _from_dump(sub, int(sub.get("version_id", 0)))})
        else:
            fields.append({"name": name, "type": _INT_BY_SIZE.get(size, "buffer"), "size": size})
    subs = [dict(_from_dump(s, int(s.get("version_id", 0))), vmsd_name=str(s.get("name", "")))
            for s in d.get("Subsections", []) if isinstance(s, dict)]
    out: dict[str, Any] = {"vmsd_name": str(d.get("name", "")), "version": version, "fields": fields,
                           "optional_subsections": True}
    if subs:
        out["subsections"] = subs
    return out
