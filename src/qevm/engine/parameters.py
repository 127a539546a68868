"""QEMU 10.0's migration parameters as one table: QAPI type, default, range check, error texts.

``PARAMETERS`` drives ``migrate-set-parameters`` (``apply``) and ``query-migrate-parameters``
(``MigrationParameters.query``).  The texts are the ones QEMU 10.0 answers with (probed on the
real binary): a value of the wrong JSON type or outside the QAPI integer type fails in the visitor
("Parameter 'x' expects uint8_t"), a value inside the type but outside the accepted range fails in
``migrate_params_check`` with the parameter's C name ("Parameter 'max_cpu_throttle' expects an
integer in the range of cpu_throttle_initial to 99").  Checks run on the merged parameters (the
current ones with the request applied), and nothing is stored unless every check passes.

Which parameters change the engine's behaviour is listed by ``ACTIVE_PARAMETERS``; the others are
accepted, range-checked and reported, as a management layer expects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qevm.engine.errors import QMPError
from qevm.engine.stream import XBZRLE_DEFAULT_CACHE

__all__ = ["Parameter", "PARAMETERS", "DEFAULT_PARAMETERS", "APIS", "parameters_of", "default_parameters",
           "ACTIVE_PARAMETERS", "apply_parameters",
           "MAX_MIGRATE_DOWNTIME", "MAX_THROTTLE", "XBZRLE_DEFAULT_CACHE"]

MAX_MIGRATE_DOWNTIME = 2000 * 1000
MAX_THROTTLE = 128 << 20  # QEMU's default max-bandwidth
U64 = (1 << 64) - 1

#: parameters that change behaviour here (the others are stored and reported only)
ACTIVE_PARAMETERS = ("max-bandwidth", "downtime-limit", "xbzrle-cache-size")

#: multifd-compression methods a Debian QEMU 10.0 build offers (qatzip, qpl, uadk are not compiled in)
MULTIFD_COMPRESSION = ("none", "zlib", "zstd")
MIGRATION_MODES = ("normal", "cpr-reboot", "cpr-transfer")
ZERO_PAGE_DETECTION = ("none", "legacy", "multifd")


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # "u8", "u32", "u64", "bool", "enum", "str-or-null", "bitmap-mapping"
    default: Any
    choices: tuple[str, ...] = ()
    #: (low, high, text) checked on the merged value; ``text`` is QEMU's sentence after "Parameter '...' "
    check: tuple[int, int, str] | None = None
    #: the migration APIs that have it ("10.0": QEMU 10.0's, "7.2": QEMU 7.2's)
    apis: tuple[str, ...] = ("10.0", "7.2")
    #: the APIs that range-check it (QEMU 7.2 took any multifd zlib/zstd level)
    checked_in: tuple[str, ...] = ("10.0", "7.2")


def _between(cname: str, lo: int, hi: int, shown_lo: int | None = None) -> tuple[int, int, str]:
    return lo, hi, f"Parameter '{cname}' expects a value between {lo if shown_lo is None else shown_lo} and {hi}"


def _range(cname: str, lo: int, hi: int, text: str | None = None) -> tuple[int, int, str]:
    return lo, hi, f"Parameter '{cname}' expects an integer in the range of {text or f'{lo} to {hi}'}"


P = Parameter
#: in QEMU 10.0's query-migrate-parameters order (block-bitmap-mapping only appears once set)
PARAMETERS: tuple[Parameter, ...] = (
    P("compress-level", "u8", 1, check=_between("compress_level", 0, 9), apis=("7.2",)),
    P("compress-threads", "u8", 8, check=_between("compress_threads", 1, 255), apis=("7.2",)),
    P("compress-wait-thread", "bool", True, apis=("7.2",)),
    P("decompress-threads", "u8", 2, check=_between("decompress_threads", 1, 255), apis=("7.2",)),
    P("block-incremental", "bool", False, apis=("7.2",)),
    P("announce-initial", "u64", 50, check=_between("announce_initial", 0, 100000)),
    P("announce-max", "u64", 550, check=_between("announce_max", 0, 100000)),
    P("announce-rounds", "u64", 5, check=_between("announce_rounds", 0, 1000)),
    P("announce-step", "u64", 100, check=_between("announce_step", 1, 10000, shown_lo=0)),
    P("throttle-trigger-threshold", "u8", 50, check=_range("throttle_trigger_threshold", 1, 100)),
    P("cpu-throttle-initial", "u8", 20, check=_range("cpu_throttle_initial", 1, 99)),
    P("cpu-throttle-increment", "u8", 10, check=_range("cpu_throttle_increment", 1, 99)),
    P("cpu-throttle-tailslow", "bool", False),
    P("tls-creds", "str-or-null", ""),
    P("tls-hostname", "str-or-null", ""),
    P("tls-authz", "str-or-null", ""),
    P("max-bandwidth", "u64", MAX_THROTTLE),
    P("avail-switchover-bandwidth", "u64", 0, apis=("10.0",)),
    P("downtime-limit", "u64", 300, check=_range("downtime_limit", 0, MAX_MIGRATE_DOWNTIME, "0 to (2000 * 1000) ms")),
    P("x-checkpoint-delay", "u32", 20000),
    P("multifd-channels", "u8", 2, check=_between("multifd_channels", 1, 255)),
    P("xbzrle-cache-size", "u64", XBZRLE_DEFAULT_CACHE),
    P("max-postcopy-bandwidth", "u64", 0),
    P("max-cpu-throttle", "u8", 99),  # its low bound is cpu-throttle-initial: see _cross_checks
    P("multifd-compression", "enum", "none", choices=MULTIFD_COMPRESSION),
    P("multifd-zlib-level", "u8", 1, check=_between("multifd_zlib_level", 0, 9), checked_in=("10.0",)),
    P("multifd-qatzip-level", "u8", 1, check=_between("multifd_qatzip_level", 1, 9), apis=("10.0",)),
    P("multifd-zstd-level", "u8", 1, check=_between("multifd_zstd_level", 0, 20), checked_in=("10.0",)),
    P("block-bitmap-mapping", "bitmap-mapping", None),
    P("x-vcpu-dirty-limit-period", "u64", 1000, check=_between("x-vcpu-dirty-limit-period", 1, 1000),
      apis=("10.0",)),
    P("vcpu-dirty-limit", "u64", 1, check=(1, U64, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
      apis=("10.0",)),
    P("mode", "enum", "normal", choices=MIGRATION_MODES, apis=("10.0",)),
    P("zero-page-detection", "enum", "multifd", choices=ZERO_PAGE_DETECTION, apis=("10.0",)),
    P("direct-io", "bool", False, apis=("10.0",)),
)
#: accepted but not stored: QEMU 7.2's migrate-set-parameters keeps the old multifd levels (probed)
IGNORED_BY: dict[str, tuple[str, ...]] = {"7.2": ("multifd-zlib-level", "multifd-zstd-level")}
#: the migration APIs the engine speaks: QEMU 10.0's (default) and QEMU 7.2's (with compression threads)
APIS = ("10.0", "7.2")


def parameters_of(api: str) -> dict[str, Parameter]:
    return {p.name: p for p in PARAMETERS if api in p.apis}


def default_parameters(api: str = "10.0") -> dict[str, Any]:
    """query-migrate-parameters of a fresh QEMU ``api``."""
    return {p.name: p.default for p in PARAMETERS if api in p.apis and p.default is not None}


#: QEMU 10.0's query-migrate-parameters with its defaults
DEFAULT_PARAMETERS: dict[str, Any] = default_parameters("10.0")

_UINT_MAX = {"u8": (255, "uint8_t"), "u32": ((1 << 32) - 1, "uint32_t"), "u64": (U64, "uint64")}


def _visit(p: Parameter, v: Any, page_size: int) -> Any:
    """QAPI's input visitor: the JSON value -> the C value, or its error."""
    if p.kind in _UINT_MAX:
        if not isinstance(v, int) or isinstance(v, bool):
            raise QMPError(f"Parameter '{p.name}' expects uint64")
        if v < 0:
            if v < -(1 << 63):
                raise QMPError(f"Parameter '{p.name}' expects uint64")
            v &= U64  # a negative number is taken modulo 2^64, as QEMU's visitor does
        hi, cname = _UINT_MAX[p.kind]
        if v > hi:
            raise QMPError(f"Parameter '{p.name}' expects {cname}")
        return v
    if p.kind == "bool":
        if not isinstance(v, bool):
            raise QMPError(f"Invalid parameter type for '{p.name}', expected: boolean")
        return v
    if p.kind == "enum":
        if not isinstance(v, str):
            raise QMPError(f"Invalid parameter type for '{p.name}', expected: string")
        if v not in p.choices:
            raise QMPError(f"Parameter '{p.name}' does not accept value '{v}'")
        return v
    if p.kind == "str-or-null":
        if v is None:
            return ""  # null resets to the empty string
        if not isinstance(v, str):
            raise QMPError(f"Invalid parameter type for '{p.name}', expected: StrOrNull")
        return v
    return _visit_mapping(v)


