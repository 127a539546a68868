"""The one rate limiter of migration senders (the engine's ``max-bandwidth``, ``qevm send
--max-bandwidth``): a token bucket."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["RateLimiter", "UNLIMITED"]

#: at or above this many bytes per second (or at 0) nothing is limited
UNLIMITED = 1 << 62


class RateLimiter:
    """At most ``rate`` bytes per second on average; up to ``burst`` bytes of credit saved up while
    the sender is idle (default: one ``window`` of traffic, 100 ms like QEMU's BUFFER_DELAY, but at
    least 4 KiB).  ``initial``: the credit at the start (default: one burst; 0 makes the first bytes
    wait their turn, so that a run's average holds from its start).  ``rate`` <= 0 or >= ``UNLIMITED``:
    no limit.  ``clock``/``sleep`` are injectable for tests."""

    def __init__(self, rate: float, burst: int | None = None, *, window: float = 0.1, initial: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.window = window
        self.fixed_burst = burst
        self.clock = clock
        self.sleep = sleep
        self.rate = 0.0
        self.burst = 0
        self.tokens = 0.0
        self.last = clock()
        self.set_rate(rate)
        self.tokens = float(self.burst) if initial is None else min(float(initial), float(self.burst))

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0 or self.rate >= UNLIMITED

    def set_rate(self, rate: float) -> None:
        """Change the rate from now on (saved credit is kept up to the new burst)."""
        self.rate = float(rate)
        if self.fixed_burst is not None:
            self.burst = self.fixed_burst
        else:
            self.burst = 1 << 20 if self.unlimited else int(max(4096, self.rate * self.window))
        self.tokens = min(self.tokens, float(self.burst))

    def take(self, n: int, abort: threading.Event | None = None) -> bool:
        """Account ``n`` bytes and wait until they may go (``n`` <= ``burst`` keeps the output
        smooth).  Returns False, early, when ``abort`` is set while waiting."""
        if self.unlimited:
            return not (abort is not None and abort.is_set())
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        if self.tokens >= 0:
            return True
        wait = -self.tokens / self.rate
        if abort is not None:
            return not abort.wait(wait)
        self.sleep(wait)
        return True
