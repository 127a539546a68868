"""Live migration at the edge: URIs and channels, the return path (responder and reader), rate
limiting, the push parser, and the ``record``, ``tap`` and ``send`` sessions."""