def _visit_mapping(v: Any) -> list[dict[str, Any]]:
    """``block-bitmap-mapping``: [{node-name, alias, bitmaps: [{name, alias, transform?}]}]."""
    name = "block-bitmap-mapping"
    if not isinstance(v, list):
        raise QMPError(f"Invalid parameter type for '{name}', expected: array")
    out: list[dict[str, Any]] = []
    for i, node in enumerate(v):
        where = f"{name}[{i}]"
        if not isinstance(node, dict):
            raise QMPError(f"Invalid parameter type for '{where}', expected: object")
        _members(node, where, {"node-name": str, "alias": str, "bitmaps": list})
        bitmaps = []
        for j, bm in enumerate(node["bitmaps"]):
            bwhere = f"{where}.bitmaps[{j}]"
            if not isinstance(bm, dict):
                raise QMPError(f"Invalid parameter type for '{bwhere}', expected: object")
            _members(bm, bwhere, {"name": str, "alias": str}, optional={"transform": dict})
            if "transform" in bm:
                _members(bm["transform"], f"{bwhere}.transform", {}, optional={"persistent": bool})
            bitmaps.append(dict(bm))
        out.append({"node-name": node["node-name"], "alias": node["alias"], "bitmaps": bitmaps})
    _check_mapping(out)
    return out


