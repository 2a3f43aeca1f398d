"""Pause and work windows: when a new request may start."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, time

import pytest
from pacsflow.config import load_settings
from pacsflow.errors import ConfigError
from pacsflow_harvester.windows import Schedule, Window


def utc(hour: int, minute: int = 0, day: int = 5, month: int = 3) -> datetime:
    return datetime(2024, month, day, hour, minute, tzinfo=UTC)


class TestWindow:
    def test_a_window_includes_its_start_and_excludes_its_end(self) -> None:
        window = Window.parse("02:55-03:10")
        assert not window.contains(time(2, 54, 59))
        assert window.contains(time(2, 55))
        assert window.contains(time(3, 9, 59))
        assert not window.contains(time(3, 10))

    def test_a_window_may_cross_midnight(self) -> None:
        night = Window.parse("20:00-06:00")
        assert night.contains(time(23, 59))
        assert night.contains(time(0, 0))
        assert night.contains(time(5, 59))
        assert not night.contains(time(6, 0))
        assert not night.contains(time(12, 0))

    def test_24_00_ends_a_window_at_midnight(self) -> None:
        evening = Window.parse("20:00-24:00")
        assert evening.contains(time(23, 59, 59))
        assert not evening.contains(time(0, 0))


class TestSchedule:
    def test_without_windows_it_is_always_open(self) -> None:
        assert Schedule().is_open(utc(3))
        assert Schedule().next_open(utc(3)) == utc(3)

    def test_a_pause_window_closes_and_reopens_at_its_end(self) -> None:
        schedule = Schedule(["02:55-03:10"], zone="UTC")
        assert schedule.is_open(utc(2, 54))
        assert not schedule.is_open(utc(2, 55))
        assert schedule.next_open(utc(2, 56)) == utc(3, 10)

    def test_work_windows_open_only_inside_them(self) -> None:
        schedule = Schedule(work=["20:00-06:00"], zone="UTC")
        assert not schedule.is_open(utc(12))
        assert schedule.next_open(utc(12)) == utc(20)
        assert schedule.is_open(utc(23))

    def test_a_pause_inside_the_work_window_wins(self) -> None:
        schedule = Schedule(["02:55-03:10"], ["20:00-06:00"], zone="UTC")
        assert schedule.is_open(utc(2, 54))
        assert not schedule.is_open(utc(3))
        assert schedule.next_open(utc(3)) == utc(3, 10)
        # At 06:00 the work window ends: the next start is the evening.
        assert schedule.next_open(utc(6)) == utc(20)

    def test_windows_are_local_time_of_the_zone(self) -> None:
        # Europe/Zurich is UTC+1 in March before the DST change on the 31st.
        schedule = Schedule(["02:55-03:10"], zone="Europe/Zurich")
        assert not schedule.is_open(utc(1, 56))
        assert schedule.is_open(utc(2, 56))
        assert schedule.next_open(utc(1, 56)) == utc(2, 10)

    def test_a_pause_across_the_dst_change_ends_at_the_real_instant(self) -> None:
        # 2024-03-31 in Zurich: 02:00 local jumps to 03:00; 03:10 local is 01:10 UTC.
        schedule = Schedule(["01:30-03:10"], zone="Europe/Zurich")
        assert not schedule.is_open(utc(0, 45, day=31))
        assert schedule.next_open(utc(0, 45, day=31)) == utc(1, 10, day=31)

    def test_pauses_covering_the_day_never_open(self) -> None:
        with pytest.raises(ValueError, match="no time"):
            Schedule(["00:00-12:00", "12:00-24:00"], zone="UTC").next_open(utc(3))

    async def test_waiting_reports_the_pause_and_its_end(self) -> None:
        now = [utc(2, 59).timestamp()]
        marks: list[bool] = []
        schedule = Schedule(["02:55-03:00"], zone="UTC", clock=lambda: now[0], max_sleep=0.01)
        waiter = asyncio.create_task(schedule.wait_open(marks.append))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        now[0] = utc(3).timestamp()
        await asyncio.wait_for(waiter, 2)
        assert marks == [True, False]


class TestSettings:
    def test_bad_windows_name_the_key(self) -> None:
        with pytest.raises(ConfigError) as caught:
            load_settings(None, harvester={"pause_windows": ["2:55-03:10"],
                                           "work_windows": ["10:00-10:00"]})  # fmt: skip
        assert "harvester.pause_windows.0" in str(caught.value)
        assert "harvester.work_windows.0" in str(caught.value)

    def test_an_unknown_zone_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="harvester.timezone"):
            load_settings(None, harvester={"timezone": "Mars/Olympus"})
