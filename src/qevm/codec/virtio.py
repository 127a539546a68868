"""Layout of a virtio device's ``virtio`` field (what ``virtio_save`` writes), QEMU 7.2 and 10.0.

Describes (same wire layout in both versions):
- ``hw/virtio/virtio.c`` ``virtio_save``: the transport's ``save_config``; device status, ISR,
  queue select, low 32 guest feature bits, the device config bytes; the queue count and per queue
  its size, descriptor ring address, last_avail_idx and the transport's ``save_queue``; the device's
  legacy ``save`` and/or its ``vmsd``; then the ``vmstate_virtio`` subsections (device_endian,
  64bit_features, virtqueues, ringsize, broken, extra_state, started, packed_virtqueues, disabled),
  queue arrays of ``VIRTIO_QUEUE_MAX`` (1024) entries;
- ``hw/virtio/virtio-pci.c``: ``virtio_pci_save_config`` (``hw/pci/pci.c`` ``vmstate_pci_device``,
  ``hw/pci/msix.c`` ``msix_save``, the config vector), ``virtio_pci_save_queue`` (the queue's MSI-X
  vector) and the ``virtio_pci/modern_state`` extra state;
- device parts: ``hw/net/virtio-net.c`` ``vmstate_virtio_net_device`` (+ ``virtio-net-device/rss``),
  ``hw/block/virtio-blk.c`` ``virtio_blk_save_device``, ``hw/char/virtio-serial-bus.c``
  ``virtio_serial_save_device``, ``hw/virtio/virtio-balloon.c`` ``vmstate_virtio_balloon_device``;
  virtio-rng, virtio-scsi, virtio-gpu and virtio-input save nothing device-specific here;
- device config layouts from ``include/standard-headers/linux/virtio_{net,blk,console,balloon,scsi,
  gpu}.h`` (little-endian, as a VERSION_1 device keeps them).

A device part qevm does not describe (or that does not fit) stays raw up to the first virtio
subsection; subsections qevm does not know leave the tail raw.  Transports: virtio-pci, and
virtio-mmio (``hw/virtio/virtio-mmio.c``: ``virtio_mmio_save_config``, the
per-queue ring alignment, the ``virtio_mmio/state`` extra state) whose device part is recognised by
the layout that fits, since that transport names no device; virtio-ccw keeps the whole blob raw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qevm.codec.layout import Peek, arr, buf, le, rows, size_of, struct, subsection, uint
from qevm.codec.pci import VIRTIO_VENDOR, capabilities

__all__ = ["virtio_layout", "virtio_gpu_layout", "DEVICE_NAMES"]

Desc = dict[str, Any]
QUEUE_MAX = 1024  # VIRTIO_QUEUE_MAX
QUEUE_MAX_SIZE = 1024  # VIRTQUEUE_MAX_SIZE

DEVICE_NAMES = {1: "net", 2: "blk", 3: "console", 4: "rng", 5: "balloon", 8: "scsi", 9: "9p", 16: "gpu",
                18: "input", 19: "vsock", 20: "crypto", 23: "iommu", 24: "mem", 26: "fs", 27: "pmem"}
_LEGACY_IDS = {0x1000: 1, 0x1001: 2, 0x1002: 5, 0x1003: 3, 0x1004: 8, 0x1005: 4, 0x1009: 9}

_CONFIG: dict[int, tuple[tuple[str, int], ...]] = {
    1: (("_mac", 6), ("status", 2), ("max_virtqueue_pairs", 2), ("mtu", 2), ("speed", 4), ("duplex", 1),
        ("rss_max_key_size", 1), ("rss_max_indirection_table_length", 2), ("supported_hash_types", 4)),
    2: (("capacity", 8), ("size_max", 4), ("seg_max", 4), ("cylinders", 2), ("heads", 1), ("sectors", 1),
        ("blk_size", 4), ("physical_block_exp", 1), ("alignment_offset", 1), ("min_io_size", 2),
        ("opt_io_size", 4), ("wce", 1), ("_unused0", 1), ("num_queues", 2), ("max_discard_sectors", 4),
        ("max_discard_seg", 4), ("discard_sector_alignment", 4), ("max_write_zeroes_sectors", 4),
        ("max_write_zeroes_seg", 4), ("write_zeroes_may_unmap", 1), ("_unused1", 3),
        ("max_secure_erase_sectors", 4), ("max_secure_erase_seg", 4), ("secure_erase_sector_alignment", 4)),
    3: (("cols", 2), ("rows", 2), ("max_nr_ports", 4), ("emerg_wr", 4)),
    5: (("num_pages", 4), ("actual", 4), ("free_page_hint_cmd_id", 4), ("poison_val", 4)),
    8: (("num_queues", 4), ("seg_max", 4), ("max_sectors", 4), ("cmd_per_lun", 4), ("event_info_size", 4),
        ("sense_size", 4), ("cdb_size", 4), ("max_channel", 2), ("max_target", 2), ("max_lun", 4)),
    16: (("events_read", 4), ("events_clear", 4), ("num_scanouts", 4), ("num_capsets", 4)),
}

# vmstate_virtio's subsections (hw/virtio/virtio.c)
_SUBSECTIONS: dict[str, list[Desc]] = {
    "virtio/device_endian": [uint("device_endian", 1)],
    "virtio/64bit_features": [uint("guest_features", 8)],
    "virtio/virtqueues": [arr(struct("vq", "virtqueue_state", [uint("avail", 8), uint("used", 8)]), QUEUE_MAX)],
    "virtio/ringsize": [arr(struct("vq", "ringsize_state", [uint("num_default", 4)]), QUEUE_MAX)],
    "virtio/broken": [{"name": "broken", "type": "bool", "size": 1}],
    "virtio/started": [{"name": "started", "type": "bool", "size": 1}],
    "virtio/disabled": [{"name": "disabled", "type": "bool", "size": 1}],
    "virtio/packed_virtqueues": [arr(struct("vq", "packed_virtqueue_state", [
        uint("last_avail_idx", 2), {"name": "last_avail_wrap_counter", "type": "bool", "size": 1},
        uint("used_idx", 2), {"name": "used_wrap_counter", "type": "bool", "size": 1},
        uint("inuse", 4)]), QUEUE_MAX)],
}
SUBSECTION_NAMES = (*_SUBSECTIONS, "virtio/extra_state")

# hw/virtio/virtio-pci.c vmstate_virtio_pci_modern_state_sub
_PCI_MODERN = subsection("virtio_pci/modern_state", [
    uint("dfselect", 4), uint("gfselect", 4), arr(uint("guest_features", 4), 2),
    arr(struct("vqs", "virtio_pci/modern_queue_state", [
        uint("num", 2), buf("unused", 1), {"name": "enabled", "type": "bool", "size": 1},
        arr(uint("desc", 4), 2), arr(uint("avail", 4), 2), arr(uint("used", 4), 2)]), QUEUE_MAX)])

# hw/virtio/virtio-mmio.c vmstate_virtio_mmio_state_sub
_MMIO_STATE = subsection("virtio_mmio/state", [
    arr(uint("guest_features", 4), 2),
    arr(struct("vqs", "virtio_mmio/queue_state", [
        uint("num", 2), {"name": "enabled", "type": "bool", "size": 1},
        arr(uint("desc", 4), 2), arr(uint("avail", 4), 2), arr(uint("used", 4), 2)]), QUEUE_MAX)])

_BOOL = "bool"


class _Ctx:
    def __init__(self, features: int, queues: int, msix: bool) -> None:
        self.features = features
        self.queues = queues
        self.msix = msix


def _elem_old(name: str) -> Desc:
    """``VirtQueueElementOld`` as ``qemu_put_virtqueue_element`` writes it: a host-endian C struct
    (little-endian on the x86/arm hosts QEMU runs on), 4 bytes of padding after ``in_num``."""
    iov = struct("sg", "iovec", [le("base", 8), le("len", 8)])
    return struct(name, "VirtQueueElementOld", [
        le("index", 4), le("out_num", 4), le("in_num", 4), buf("padding", 4),
        arr(le("in_addr", 8), QUEUE_MAX_SIZE), arr(le("out_addr", 8), QUEUE_MAX_SIZE),
        arr(dict(iov, name="in_sg"), QUEUE_MAX_SIZE), arr(dict(iov, name="out_sg"), QUEUE_MAX_SIZE)])


def _net(p: Peek, c: _Ctx) -> Desc:
    in_use = p.be(4, 18)
    fields = [buf("mac", 6), struct("vqs", "virtio-net-queue-tx_waiting", [uint("tx_waiting", 4)]),
              uint("mergeable_rx_bufs", 4), uint("status", 2), uint("promisc", 1), uint("allmulti", 1),
              uint("mac_table.in_use", 4)]
    if in_use:
        fields.append(buf("mac_table.macs", in_use * 6))
    fields += [buf("vlans", 4096 >> 3), uint("has_vnet_hdr", 4)]
    fields += [uint(n, 1) for n in ("mac_table.multi_overflow", "mac_table.uni_overflow", "alluni",
                                    "nomulti", "nouni", "nobcast", "has_ufo")]
    pos = size_of({"fields": fields})
    if c.queues // 2 > 1:  # max_queue_pairs > 1: queues are 2 per pair (+ the control queue)
        curr = p.be(2, pos + 2)
        fields += [uint("max_queue_pairs", 2), uint("curr_queue_pairs", 2)]
        if curr > 1:
            fields.append(arr(struct("vqs_1", "virtio-net-queue-tx_waiting", [uint("tx_waiting", 4)]),
                              curr - 1))
        pos += 4 + 4 * max(0, curr - 1)
    if c.features & (1 << 2):  # VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
        fields.append(uint("curr_guest_offloads", 8))
        pos += 8
    subs = []
    if p.subsection_at(pos) == "virtio-net-device/rss":
        body = 2 + len("virtio-net-device/rss") + 4
        n = p.be(2, pos + body + 3 + 4)
        subs.append(subsection("virtio-net-device/rss", [
            {"name": "rss_data.enabled", "type": _BOOL, "size": 1},
            {"name": "rss_data.redirect", "type": _BOOL, "size": 1},
            {"name": "rss_data.populate_hash", "type": _BOOL, "size": 1},
            uint("rss_data.hash_types", 4), uint("rss_data.indirections_len", 2),
            uint("rss_data.default_queue", 2), buf("rss_data.key", 40),
            *([arr(uint("rss_data.indirections_table", 2), n)] if n else [])]))
    return struct("device", "virtio-net-device", fields, subs)


def _blk(p: Peek, c: _Ctx) -> Desc:
    fields: list[Desc] = []
    pos = 0
    while p.be(1, pos) == 1:
        req = [uint("more", 1)]
        if c.queues > 1:
            req.append(uint("vq_index", 4))
        req.append(_elem_old("elem"))
        f = dict(struct("request", "virtio-blk request", req), index=len(fields))
        fields.append(f)
        pos += f["size"]
        if pos > p.left():
            raise ValueError("requests run past the end")
    fields.append(uint("end", 1))
    return struct("device", "virtio-blk (virtio_blk_save_device)", fields)


def _serial(p: Peek, c: _Ctx) -> Desc:
    max_ports = p.be(4, 4)
    nmap = (max_ports + 31) // 32
    if nmap > 1024:
        raise ValueError("implausible max_nr_ports")
    fields = [uint("cols", 2), uint("rows", 2), uint("max_nr_ports", 4)]
    if nmap:
        fields.append(arr(uint("ports_map", 4), nmap))
    pos = 8 + 4 * nmap
    nports = p.be(4, pos)
    fields.append(uint("nr_active_ports", 4))
    pos += 4
    for k in range(nports):
        port = [uint("id", 4), uint("guest_connected", 1), uint("host_connected", 1), uint("elem_popped", 4)]
        if p.be(4, pos + 6):
            port += [uint("iov_idx", 4), uint("iov_offset", 8), _elem_old("elem")]
        f = dict(struct("port", "virtio-serial port", port), index=k)
        fields.append(f)
        pos += f["size"]
        if pos > p.left():
            raise ValueError("ports run past the end")
    return struct("device", "virtio-serial (virtio_serial_save_device)", fields)


def _balloon(p: Peek, c: _Ctx) -> Desc:
    subs = []
    pos = 8
    for name, fields in (("virtio-balloon-device/free-page-report",
                          [uint("free_page_hint_cmd_id", 4), uint("free_page_hint_status", 4)]),
                         ("virtio-balloon-device/page-poison", [uint("poison_val", 4)])):
        if p.subsection_at(pos) == name:
            subs.append(subsection(name, fields))
            pos += 2 + len(name) + 4 + size_of({"fields": fields})
    return struct("device", "virtio-balloon-device", [uint("num_pages", 4), uint("actual", 4)], subs)


def _nothing(p: Peek, c: _Ctx) -> None:
    return None


_DEVICES: dict[int, Callable[[Peek, _Ctx], Desc | None]] = {
    1: _net, 2: _blk, 3: _serial, 5: _balloon, 4: _nothing, 8: _nothing, 16: _nothing, 18: _nothing,
}


def _transport(p: Peek, cfg_size: int) -> tuple[Desc, int, bool]:
    """The virtio-pci ``save_config`` part; returns it, the virtio device id and whether MSI-X is on."""
    if p.be(4) not in (1, 2):
        raise ValueError("not a PCIDevice vmstate (version_id)")
    cfg = p.data[4:4 + cfg_size]
    if len(cfg) != cfg_size or int.from_bytes(cfg[0:2], "little") != VIRTIO_VENDOR:
        raise ValueError("not a virtio PCI config space")
    did = int.from_bytes(cfg[2:4], "little")
    dev = _LEGACY_IDS.get(did, did - 0x1040 if did >= 0x1040 else 0)
    fields: list[Desc] = [{"name": "version_id", "type": "int32", "size": 4},
                          {"name": "config", "type": "pci config", "size": cfg_size},
                          arr(uint("irq_state", 4), 4)]
    msix = [off for off, cid in capabilities(cfg) if cid == 0x11]
    if msix:
        n = (int.from_bytes(cfg[msix[0] + 2:msix[0] + 4], "little") & 0x7FF) + 1
        fields += [arr(struct("msix_table", "msix table entry", [le("address_lo", 4), le("address_hi", 4),
                                                                 le("data", 4), le("vector_control", 4)]), n),
                   buf("msix_pba", (n + 7) // 8), uint("config_vector", 2)]
    return struct("transport", "virtio-pci", fields), dev, bool(msix)


def _has_express(data: bytes) -> bool:
    cfg = data[4:4 + 256]
    return len(cfg) == 256 and any(cid == 0x10 for _, cid in capabilities(cfg))


def virtio_layout(data: bytes) -> Desc:
    """The vmsd description of one ``virtio`` field (raises ``ValueError`` when it does not fit)."""
    err: ValueError | None = None
    if len(data) >= 6 and data[4:6] == VIRTIO_VENDOR.to_bytes(2, "little"):
        for cfg_size in (4096, 256) if _has_express(data) else (256, 4096):
            try:
                return _layout(data, cfg_size)
            except ValueError as e:
                err = err or e
    try:
        return _layout(data, None)
    except ValueError as e:
        raise err or e from None


def _mmio_transport() -> Desc:
    """hw/virtio/virtio-mmio.c ``virtio_mmio_save_config``."""
    return struct("transport", "virtio-mmio", [uint("host_features_sel", 4), uint("guest_features_sel", 4),
                                               uint("guest_page_shift", 4)])


def _layout(data: bytes, cfg_size: int | None) -> Desc:
    """PCI transport with a config space of ``cfg_size`` bytes, or virtio-mmio when None (the
    transport carries no device id there: the device part is recognised by which layout fits)."""
    p = Peek(data)
    if cfg_size is None:
        transport, dev, msix = _mmio_transport(), 0, False
    else:
        transport, dev, msix = _transport(p, cfg_size)
    fields: list[Desc] = [transport]
    p.pos += transport["size"]
    features = p.be(4, 4)
    config_len = p.be(4, 8)
    if config_len > p.left():
        raise ValueError("config_len past the end")
    fields += [uint("status", 1), uint("isr", 1), uint("queue_sel", 2), uint("guest_features_lo", 4),
               uint("config_len", 4)]
    config_at = len(fields)
    p.pos += 12 + config_len
    nq = p.be(4)
    if nq > QUEUE_MAX:
        raise ValueError(f"{nq} queues")
    queue = [uint("num", 4)]
    if cfg_size is None:
        queue.append(uint("align", 4))  # has_variable_vring_alignment
    queue += [uint("desc", 8), uint("last_avail_idx", 2)]
    if msix:
        queue.append(uint("vector", 2))
    fields.append(uint("num_queues", 4))
    if nq:
        fields.append(arr(struct("vq", "virtqueue", queue), nq))
    p.pos += 4 + nq * size_of({"fields": queue})
    if p.left() < 0:
        raise ValueError("queues past the end")

    device: Desc | None = None
    for cand in ([dev] if cfg_size is not None else [1, 2, 3, 5, 4]):
        dev_fn = _DEVICES.get(cand)
        if dev_fn is None:
            continue
        try:
            device = dev_fn(p, _Ctx(features, nq, msix))
            end = p.pos + (device["size"] if device else 0)
            if end != len(data) and Peek(data, end).subsection_at() not in SUBSECTION_NAMES:
                raise ValueError("device part does not end at a virtio subsection")
        except ValueError:
            device = None
            continue
        dev = cand
        if cfg_size is None:
            if device is None:
                dev = 0  # no device part: rng, scsi, gpu, input... cannot be told apart here
            else:
                device["note"] = "device recognised by its layout (virtio-mmio carries no device id)"
        break
    else:
        end = _find_subsections(data, p.pos)
        if end > p.pos:
            fields.append(buf("device", end - p.pos, note=f"virtio-{DEVICE_NAMES.get(dev, dev)} device "
                                                          "state not described by qevm"))
        p.pos = end
    if device is not None:
        fields.append(device)
        p.pos += device["size"]
    if config_len:
        table = _CONFIG.get(dev)
        name = DEVICE_NAMES.get(dev, str(dev))
        fields.insert(config_at, struct("config", f"virtio-{name} config", rows(table, config_len))
                      if table else buf("config", config_len))

    subs: list[Desc] = []
    start = p.pos
    try:
        while p.left():
            sname = p.subsection_at()
            if sname is None:
                raise ValueError("not a subsection")
            body = _SUBSECTIONS.get(sname)
            head = 2 + len(sname) + 4
            if body is not None:
                sd = subsection(sname, body)
            elif sname == "virtio/extra_state":
                inner = Peek(data, p.pos + head).subsection_at()
                known = {_PCI_MODERN["vmsd_name"]: _PCI_MODERN, _MMIO_STATE["vmsd_name"]: _MMIO_STATE}
                extra = subsection("virtio_pci" if cfg_size else "virtio_mmio", [],
                                   [known[inner]] if inner in known else None)
                sd = subsection(sname, [{"name": "extra_state", "type": "struct", "size": size_of(extra),
                                        "struct": extra}])
            else:
                raise ValueError(f"unknown subsection {sname!r}")
            p.pos += head + size_of(sd)
            if p.left() < 0:
                raise ValueError(f"subsection {sname!r} past the end")
            subs.append(sd)
    except ValueError as e:
        subs = []
        fields.append(buf("subsections", len(data) - start, note=f"virtio subsections not decoded: {e}"))
    out: Desc = {"vmsd_name": "virtio", "version": 1, "fields": fields}
    if subs:
        out["subsections"] = subs
    return out


def _find_subsections(data: bytes, pos: int) -> int:
    """Where the first ``vmstate_virtio`` subsection starts at or after ``pos`` (else the end)."""
    best = len(data)
    for name in SUBSECTION_NAMES:
        k = data.find(bytes((0x05, len(name))) + name.encode(), pos)
        if 0 <= k < best:
            best = k
    return best


_SCANOUT = [uint("resource_id", 4), uint("width", 4), uint("height", 4), {"name": "x", "type": "int32", "size": 4},
            {"name": "y", "type": "int32", "size": 4}, uint("cursor.resource_id", 4), uint("cursor.hot_x", 4),
            uint("cursor.hot_y", 4), uint("cursor.pos.x", 4), uint("cursor.pos.y", 4)]
# scanout_vmstate_after_v2 (QEMU 10.0 machine types; absent in 7.2): the framebuffer fields
_SCANOUT_V2 = [uint("fb.format", 4), buf("unused", 4), uint("fb.width", 4), uint("fb.height", 4),
               uint("fb.stride", 4), uint("fb.offset", 4)]


def virtio_gpu_layout(data: bytes) -> Desc:
    """The ``virtio-gpu`` field: ``hw/display/virtio-gpu.c`` ``virtio_gpu_save`` (QEMU 7.2 and 10.0):
    each 2D resource (id, size, format, backing pages, then its pixels: every virtio-gpu format
    is 32 bits per pixel, so width * 4 * height bytes), a zero terminator, then
    ``vmstate_virtio_gpu_scanouts`` (enable, max_outputs, one ``virtio-gpu-one-scanout`` per
    output; 40 bytes each, 64 with the framebuffer fields of newer machine types)."""
    p = Peek(data)
    fields: list[Desc] = []
    while p.be(4):
        cnt = p.be(4, 16)
        if cnt > 16384:
            raise ValueError("implausible iov_cnt")
        res = [uint("resource_id", 4), uint("width", 4), uint("height", 4), uint("format", 4), uint("iov_cnt", 4)]
        if cnt:
            res.append(arr(struct("iov", "backing page", [uint("addr", 8), uint("len", 4)]), cnt))
        pixels = p.be(4, 4) * 4 * p.be(4, 8)
        if pixels > p.left():
            raise ValueError("resource pixels past the end")
        res.append(buf("pixels", pixels))
        f = dict(struct("resource", "virtio-gpu resource", res), index=len(fields))
        fields.append(f)
        p.pos += f["size"]
    fields.append(uint("end", 4))
    p.pos += 4
    n = p.be(4, 4)
    rest = p.left() - 8
    if n == 0 or rest % n:
        raise ValueError("scanouts do not divide the rest")
    per = rest // n
    one = {40: _SCANOUT, 64: _SCANOUT + _SCANOUT_V2}.get(per)
    if one is None:
        raise ValueError(f"{per}-byte scanouts")
    fields += [{"name": "enable", "type": "int32", "size": 4}, uint("max_outputs", 4),
               arr(struct("scanout", "virtio-gpu-one-scanout", one), n)]
    return {"vmsd_name": "virtio-gpu", "version": 1, "fields": fields}
