"""Live migration at the edge, one of each piece, shared by ``record``/``tap``/``send`` and the engine:

``channels``    URIs as QEMU spells them and the byte channels behind them (every ``-incoming`` and
                ``migrate`` scheme; ``getfd`` names)
``returnpath``  the destination's responder (PONG, SHUT) and the source's reader
``ratelimit``   the token bucket behind ``max-bandwidth`` / ``--max-bandwidth``
``pushparser``  the sans-I/O parser fed in place as bytes arrive (``StreamMonitor``: with the summary)
``session``     progress snapshot, rate, read size
``record``, ``tap``, ``send``  the three live verbs
"""
