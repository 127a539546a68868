"""Bytes <-> values: wire primitives, the vmstate type registry, the vmdesc-driven section codec,
schemas (where device descriptions come from) and field paths.  Imports only ``qevm.errors``."""
