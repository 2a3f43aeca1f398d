"""Which series of a study a cycle asks to move: the selection modes.

* ``smallest``: the one series with the fewest images (ties: the lowest series number, then
  the UID), enough to make the study appear in the local PACS;
* ``max-images``: every series with fewer than ``max_images`` images;
* ``all``: every series.

A series that reports no images is never chosen: moving it would move nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Selection", "SeriesInfo", "choose_series"]

Selection = Literal["smallest", "max-images", "all"]


@dataclass(frozen=True)
class SeriesInfo:
    """One series as a PACS describes it."""

    study_instance_uid: str
    series_instance_uid: str
    images: int
    series_number: int | None = None
    modality: str = ""


def _order(series: SeriesInfo) -> tuple[int, int, str]:
    number = series.series_number if series.series_number is not None else 2**31
    return (series.images, number, series.series_instance_uid)


def choose_series(
    series: Sequence[SeriesInfo], selection: Selection, max_images: int | None = None
) -> list[SeriesInfo]:
    """The series of one study to move, by series number."""
    candidates = [item for item in series if item.images > 0]
    if selection == "smallest":
        chosen = [min(candidates, key=_order)] if candidates else []
    elif selection == "max-images":
        if max_images is None:
            raise ValueError("selection max-images needs max_images")
        chosen = [item for item in candidates if item.images < max_images]
    elif selection == "all":
        chosen = candidates
    else:
        raise ValueError(f"unknown selection {selection!r}")
    return sorted(chosen, key=lambda item: (_order(item)[1], item.series_instance_uid))
