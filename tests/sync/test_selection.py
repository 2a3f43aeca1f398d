"""Series selection modes: smallest, max-images, all."""

from __future__ import annotations

import pytest

from pacsflow_sync.selection import SeriesInfo, choose_series


def series(uid: str, images: int, number: int | None = None) -> SeriesInfo:
    return SeriesInfo("1.2.3", uid, images, number)


STUDY = [series("1.9", 8, 3), series("1.7", 3, 1), series("1.8", 5, 2), series("1.6", 0, 4)]


def uids(chosen: list[SeriesInfo]) -> list[str]:
    return [item.series_instance_uid for item in chosen]


class TestChooseSeries:
    def test_smallest_is_the_series_with_fewest_images(self) -> None:
        assert uids(choose_series(STUDY, "smallest")) == ["1.7"]

    def test_smallest_breaks_ties_by_series_number_then_uid(self) -> None:
        tied = [series("1.5", 2, 7), series("1.4", 2, 3), series("1.3", 2, None)]
        assert uids(choose_series(tied, "smallest")) == ["1.4"]
        assert uids(choose_series([series("1.5", 2), series("1.4", 2)], "smallest")) == ["1.4"]

    def test_max_images_takes_series_with_fewer_images(self) -> None:
        assert uids(choose_series(STUDY, "max-images", 6)) == ["1.7", "1.8"]
        assert uids(choose_series(STUDY, "max-images", 5)) == ["1.7"]
        assert choose_series(STUDY, "max-images", 3) == []

    def test_all_takes_every_series_in_series_number_order(self) -> None:
        assert uids(choose_series(STUDY, "all")) == ["1.7", "1.8", "1.9"]

    def test_series_without_images_are_never_chosen(self) -> None:
        empty = [series("1.1", 0)]
        for mode in ("smallest", "all"):
            assert choose_series(empty, mode) == []  # type: ignore[arg-type]
        assert choose_series(empty, "max-images", 10) == []

    def test_max_images_needs_its_limit(self) -> None:
        with pytest.raises(ValueError, match="max_images"):
            choose_series(STUDY, "max-images")
