"""The harvest against a real PACS (Orthanc): criteria, C-MOVE into the router, C-GET,
re-fetching only what is missing, archives and their rebuild."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pydicom
import pytest
from pacsflow.dicom import ReceivedInstance, StoreSCP
from pacsflow.events import Moved, PatientComplete
from pacsflow.store import SqliteDatabase

from tests.dicom.synthetic import write_ct_series
from tests.harvester.support import (
    Cohort,
    DimseProxy,
    harvest_done,
    harvest_settings,
    running_harvester,
    series_on_disk,
    wait_until,
)
from tests.peers import OrthancProcess
from tests.router.support import running_router

pytestmark = [pytest.mark.orthanc]

SELECTED = ("PAT001", "PAT003", "PAT005")


class TestHarvestIntoTheRouter:
    async def test_criteria_select_exactly_their_series_and_zips_hold_every_instance(
        self,
        tmp_path: Path,
        cohort: Cohort,
        loaded_orthanc: OrthancProcess,
        proxy: DimseProxy,
        router_port: int,
    ) -> None:
        settings = harvest_settings(tmp_path, proxy.port, router_port=router_port)
        storage = tmp_path / "storage"
        router_db = await SqliteDatabase.open(tmp_path / "router.db")
        try:
            async with (
                running_router(settings, db=router_db) as router,
                running_harvester(settings) as running,
            ):
                await wait_until(lambda: harvest_done(running.state), 60, "the harvest")
                await wait_until(
                    lambda: len(running.of_type("patient-complete")) == 3,
                    10,
                    "patient-complete events",
                )
                await wait_until(lambda: len(running.of_type("moved")) == 18, 10, "moved")
                metric = running.metric
                counts = await running.state.counts()
        finally:
            await router_db.close()
        # Read after the router stopped: its last reports are flushed by then.
        stored = router.metric("pacsflow_router_instances_total", route="PACSFLOW")

        wanted = cohort.of_patients(SELECTED)
        on_disk = series_on_disk(storage)
        assert on_disk == {item.series_uid: set(item.sop_uids) for item in wanted}
        # Every instance was stored once: nothing was fetched twice.
        assert stored == 3 * 2 * 3 * 4
        assert counts["series"] == {"complete": 18}
        assert counts["patients"] == {"listed": 3}

        for patient_id in SELECTED:
            archive = tmp_path / "archive" / f"{patient_id}.zip"
            with zipfile.ZipFile(archive) as zipped:
                names = zipped.namelist()
                assert zipped.testzip() is None
            expected = {uid for item in wanted if item.patient_id == patient_id
                        for uid in item.sop_uids}  # fmt: skip
            assert {Path(name).stem for name in names} == expected
            assert all(name.startswith(f"{patient_id}/") for name in names)
        events = [e for e in running.events if isinstance(e, PatientComplete)]
        assert sorted(e.payload.patient_id for e in events) == list(SELECTED)
        assert all(e.payload.instances == 24 and e.payload.series_count == 6 for e in events)
        moved = [e for e in running.events if isinstance(e, Moved)]
        assert {e.payload.status for e in moved} == {"success"}
        assert {e.payload.series_instance_uid for e in moved} == {s.series_uid for s in wanted}

        requests = proxy.snapshot()
        moves = [r for r in requests if r.command == "C-MOVE"]
        # One series-level C-MOVE per series, nothing else retrieved.
        assert sorted(r.series_uid for r in moves) == sorted(s.series_uid for s in wanted)
        assert {r.level for r in moves} == {"SERIES"}
        finds = [r for r in requests if r.command == "C-FIND"]
        # 1 patient query, 3 study lists, 6 series lists, 18 image lists.
        assert len(finds) == 1 + 3 + 6 + 18
        assert metric("pacsflow_harvester_requests_total", type="find") == len(finds)
        assert metric("pacsflow_harvester_requests_total", type="move") == len(moves)
        assert metric("pacsflow_harvester_retrieved_instances_total", method="move") == 72
        assert metric("pacsflow_harvester_series", state="complete") == 18
        assert metric("pacsflow_harvester_archives_total", kind="first") == 3


class TestHarvestByCGet:
    async def test_c_get_files_the_router_layout_without_an_scp(
        self, tmp_path: Path, cohort: Cohort, proxy: DimseProxy
    ) -> None:
        criteria = {
            "patient_id_pattern": "PAT00[12]",
            # Two ranges: the PACS is asked for every date, the ranges are applied here.
            "study_dates": ["20230102", "20240101-"],
            "modalities": ["CT"],
        }
        settings = harvest_settings(
            tmp_path, proxy.port, method="get", criteria=criteria,
            storage_path=str(tmp_path / "got"),
        )  # fmt: skip
        async with running_harvester(settings) as running:
            await wait_until(lambda: harvest_done(running.state), 60, "the harvest")
            counts = await running.state.counts()
            received = running.metric("pacsflow_harvester_retrieved_instances_total", method="get")

        wanted = [
            item for item in cohort.of_patients(["PAT001", "PAT002"])
            if item.study_date == "20230102" and item.modality == "CT"
        ]  # fmt: skip
        assert len(wanted) == 4
        on_disk = series_on_disk(tmp_path / "got")
        assert on_disk == {item.series_uid: set(item.sop_uids) for item in wanted}
        for item in wanted:
            folder = tmp_path / "got" / item.patient_id / "20230102_020000" / item.series_uid
            assert {path.stem for path in folder.glob("*.dcm")} == set(item.sop_uids)
        assert received == 16
        # The other study is listed but excluded by date; the MR series by modality.
        assert counts["studies"] == {"listed": 2, "excluded": 2}
        assert counts["series"] == {"complete": 4, "excluded": 2}
        commands = {request.command for request in proxy.snapshot()}
        assert commands == {"C-FIND", "C-GET"}
        for patient_id in ("PAT001", "PAT002"):
            with zipfile.ZipFile(tmp_path / "archive" / f"{patient_id}.zip") as zipped:
                assert len(zipped.namelist()) == 8


class _DroppingDestination:
    """A C-MOVE destination that answers success for some instances without keeping them
    the first time they come: a silent partial retrieve."""

    def __init__(self, root: Path, drop: set[str]) -> None:
        from pacsflow_harvester.layout import Storage

        self.storage = Storage(root)
        self.drop = set(drop)
        self.dropped: list[str] = []
        self.stored: list[str] = []

    def __call__(self, instance: ReceivedInstance) -> int:
        uid = instance.sop_instance_uid
        if uid in self.drop:
            self.drop.discard(uid)
            self.dropped.append(uid)
            return 0
        self.stored.append(uid)
        return self.storage.write(instance)[0]


class TestCompleteness:
    async def test_only_the_missing_instances_are_fetched_again(
        self, tmp_path: Path, cohort: Cohort, proxy: DimseProxy, router_port: int
    ) -> None:
        series = cohort.of_patients(["PAT002"])
        lossy = series[1]
        drop = {lossy.sop_uids[0], lossy.sop_uids[2]}
        destination = _DroppingDestination(tmp_path / "storage", drop)
        settings = harvest_settings(tmp_path, proxy.port, criteria={"patient_ids": ["PAT002"]})
        scp = StoreSCP(destination, ae_title="PACSFLOW", host="127.0.0.1", port=router_port)
        with scp:
            async with running_harvester(settings) as running:
                await wait_until(lambda: harvest_done(running.state), 60, "the harvest")
                silent = running.metric("pacsflow_harvester_silent_losses_total")
                refetched = running.metric("pacsflow_harvester_refetched_instances_total")
                row = await running.db.fetchrow(
                    "SELECT status, instances, refetched, move_status FROM harvest_series"
                    " WHERE series_uid = $1", lossy.series_uid,
                )  # fmt: skip

        assert sorted(destination.dropped) == sorted(drop)
        assert series_on_disk(tmp_path / "storage") == {
            s.series_uid: set(s.sop_uids) for s in series
        }
        # Each instance crossed the network once, the two lost ones twice: no more.
        assert sorted(destination.stored) == sorted(uid for s in series for uid in s.sop_uids)
        moves = proxy.snapshot("C-MOVE")
        image_moves = [r for r in moves if r.level == "IMAGE"]
        assert len(image_moves) == 1
        assert image_moves[0].series_uid == lossy.series_uid
        assert sorted(image_moves[0].sop_uids) == sorted(drop)
        assert sorted(r.series_uid for r in moves if r.level == "SERIES") == sorted(
            s.series_uid for s in series
        )
        assert silent == 1
        assert refetched == 2
        assert row == {"status": "complete", "instances": 4, "refetched": 2, "move_status": 0}


class TestArchives:
    async def test_a_series_added_later_rebuilds_the_zip_and_fetches_only_it(
        self,
        tmp_path: Path,
        cohort: Cohort,
        loaded_orthanc: OrthancProcess,
        proxy: DimseProxy,
        router_port: int,
    ) -> None:
        settings = harvest_settings(
            tmp_path, proxy.port, router_port=router_port, criteria={"patient_ids": ["PAT004"]}
        )
        first = cohort.of_patients(["PAT004"])
        router_db = await SqliteDatabase.open(tmp_path / "router.db")
        try:
            async with (
                running_router(settings, db=router_db),
                running_harvester(settings) as running,
            ):
                await wait_until(lambda: harvest_done(running.state), 60, "the harvest")
                await wait_until(lambda: len(running.of_type("patient-complete")) == 1, 10,
                                 "the first patient-complete")  # fmt: skip
                archive = tmp_path / "archive" / "PAT004.zip"
                with zipfile.ZipFile(archive) as zipped:
                    assert len(zipped.namelist()) == 24
                moves_before = len(proxy.snapshot("C-MOVE"))

                late = write_ct_series(tmp_path / "late", 3, rows=8, columns=8,
                                       study_uid=first[0].study_uid)  # fmt: skip
                for path in late:
                    ds = pydicom.dcmread(path)
                    ds.PatientID = "PAT004"
                    ds.StudyDate, ds.StudyTime = first[0].study_date, "010000"
                    ds.save_as(path, enforce_file_format=True)
                loaded_orthanc.upload(late)
                await running.state.request_rescan()
                await wait_until(lambda: len(running.of_type("patient-complete")) == 2, 60,
                                 "the second patient-complete")  # fmt: skip
                rebuilds = running.metric("pacsflow_harvester_archives_total", kind="rebuild")
        finally:
            await router_db.close()

        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
        assert len(names) == 27
        late_uid = pydicom.dcmread(late[0]).SeriesInstanceUID
        assert sum(1 for name in names if f"/{late_uid}/" in name) == 3
        assert rebuilds == 1
        events = running.of_type("patient-complete")
        assert [e.payload.instances for e in events] == [24, 27]  # type: ignore[attr-defined]
        assert events[0].id != events[1].id
        # After the rescan only the new series was retrieved.
        later = proxy.snapshot("C-MOVE")[moves_before:]
        assert [r.series_uid for r in later] == [late_uid]
