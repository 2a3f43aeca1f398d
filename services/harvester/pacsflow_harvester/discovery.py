"""The query stages: patients, then the studies of each patient, then the series of each study.

Each stage claims one row, asks the PACS one C-FIND, records the answers as rows of the next
stage (taken or excluded by the criteria) and marks its row done, in one transaction. Studies
are listed before further patients, so series reach the workers early instead of after the
whole cohort has been listed.

The patient stage is a single scan: the explicit cohort from the configuration (no query),
or a PATIENT-level C-FIND (Patient Root), or STUDY-level C-FINDs by study date for a PACS
that answers no patient queries.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from pacsflow.config import HarvestCriteria
from pacsflow.errors import DicomError, StoreError

from pacsflow_harvester.criteria import Criteria, PluginError, attributes
from pacsflow_harvester.metrics import HarvesterMetrics
from pacsflow_harvester.pacs import Pacs, classify
from pacsflow_harvester.state import Claims, HarvestState, SeriesFound, StudyFound, Table

__all__ = ["Discovery", "criteria_digest"]

log = logging.getLogger(__name__)


def criteria_digest(settings: HarvestCriteria) -> str:
    """A digest of the criteria (and the cohort file's content): a change means a new scan."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    if settings.patient_ids_file is not None:
        try:
            data["patient_ids_file_content"] = settings.patient_ids_file.read_text("utf-8")
        except OSError:
            data["patient_ids_file_content"] = None
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


_STAGES = {"scans": "scan", "patients": "patient", "studies": "study", "series": "series"}


def _count(value: str) -> int | None:
    try:
        return int(value) if value.strip() else None
    except ValueError:
        return None


class Discovery:
    """Runs the query stages one claimed row at a time."""

    def __init__(
        self,
        state: HarvestState,
        pacs: Pacs,
        criteria: Criteria,
        metrics: HarvesterMetrics,
        *,
        owner: str,
        lease: float,
        max_attempts: int,
        backoff: Callable[[int], float],
        rescan_after: float | None,
        claims: Claims | None = None,
        series_added: Callable[[], None] = lambda: None,
    ) -> None:
        self.state = state
        self.pacs = pacs
        self.criteria = criteria
        self.metrics = metrics
        self.owner = owner
        self.lease = lease
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.rescan_after = rescan_after
        self.series_added = series_added
        self.claims = claims if claims is not None else Claims()

    async def step(self) -> bool:
        """Do one piece of query work if there is any; False when there was none."""
        if await self.state.claim_scan(self.owner, self.lease):
            await self._guarded("scans", "patients", 0, self._scan())
            return True
        study = await self.state.claim_study(self.owner, self.lease)
        if study is not None:
            await self._guarded(
                "studies", study.study_uid, study.attempts,
                self._list_series(study.study_uid, study.patient_id),
            )  # fmt: skip
            return True
        patient = await self.state.claim_patient(self.owner, self.lease)
        if patient is not None:
            await self._guarded(
                "patients", patient.patient_id, patient.attempts,
                self._list_studies(patient.patient_id),
            )  # fmt: skip
            return True
        return False

    async def _guarded(self, table: Table, key: str, attempts: int, work: Any) -> None:
        stage = _STAGES[table]
        self.claims.add(table, key)
        try:
            await self._settled(table, stage, key, attempts, work)
        finally:
            self.claims.discard(table, key)

    async def _settled(self, table: Table, stage: str, key: str, attempts: int, work: Any) -> None:
        try:
            await work
        except (DicomError, PluginError) as err:
            reason = classify(err) if isinstance(err, DicomError) else "plugin"
            # An unreachable PACS is not this row's fault: no attempt used, and the PACS
            # client already holds every request back until it answers again.
            refund = reason == "unreachable"
            delay = 0.0 if refund else self.backoff(max(attempts, 1))
            status = await self.state.retry_later(
                table, key, self.owner, str(err), delay=delay,
                max_attempts=self.max_attempts, refund=refund,
            )  # fmt: skip
            if status == "failed":
                self.metrics.failed.labels(stage).inc()
                log.error("%s query failed for good after %d attempts: %s", stage, attempts, err)
            else:
                self.metrics.retries.labels(stage, reason).inc()
                log.warning("%s query failed (%s), retrying in %.0f s: %s",
                            stage, reason, delay, err)  # fmt: skip
        except asyncio.CancelledError:
            # Stopping: the claim goes back with its attempt, not lost.
            await asyncio.shield(
                self.state.retry_later(
                    table, key, self.owner, "interrupted", delay=0.0,
                    max_attempts=self.max_attempts, refund=True,
                )
            )  # fmt: skip
            raise
        except Exception as err:
            # Anything else (the state store, a bug) uses an attempt, so a query that keeps
            # failing ends failed and visible instead of looping.
            log.exception("%s query failed unexpectedly", stage)
            self.metrics.retries.labels(stage, "error").inc()
            try:
                await self.state.retry_later(
                    table, key, self.owner, f"{type(err).__name__}: {err}",
                    delay=self.backoff(max(attempts, 1)), max_attempts=self.max_attempts,
                )  # fmt: skip
            except StoreError:
                pass  # the lease runs out and the row comes back by itself

    # --- the stages -------------------------------------------------------------------------

    async def _scan(self) -> None:
        cohort = self.criteria.cohort()
        if cohort is not None:
            taken = [pid for pid in cohort if self.criteria.patient({"PatientID": pid})]
            source = "the configured cohort"
        elif self.criteria.settings.discovery == "patient":
            answers = await self.pacs.find(
                "PATIENT",
                {
                    "PatientID": self.criteria.settings.patient_query,
                    "PatientName": None,
                    "PatientBirthDate": None,
                    "PatientSex": None,
                    "NumberOfPatientRelatedStudies": None,
                },
                model="patient",
            )
            taken = list(
                dict.fromkeys(
                    values["PatientID"]
                    for values in map(attributes, answers)
                    if self.criteria.patient(values)
                )
            )
            source = f"{len(answers)} patient(s) the PACS answered"
        else:
            found: list[dict[str, str]] = []
            for dates in self.criteria.discovery_date_queries():
                answers = await self.pacs.find(
                    "STUDY",
                    {
                        "PatientID": self.criteria.settings.patient_query,
                        "StudyDate": dates,
                        "StudyInstanceUID": None,
                        "PatientName": None,
                        "ModalitiesInStudy": None,
                    },
                    model="study",
                )
                found.extend(attributes(answer) for answer in answers)
            taken = self.criteria.patients_of_studies(found)
            source = f"{len(found)} stud(ies) the PACS answered"
        await self.state.add_patients(taken)
        await self.state.finish_scan(self.owner, len(taken), self.rescan_after)
        log.info("patient scan: %d patient(s) taken from %s", len(taken), source)

    async def _list_studies(self, patient_id: str) -> None:
        answers = await self.pacs.find(
            "STUDY",
            {
                "PatientID": patient_id,
                "StudyDate": self.criteria.study_date_query(),
                "StudyTime": None,
                "StudyInstanceUID": None,
                "StudyDescription": None,
                "ModalitiesInStudy": None,
                "AccessionNumber": None,
                "NumberOfStudyRelatedInstances": None,
            },
            patient_id=patient_id,
        )
        studies: dict[str, StudyFound] = {}
        for values in map(attributes, answers):
            uid = values.get("StudyInstanceUID", "")
            # A PACS may match loosely (case, wildcards in IDs): keep only this patient's.
            if not uid or values.get("PatientID", patient_id) != patient_id:
                continue
            studies[uid] = StudyFound(
                study_uid=uid,
                study_date=values.get("StudyDate", ""),
                study_time=values.get("StudyTime", ""),
                description=values.get("StudyDescription", ""),
                modalities=values.get("ModalitiesInStudy", ""),
                selected=self.criteria.study(values),
            )
        if await self.state.finish_patient(self.owner, patient_id, list(studies.values())):
            taken = sum(1 for study in studies.values() if study.selected)
            log.debug("patient %s: %d of %d stud(ies) taken", patient_id, taken, len(studies))

    async def _list_series(self, study_uid: str, patient_id: str) -> None:
        answers = await self.pacs.find(
            "SERIES",
            {
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": None,
                "Modality": None,
                "SeriesNumber": None,
                "SeriesDescription": None,
                "NumberOfSeriesRelatedInstances": None,
            },
            patient_id=patient_id,
        )
        series: dict[str, SeriesFound] = {}
        for values in map(attributes, answers):
            uid = values.get("SeriesInstanceUID", "")
            if not uid or values.get("StudyInstanceUID", study_uid) != study_uid:
                continue
            series[uid] = SeriesFound(
                series_uid=uid,
                modality=values.get("Modality", ""),
                series_number=values.get("SeriesNumber", ""),
                description=values.get("SeriesDescription", ""),
                expected_instances=_count(values.get("NumberOfSeriesRelatedInstances", "")),
                selected=self.criteria.series(values),
            )
        if await self.state.finish_study(self.owner, study_uid, list(series.values())):
            taken = sum(1 for item in series.values() if item.selected)
            log.info("study %s: %d of %d series taken", study_uid, taken, len(series))
            if taken:
                self.series_added()
