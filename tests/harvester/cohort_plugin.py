"""A selection plug-in as a site would write one, used by the criteria tests."""

from __future__ import annotations

from collections.abc import Mapping


def select(level: str, attributes: Mapping[str, str]) -> bool:
    """Even-numbered patients, no studies described as 'scout', series above number 1."""
    if level == "PATIENT":
        return int(attributes["PatientID"][-1]) % 2 == 0
    if level == "STUDY":
        return "scout" not in attributes.get("StudyDescription", "").lower()
    return int(attributes.get("SeriesNumber") or 0) > 1


def broken(level: str, attributes: Mapping[str, str]) -> bool:
    """Fails the way a plug-in with a bug does."""
    raise KeyError("PatientAge")


def vague(level: str, attributes: Mapping[str, str]) -> object:
    """Answers something that is not a decision."""
    return "yes"
