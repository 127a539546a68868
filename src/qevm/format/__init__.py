"""The migration stream itself, sans I/O: record and flag enums, the lossless event model, the
parser (record grammar and section lifecycles as tables), special live sections, XBZRLE, RAM
images, return-path messages.  Imports ``qevm.codec`` (to size device sections) and below."""
