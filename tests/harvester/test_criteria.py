"""Selection criteria: PatientID pattern, cohort lists, date ranges, modalities, plug-ins."""

from __future__ import annotations

from pathlib import Path

import pytest
from pacsflow.config import HarvestCriteria, load_settings
from pacsflow.errors import ConfigError
from pacsflow_harvester.criteria import Criteria, PluginError, attributes
from pacsflow_harvester.discovery import criteria_digest
from pydicom.dataset import Dataset


def criteria(**values: object) -> Criteria:
    return Criteria.from_settings(HarvestCriteria.model_validate(values))


class TestPatients:
    def test_the_pattern_must_match_the_whole_patient_id(self) -> None:
        selected = criteria(patient_id_pattern="PAT00[135]")
        assert selected.patient({"PatientID": "PAT003"})
        assert not selected.patient({"PatientID": "PAT002"})
        assert not selected.patient({"PatientID": "PAT0031"})
        assert not selected.patient({"PatientID": ""})

    def test_a_cohort_comes_from_the_list_and_the_file(self, tmp_path: Path) -> None:
        listing = tmp_path / "cohort.txt"
        listing.write_text("# research cohort\nP2\n\n  P3  # second visit\nP1\n")
        selected = criteria(patient_ids=["P1", "P4"], patient_ids_file=str(listing))
        assert selected.cohort() == ["P1", "P4", "P2", "P3"]
        assert criteria(patient_id_pattern=".*").cohort() is None

    def test_a_missing_cohort_file_is_a_configuration_error(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="patient_ids_file"):
            criteria(patient_ids_file=str(tmp_path / "absent.txt")).cohort()

    def test_study_discovery_takes_patients_with_a_study_in_range(self) -> None:
        selected = criteria(study_dates=["20230101-20231231"], patient_id_pattern="A.*")
        answers = [
            {"PatientID": "A1", "StudyDate": "20221231"},
            {"PatientID": "A2", "StudyDate": "20230601"},
            {"PatientID": "B3", "StudyDate": "20230601"},
            {"PatientID": "A2", "StudyDate": "20230701"},
        ]
        assert selected.patients_of_studies(answers) == ["A2"]


class TestStudiesAndSeries:
    def test_dates_match_any_range_and_open_ends(self) -> None:
        selected = criteria(study_dates=["-20191231", "20210101-20210131", "20230101-"])
        assert selected.study_date_ok("20190105")
        assert selected.study_date_ok("20210131")
        assert not selected.study_date_ok("20200601")
        assert selected.study_date_ok("20991231")
        assert not selected.study_date_ok("")
        # Several ranges: the PACS is asked for every date and the ranges are applied here.
        assert selected.study_date_query() == ""
        assert criteria(study_dates=["20210101-"]).study_date_query() == "20210101-"

    def test_modalities_filter_studies_and_series(self) -> None:
        selected = criteria(modalities=["ct", " MR "])
        assert selected.study({"ModalitiesInStudy": "CT\\SR"})
        assert not selected.study({"ModalitiesInStudy": "US\\SR"})
        # A PACS that does not say which modalities a study has leaves it to the series.
        assert selected.study({"ModalitiesInStudy": ""})
        assert selected.series({"Modality": "MR"})
        assert not selected.series({"Modality": "SR"})

    def test_the_answers_of_a_find_become_text(self) -> None:
        ds = Dataset()
        ds.PatientID = "P1 "
        ds.ModalitiesInStudy = ["CT", "MR"]
        ds.NumberOfStudyRelatedInstances = 12
        assert attributes(ds) == {
            "PatientID": "P1",
            "ModalitiesInStudy": "CT\\MR",
            "NumberOfStudyRelatedInstances": "12",
        }


class TestPlugin:
    def test_the_plugin_decides_at_every_level(self) -> None:
        selected = criteria(plugin="tests.harvester.cohort_plugin:select")
        assert selected.patient({"PatientID": "PAT002"})
        assert not selected.patient({"PatientID": "PAT003"})
        assert not selected.study({"StudyDescription": "Scout views"})
        assert selected.series({"SeriesNumber": "2"})
        assert not selected.series({"SeriesNumber": "1"})

    def test_a_failing_plugin_fails_the_query_instead_of_guessing(self) -> None:
        with pytest.raises(PluginError, match="PatientAge"):
            criteria(plugin="tests.harvester.cohort_plugin:broken").patient({"PatientID": "P"})
        with pytest.raises(PluginError, match="True or False"):
            criteria(plugin="tests.harvester.cohort_plugin:vague").series({"Modality": "CT"})

    def test_a_plugin_that_cannot_be_imported_is_a_configuration_error(self) -> None:
        with pytest.raises(ConfigError, match="cannot import"):
            criteria(plugin="tests.harvester.no_such_module:select")
        with pytest.raises(ConfigError, match="has no function"):
            criteria(plugin="tests.harvester.cohort_plugin:absent")


class TestSettings:
    def test_a_source_without_criteria_must_say_select_all(self) -> None:
        nodes = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                 "router": {"ae_title": "PACSFLOW", "host": "127.0.0.1", "port": 11112}}
        with pytest.raises(ConfigError, match="select_all"):
            load_settings(None, nodes=nodes, harvester={"source": "pacs"})
        settings = load_settings(None, nodes=nodes, harvester={
            "source": "pacs", "criteria": {"select_all": True}})
        assert settings.harvester.criteria.select_all

    def test_the_source_must_be_a_known_node(self) -> None:
        with pytest.raises(ConfigError, match="harvester.source names 'pacs'"):
            load_settings(None, harvester={"source": "pacs", "criteria": {"select_all": True}})

    def test_bad_criteria_name_their_key(self) -> None:
        with pytest.raises(ConfigError) as caught:
            load_settings(None, harvester={"criteria": {
                "patient_id_pattern": "(", "study_dates": ["20230101-2023"],
                "plugin": "no colon"}})  # fmt: skip
        message = str(caught.value)
        assert "harvester.criteria.patient_id_pattern" in message
        assert "harvester.criteria.study_dates.0" in message
        assert "harvester.criteria.plugin" in message

    def test_a_changed_cohort_file_changes_the_digest(self, tmp_path: Path) -> None:
        listing = tmp_path / "cohort.txt"
        listing.write_text("P1\n")
        settings = HarvestCriteria(patient_ids_file=listing)
        before = criteria_digest(settings)
        listing.write_text("P1\nP2\n")
        assert criteria_digest(settings) != before
        assert criteria_digest(HarvestCriteria(modalities=["CT"])) != criteria_digest(
            HarvestCriteria(modalities=["MR"])
        )
