"""Daily time windows: when the harvester may start requests.

Two kinds, both in the local time of one zone: *pause* windows in which no new request starts
(``02:55-03:10`` around a link's known daily reset) and *work* windows outside of which none
starts (``20:00-06:00``: nights only). A window is ``[start, end)`` and may cross midnight;
``24:00`` ends one at midnight. Requests already running are not interrupted: a window only
gates starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo

__all__ = ["Schedule", "Window"]

# Sleep at most this long before looking at the clock again (clock changes, DST).
_MAX_SLEEP = 60.0


@dataclass(frozen=True, slots=True)
class Window:
    """One daily window, ``[start, end)`` in minutes after local midnight (end up to 1440)."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        """``HH:MM-HH:MM``, as validated by the configuration."""
        first, second = (part.strip() for part in text.split("-"))
        return cls(_minutes(first), _minutes(second))

    def contains(self, moment: time) -> bool:
        """True when the local wall time ``moment`` falls inside the window."""
        minute = moment.hour * 60 + moment.minute + moment.second / 60
        if self.start < self.end:
            return self.start <= minute < self.end
        # Crosses midnight: the evening part and the morning part.
        return minute >= self.start or minute < self.end

    def boundaries(self) -> tuple[int, int]:
        """Start and end, minutes after midnight (an end of 1440 is the next midnight)."""
        return self.start, self.end % 1440


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


class Schedule:
    """Pause and work windows of one zone; open means a new request may start now."""

    def __init__(
        self,
        pause: Sequence[str] = (),
        work: Sequence[str] = (),
        zone: str | None = None,
        *,
        clock: Callable[[], float] | None = None,
        max_sleep: float = _MAX_SLEEP,
    ) -> None:
        self.pause = [Window.parse(text) for text in pause]
        self.work = [Window.parse(text) for text in work]
        self.zone: tzinfo | None = ZoneInfo(zone) if zone else None
        self._clock = clock
        self.max_sleep = max_sleep

    @property
    def always_open(self) -> bool:
        """True when no window restricts anything."""
        return not self.pause and not self.work

    def _now(self) -> datetime:
        if self._clock is not None:
            return datetime.fromtimestamp(self._clock(), UTC)
        return datetime.now(UTC)

    def _local(self, moment: datetime) -> datetime:
        return moment.astimezone(self.zone) if self.zone else moment.astimezone()

    def is_open(self, moment: datetime | None = None) -> bool:
        """True when a request may start at ``moment`` (default: now)."""
        if self.always_open:
            return True
        wall = self._local(moment or self._now()).timetz().replace(tzinfo=None)
        if self.work and not any(window.contains(wall) for window in self.work):
            return False
        return not any(window.contains(wall) for window in self.pause)

    def next_open(self, moment: datetime | None = None) -> datetime:
        """The first moment at or after ``moment`` (default: now) when the schedule is open."""
        moment = moment or self._now()
        if self.is_open(moment):
            return moment
        local = self._local(moment)
        zone = local.tzinfo
        candidates: list[datetime] = []
        for day in range(-1, 3):
            date = (local + timedelta(days=day)).date()
            for window in (*self.pause, *self.work):
                for minute in window.boundaries():
                    wall = datetime.combine(date, time(minute // 60, minute % 60), tzinfo=zone)
                    # Through UTC: a wall time in a DST gap or fold becomes one real instant.
                    instant = wall.astimezone(UTC)
                    if instant > moment:
                        candidates.append(instant)
        for candidate in sorted(set(candidates)):
            if self.is_open(candidate):
                return candidate
        # Only when pause windows cover the whole day: nothing will ever open.
        raise ValueError("the pause windows leave no time to work")

    def seconds_until_open(self) -> float:
        """0 when open now, else how long until the schedule opens."""
        now = self._now()
        if self.is_open(now):
            return 0.0
        return max(0.0, (self.next_open(now) - now).total_seconds())

    async def wait_open(self, on_wait: Callable[[bool], None] | None = None) -> None:
        """Return once the schedule is open; ``on_wait(True/False)`` marks waiting."""
        waited = False
        while True:
            delay = self.seconds_until_open()
            if delay <= 0:
                break
            if not waited and on_wait is not None:
                on_wait(True)
            waited = True
            await asyncio.sleep(min(delay, self.max_sleep))
        if waited and on_wait is not None:
            on_wait(False)
