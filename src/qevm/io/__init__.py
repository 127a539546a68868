"""The edge where bytes come from and go to: files, pipes, decompression, qcow2 internal snapshots,
libvirt save images; driving the parser over an input (``reader``) and writing streams back
(``writer``: rewrite, edit)."""
