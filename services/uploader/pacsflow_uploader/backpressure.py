"""Back-pressure: when to stop taking new work.

* :class:`LoadGate`: the whole uploader pauses while the 1-minute load average per core is
  above ``max_load_per_core`` (a busy NAS must keep serving its users first).
* :class:`Breaker`: one destination pauses after an association failure (refused, rejected,
  unreachable), for a delay that doubles with each further failure; other destinations go on.
* :func:`backoff`: the wait before the next attempt at one file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable

from prometheus_client import Gauge

__all__ = ["Breaker", "LoadGate", "backoff", "load_per_core"]

log = logging.getLogger(__name__)


def load_per_core() -> float:
    """The 1-minute load average divided by the number of cores."""
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def backoff(failures: int, initial: float, maximum: float) -> float:
    """``initial`` doubled per earlier failure, at most ``maximum``, with +-10 % jitter."""
    delay = min(maximum, initial * 2.0 ** max(0, failures - 1))
    # Jitter spreads the retries of a batch that failed together.
    return delay * random.uniform(0.9, 1.1)


class LoadGate:
    """Waits while the machine is too busy; logs once when pausing and once when resuming."""

    def __init__(
        self,
        threshold: float,
        gauge: Gauge,
        *,
        load: Callable[[], float] = load_per_core,
        check_interval: float = 5.0,
    ) -> None:
        self.threshold = threshold
        self._gauge = gauge
        self._load = load
        self._check_interval = check_interval
        self.paused = False

    async def wait(self, stop: asyncio.Event | None = None) -> None:
        """Return when the load per core is at or below the threshold (or ``stop`` is set)."""
        while stop is None or not stop.is_set():
            load = self._load()
            if load <= self.threshold:
                if self.paused:
                    self.paused = False
                    self._gauge.set(0)
                    log.info("load per core %.2f: taking new work again", load)
                return
            if not self.paused:
                self.paused = True
                self._gauge.set(1)
                log.warning(
                    "load per core %.2f is above %.2f: pausing new work", load, self.threshold
                )
            if stop is None:
                await asyncio.sleep(self._check_interval)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._check_interval):
                        await stop.wait()


class Breaker:
    """Circuit breaker of one destination: open (paused) after association failures."""

    def __init__(
        self,
        initial: float,
        maximum: float,
        gauge: Gauge,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self._gauge = gauge
        self._clock = clock
        self.failures = 0
        self.open_until = 0.0

    def failure(self) -> float:
        """Record an association failure; the number of seconds the destination now rests."""
        self.failures += 1
        delay = backoff(self.failures, self.initial, self.maximum)
        self.open_until = self._clock() + delay
        self._gauge.set(1)
        return delay

    def success(self) -> None:
        """The destination answered: close the breaker."""
        if self.failures:
            log.info("destination answers again after %d failed association(s)", self.failures)
        self.failures = 0
        self.open_until = 0.0
        self._gauge.set(0)

    def remaining(self) -> float:
        """Seconds until the destination may be tried again (0: now)."""
        return max(0.0, self.open_until - self._clock())
