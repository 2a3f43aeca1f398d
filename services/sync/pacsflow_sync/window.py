"""Which studies a cycle looks at: the C-FIND StudyDate range and the time window.

The PACS is asked for a range of study dates (default yesterday and today); of what it
returns, a study counts when its StudyDate + StudyTime lie within the window (default the
last 12 hours). DICOM dates and times carry no zone: they are read in the configured zone of
the PACS, or the machine's. A study without a usable StudyTime is in the window when any
part of its day is (``untimed_studies: include``), or never (``exclude``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = ["SearchWindow", "parse_study_date", "parse_study_time"]

# TM (PS3.5 6.2): HH, HHMM, HHMMSS, HHMMSS.F to .FFFFFF; the ACR-NEMA form HH:MM:SS too.
_TIME = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d{1,6}))?)?)?$")


def parse_study_date(value: str | None) -> date | None:
    """A DA value (``YYYYMMDD``, or the old ``YYYY.MM.DD``) as a date; None when unusable."""
    text = (value or "").strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def parse_study_time(value: str | None) -> time | None:
    """A TM value as a time; None when empty or unusable."""
    match = _TIME.match((value or "").strip())
    if match is None:
        return None
    hour, minute, second, fraction = match.groups()
    try:
        return time(
            int(hour),
            int(minute or 0),
            # 60 is a leap second in TM; a time cannot hold it.
            min(int(second or 0), 59),
            int((fraction or "0").ljust(6, "0")),
        )
    except ValueError:
        return None


@dataclass(frozen=True)
class SearchWindow:
    """The date range to ask for and the earliest study time that counts."""

    now: datetime
    first_date: date
    last_date: date
    #: None: every study of the date range counts
    start: datetime | None
    untimed: Literal["include", "exclude"] = "include"

    @classmethod
    def at(
        cls,
        epoch: float,
        *,
        date_range_days: int,
        window_hours: float | None,
        zone: str | None = None,
        untimed: Literal["include", "exclude"] = "include",
    ) -> SearchWindow:
        """The window ending at ``epoch`` (seconds), in the zone ``zone`` or the machine's."""
        tz: tzinfo | None = ZoneInfo(zone) if zone else None
        # Without a zone, naive local times on both sides of every comparison.
        now = datetime.fromtimestamp(epoch, tz)
        start = now - timedelta(hours=window_hours) if window_hours is not None else None
        last = now.date()
        return cls(now, last - timedelta(days=date_range_days - 1), last, start, untimed)

    @property
    def study_date_range(self) -> str:
        """The C-FIND range matching value for StudyDate (PS3.4 C.2.2.2.5)."""
        return f"{self.first_date:%Y%m%d}-{self.last_date:%Y%m%d}"

    def study_datetime(self, study_date: str | None, study_time: str | None) -> datetime | None:
        """When a study was made, in this window's zone; None without a usable date or time."""
        day = parse_study_date(study_date)
        moment = parse_study_time(study_time)
        if day is None or moment is None:
            return None
        return datetime.combine(day, moment, self.now.tzinfo)

    def contains(self, study_date: str | None, study_time: str | None) -> bool:
        """True when a study with these StudyDate and StudyTime values is in the window."""
        day = parse_study_date(study_date)
        # A PACS may match more loosely than asked; only the asked range counts.
        if day is None or not self.first_date <= day <= self.last_date:
            return False
        if self.start is None:
            return True
        when = self.study_datetime(study_date, study_time)
        if when is None:
            if self.untimed == "exclude":
                return False
            day_end = datetime.combine(day + timedelta(days=1), time(), self.now.tzinfo)
            return day_end > self.start
        return when >= self.start
