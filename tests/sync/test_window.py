"""The search window: StudyDate range, StudyTime parsing, which studies count."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import pytest

from pacsflow_sync.window import SearchWindow, parse_study_date, parse_study_time

# 2024-03-10 09:30 in Zurich (UTC+1): a window of 12 h reaches back to 2024-03-09 21:30.
NOW = datetime(2024, 3, 10, 8, 30, tzinfo=UTC).timestamp()


def window(**changes: object) -> SearchWindow:
    options: dict[str, object] = {"date_range_days": 2, "window_hours": 12.0,
                                  "zone": "Europe/Zurich"}  # fmt: skip
    options.update(changes)
    return SearchWindow.at(NOW, **options)  # type: ignore[arg-type]


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("20240310", date(2024, 3, 10)),
            ("2024.03.10", date(2024, 3, 10)),
            (" 20240310 ", date(2024, 3, 10)),
            ("", None),
            (None, None),
            ("20241310", None),
            ("2024031", None),
            ("yesterday", None),
        ],
    )
    def test_study_date(self, text: str | None, expected: date | None) -> None:
        assert parse_study_date(text) == expected

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("09", time(9)),
            ("0930", time(9, 30)),
            ("093015", time(9, 30, 15)),
            ("093015.5", time(9, 30, 15, 500000)),
            ("093015.123456", time(9, 30, 15, 123456)),
            ("09:30:15", time(9, 30, 15)),
            ("235960", time(23, 59, 59)),
            ("", None),
            (None, None),
            ("2500", None),
            ("9:30", None),
            ("093015.1234567", None),
        ],
    )
    def test_study_time(self, text: str | None, expected: time | None) -> None:
        assert parse_study_time(text) == expected


class TestWindow:
    def test_default_range_is_yesterday_and_today(self) -> None:
        assert window().study_date_range == "20240309-20240310"

    def test_range_of_one_day_and_of_a_week(self) -> None:
        assert window(date_range_days=1).study_date_range == "20240310-20240310"
        assert window(date_range_days=7).study_date_range == "20240304-20240310"

    def test_studies_of_the_last_12_hours_count(self) -> None:
        w = window()
        assert w.contains("20240310", "0900")
        assert w.contains("20240309", "2130")
        assert w.contains("20240309", "213000.5")

    def test_a_13_hour_old_study_does_not(self) -> None:
        assert not window().contains("20240309", "2030")

    def test_a_study_dated_in_the_future_counts(self) -> None:
        # A modality's clock running ahead must not hide its studies.
        assert window().contains("20240310", "1200")

    def test_dates_outside_the_range_never_count(self) -> None:
        w = window(window_hours=None)
        assert w.contains("20240309", "0000")
        assert not w.contains("20240308", "2359")
        assert not w.contains("20240311", "0000")
        assert not w.contains("", "1000")

    def test_without_a_window_every_study_of_the_range_counts(self) -> None:
        w = window(window_hours=None)
        assert w.start is None
        assert w.contains("20240309", "0100") and w.contains("20240310", None)

    def test_untimed_study_counts_when_its_day_reaches_into_the_window(self) -> None:
        w = window()
        assert w.contains("20240310", "")
        assert w.contains("20240309", None)  # its day ends after 21:30
        assert window(window_hours=2).contains("20240310", "")
        assert not window(window_hours=2).contains("20240309", "")

    def test_untimed_studies_can_be_excluded(self) -> None:
        w = window(untimed="exclude")
        assert not w.contains("20240310", "")
        assert not w.contains("20240310", "not a time")
        assert w.contains("20240310", "0900")

    def test_zone_decides_the_date(self) -> None:
        # 23:30 UTC on 2024-03-09 is already 2024-03-10 in Seoul.
        epoch = datetime(2024, 3, 9, 23, 30, tzinfo=UTC).timestamp()
        seoul = SearchWindow.at(epoch, date_range_days=1, window_hours=1, zone="Asia/Seoul")
        utc = SearchWindow.at(epoch, date_range_days=1, window_hours=1, zone="UTC")
        assert seoul.study_date_range == "20240310-20240310"
        assert utc.study_date_range == "20240309-20240309"
        assert seoul.contains("20240310", "0815") and not seoul.contains("20240310", "0715")

    def test_machine_zone_when_none_is_configured(self) -> None:
        now = datetime.now().timestamp()
        w = SearchWindow.at(now, date_range_days=2, window_hours=1)
        moment = datetime.fromtimestamp(now - 1800)
        assert w.contains(f"{moment:%Y%m%d}", f"{moment:%H%M%S}")
        earlier = datetime.fromtimestamp(now - 7200)
        assert not w.contains(f"{earlier:%Y%m%d}", f"{earlier:%H%M%S}")
