"""Selection criteria: which patients, studies and series a harvest takes.

Built once from :class:`pacsflow.config.HarvestCriteria`. The PACS is asked to narrow its
answers where DICOM matching can (one study date range, a PatientID wildcard), and every
answer is checked here again: a PACS may ignore a matching key it does not support.

A plug-in is ``module:function``, called as ``function(level, attributes)`` for every
``"PATIENT"``, ``"STUDY"`` and ``"SERIES"`` found, with the C-FIND answer as keyword -> text;
it returns True to take it. An exception in it fails that query (retried, then reported),
it never silently drops or takes anything.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pacsflow.config import HarvestCriteria
from pacsflow.errors import ConfigError, PacsflowError

__all__ = ["Criteria", "PluginError", "attributes", "load_plugin"]

Plugin = Callable[[str, Mapping[str, str]], Any]


class PluginError(PacsflowError):
    """The selection plug-in raised or answered something that is not a bool."""


def load_plugin(reference: str) -> Plugin:
    """The function named ``module:function``; ConfigError when it cannot be imported."""
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"harvester.criteria.plugin: cannot import {module_name}: {err}") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(
            f"harvester.criteria.plugin: {module_name} has no function {function_name!r}"
        )
    return function  # type: ignore[no-any-return]


def read_cohort_file(path: Path) -> list[str]:
    """PatientIDs from a file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(
            f"harvester.criteria.patient_ids_file: cannot read {path}: {err.strerror}"
        ) from err
    ids = []
    for line in text.splitlines():
        value = line.split("#", 1)[0].strip()
        if value:
            ids.append(value)
    return ids


def attributes(dataset: Any) -> dict[str, str]:
    """A C-FIND answer as keyword -> text (multiple values joined by a backslash)."""
    values: dict[str, str] = {}
    for element in dataset:
        keyword = element.keyword
        if not keyword or element.VR == "SQ":
            continue
        value = element.value
        if value is None:
            text = ""
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(item) for item in value)
        else:
            text = str(value)
        values[keyword] = text.strip(" \x00")
    return values


def _date_range(text: str) -> tuple[str, str]:
    if "-" not in text:
        return text, text
    low, _, high = text.partition("-")
    return low or "00000000", high or "99999999"


class Criteria:
    """Decides, level by level, what the harvest takes."""

    def __init__(self, settings: HarvestCriteria, plugin: Plugin | None = None) -> None:
        self.settings = settings
        self.pattern = (
            re.compile(settings.patient_id_pattern) if settings.patient_id_pattern else None
        )
        self.ranges = [_date_range(text) for text in settings.study_dates]
        self.modalities = frozenset(settings.modalities)
        self.plugin = plugin

    @classmethod
    def from_settings(cls, settings: HarvestCriteria) -> Criteria:
        """Criteria with the plug-in imported (ConfigError when it cannot be)."""
        plugin = load_plugin(settings.plugin) if settings.plugin else None
        return cls(settings, plugin)

    # --- what to ask the PACS ------------------------------------------------------------

    def cohort(self) -> list[str] | None:
        """The listed PatientIDs, in order and without repeats; None: find them by query."""
        if not self.settings.explicit_cohort:
            return None
        ids = list(self.settings.patient_ids)
        if self.settings.patient_ids_file is not None:
            ids.extend(read_cohort_file(self.settings.patient_ids_file))
        return list(dict.fromkeys(value.strip() for value in ids if value.strip()))

    def study_date_query(self) -> str:
        """The StudyDate matching key: the range when there is exactly one, else universal."""
        return self.settings.study_dates[0] if len(self.settings.study_dates) == 1 else ""

    def discovery_date_queries(self) -> list[str]:
        """One StudyDate key per STUDY-level discovery query."""
        return list(self.settings.study_dates) or [""]

    # --- checking the answers -------------------------------------------------------------

    def _ask_plugin(self, level: str, values: Mapping[str, str]) -> bool:
        if self.plugin is None:
            return True
        try:
            answer = self.plugin(level, dict(values))
        except Exception as err:
            # Whatever the plug-in raises, the query fails visibly rather than guessing.
            raise PluginError(f"the selection plug-in failed on a {level}: {err!r}") from err
        if not isinstance(answer, bool):
            raise PluginError(
                f"the selection plug-in answered {answer!r} for a {level}; it must be True or False"
            )
        return answer

    def patient(self, values: Mapping[str, str]) -> bool:
        """True when the patient is taken (PatientID pattern, plug-in)."""
        patient_id = values.get("PatientID", "")
        if not patient_id:
            return False
        if self.pattern is not None and not self.pattern.fullmatch(patient_id):
            return False
        return self._ask_plugin("PATIENT", values)

    def study_date_ok(self, date: str) -> bool:
        """True when ``date`` (YYYYMMDD) is in one of the ranges, or no range is set."""
        if not self.ranges:
            return True
        date = date.strip()[:8]
        return bool(date) and any(low <= date <= high for low, high in self.ranges)

    def study(self, values: Mapping[str, str]) -> bool:
        """True when the study is taken (date ranges, modalities in study, plug-in)."""
        if not self.study_date_ok(values.get("StudyDate", "")):
            return False
        if self.modalities:
            in_study = _split(values.get("ModalitiesInStudy", ""))
            # A PACS that does not return ModalitiesInStudy leaves it to the series level.
            if in_study and not in_study & self.modalities:
                return False
        return self._ask_plugin("STUDY", values)

    def series(self, values: Mapping[str, str]) -> bool:
        """True when the series is taken (modality, plug-in)."""
        if self.modalities and values.get("Modality", "").strip().upper() not in self.modalities:
            return False
        return self._ask_plugin("SERIES", values)

    def patients_of_studies(self, answers: Iterable[Mapping[str, str]]) -> list[str]:
        """PatientIDs of STUDY-level discovery answers whose study and patient are taken."""
        found: dict[str, None] = {}
        for values in answers:
            patient_id = values.get("PatientID", "")
            if (
                patient_id
                and patient_id not in found
                and self.study_date_ok(values.get("StudyDate", ""))
                and self.patient(values)
            ):
                found[patient_id] = None
        return list(found)


def _split(text: str) -> frozenset[str]:
    return frozenset(part.strip().upper() for part in text.split("\\") if part.strip())
