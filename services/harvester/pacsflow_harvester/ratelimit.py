"""One request budget for every worker of every harvester process: a pacer in the state store.

The budget is the generic cell rate algorithm (GCRA, a token bucket of depth one written as
one number): the row ``harvest_rate(name, tat)`` keeps the *theoretical arrival time*, the
earliest moment the next request may start. Taking a token is one atomic statement::

    UPDATE harvest_rate SET tat = max(tat, now) + interval WHERE name = $1 RETURNING tat

which reserves the slot ``tat - interval`` for the caller; the caller sleeps until its slot.
The update runs under PostgreSQL's row lock (SQLite's write lock), so two processes never get
the same slot, and each process only sleeps, without polling. On PostgreSQL ``now`` is the
database's clock, so hosts with skewed clocks still share one timeline; the caller sleeps the
difference the database reports, not until a wall-clock time of its own.

Why requests are spaced evenly (no bursts): for any window of ``W`` seconds, the number of
requests started in it is at most ``1 + W / interval``. A request reaches the PACS a little
after its slot (a thread starts, an association opens); if that delay varies by at most
``margin`` seconds, the PACS sees at most ``1 + (W + margin) / interval`` requests in any
``W``-second window. With ``interval = (60 + margin) / N`` that is at most ``N`` per minute,
measured at the PACS, which is what a PACS operator's limit means.

A slot that goes unused (the caller was cancelled, a pause window began) is simply lost:
the budget errs on the side of fewer requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacsflow.errors import StoreError
from pacsflow.store import Database

__all__ = ["RateLimiter", "Slot", "pacing_interval"]

_POSTGRES_TAKE = """
WITH clock AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS now)
UPDATE harvest_rate SET tat = GREATEST(harvest_rate.tat, clock.now) + $2
FROM clock WHERE harvest_rate.name = $1
RETURNING harvest_rate.tat AS tat, clock.now AS now
"""

_SQLITE_TAKE = "UPDATE harvest_rate SET tat = max(tat, $3) + $2 WHERE name = $1 RETURNING tat"


@dataclass(frozen=True, slots=True)
class Slot:
    """A reserved start time on the budget's clock, and that clock's time when reserved."""

    at: float
    now: float

    @property
    def delay(self) -> float:
        """Seconds to wait for the slot (0 when it is now or past)."""
        return max(0.0, self.at - self.now)


def pacing_interval(requests_per_minute: int, margin_seconds: float) -> float:
    """Seconds between request starts so that at most ``requests_per_minute`` reach the PACS
    in any 60 seconds, given start delays that vary by up to ``margin_seconds``.

    The bound is met with equality when one request comes as late as the margin allows and
    a later one with no delay at all: a part in 10^9 more keeps rounding from tipping it."""
    return (60.0 + margin_seconds) / requests_per_minute * (1.0 + 1e-9)


class RateLimiter:
    """Hands out request slots from the shared budget ``name`` in the state store."""

    def __init__(
        self,
        db: Database,
        requests_per_minute: int,
        *,
        margin_seconds: float = 1.0,
        name: str = "pacs",
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.db = db
        self.name = name
        self.interval = pacing_interval(requests_per_minute, margin_seconds)
        self.clock = clock
        self._sleep = sleep
        self._ready = False
        #: total seconds callers of this process spent waiting for their slots
        self.waited = 0.0

    async def _ensure_row(self) -> None:
        if not self._ready:
            await self.db.execute(
                "INSERT INTO harvest_rate (name, tat) VALUES ($1, 0) ON CONFLICT DO NOTHING",
                self.name,
            )
            self._ready = True

    async def reserve(self) -> Slot:
        """Take the next slot of the budget."""
        for _ in range(2):
            await self._ensure_row()
            if self.db.dialect == "postgres":
                row = await self.db.fetchrow(_POSTGRES_TAKE, self.name, self.interval)
                taken = None if row is None else (float(row["now"]), float(row["tat"]))
            else:
                now = self.clock()
                value = await self.db.fetchval(_SQLITE_TAKE, self.name, self.interval, now)
                taken = None if value is None else (now, float(value))
            if taken is not None:
                now, tat = taken
                # The slot reserved is the start of the interval just added.
                return Slot(at=tat - self.interval, now=now)
            # The row went away (a reset of the harvest): create it again.
            self._ready = False
        raise StoreError("the rate budget row cannot be created")

    async def acquire(self) -> float:
        """Wait for the next slot of the budget; returns the seconds waited."""
        delay = (await self.reserve()).delay
        if delay > 0:
            self.waited += delay
            result = self._sleep(delay)
            if asyncio.iscoroutine(result):
                await result
        return delay