def _members(obj: dict[str, Any], where: str, required: dict[str, type],
             optional: dict[str, type] | None = None) -> None:
    allowed = {**required, **(optional or {})}
    for k in obj:
        if k not in allowed:
            raise QMPError(f"Parameter '{where}.{k}' is unexpected")
    for k, t in allowed.items():
        if k not in obj:
            if k in required:
                raise QMPError(f"Parameter '{where}.{k}' is missing")
            continue
        ok = isinstance(obj[k], t) and (t is not int or not isinstance(obj[k], bool))
        if not ok:
            expected = {str: "string", list: "array", dict: "object", bool: "boolean"}[t]
            raise QMPError(f"Invalid parameter type for '{where}.{k}', expected: {expected}")


def _well_formed(alias: str) -> bool:
    """QEMU's identifier rule: a letter first, then letters, digits, '-', '.', '_'."""
    return bool(alias) and alias[0].isascii() and alias[0].isalpha() and all(
        (c.isascii() and c.isalnum()) or c in "-._" for c in alias)


def _check_mapping(mapping: list[dict[str, Any]]) -> None:
    bad = "Invalid mapping given for block-bitmap-mapping: "
    nodes: set[str] = set()
    aliases: set[str] = set()
    for node in mapping:
        if node["node-name"] in nodes:
            raise QMPError(f"{bad}The node name '{node['node-name']}' is mapped twice")
        if len(node["alias"].encode()) > 255:
            raise QMPError(f"{bad}The node alias '{node['alias']}' is longer than 255 bytes")
        if not _well_formed(node["alias"]):
            raise QMPError(f"{bad}The node alias '{node['alias']}' is not well-formed")
        if node["alias"] in aliases:
            raise QMPError(f"{bad}The node alias '{node['alias']}' is used twice")
        nodes.add(node["node-name"])
        aliases.add(node["alias"])
        names: set[str] = set()
        baliases: set[str] = set()
        for bm in node["bitmaps"]:
            if bm["name"] in names:
                raise QMPError(f"{bad}The bitmap '{node['node-name']}'/'{bm['name']}' is mapped twice")
            if len(bm["alias"].encode()) > 255:
                raise QMPError(f"{bad}The bitmap alias '{node['alias']}'/'{bm['alias']}' is longer than 255 bytes")
            if bm["alias"] in baliases:
                raise QMPError(f"{bad}The bitmap alias '{node['alias']}'/'{bm['alias']}' is used twice")
            names.add(bm["name"])
            baliases.add(bm["alias"])


def _cross_checks(merged: dict[str, Any], page_size: int, api: str) -> None:
    for p in PARAMETERS:
        if p.check is not None and p.name in merged and api in p.checked_in:
            lo, hi, text = p.check
            if not lo <= merged[p.name] <= hi:
                raise QMPError(text)
    v = merged["xbzrle-cache-size"]
    if v < page_size or v & (v - 1):
        raise QMPError("Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size")
    if not merged["cpu-throttle-initial"] <= merged["max-cpu-throttle"] <= 99:
        raise QMPError("Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99")


def apply_parameters(current: dict[str, Any], request: dict[str, Any], page_size: int,
                     check: Callable[[dict[str, Any]], None] | None = None, api: str = "10.0") -> None:
    """``migrate-set-parameters``: visit every member, check the merged result, then store it
    in ``current`` (all or nothing).  ``check`` is the caller's own refusal (unsupported values)."""
    known = parameters_of(api)
    for k in request:
        if k not in known:
            raise QMPError(f"Parameter '{k}' is unexpected")
    new = {k: _visit(known[k], v, page_size) for k, v in request.items()}
    merged = {**current, **new}
    _cross_checks(merged, page_size, api)
    if check is not None:
        check(new)
    for k in IGNORED_BY.get(api, ()):
        new.pop(k, None)
    current.update(new)
