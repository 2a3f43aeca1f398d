"""Receiving from DCMTK storescu: layout, bytes, rejections, failures, forwarding, metrics."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import pydicom
import pytest
from pacsflow.dicom import read_part10
from pynetdicom import AE

from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series
from tests.router.support import (
    DCMTK_ENV,
    dataset_bytes,
    expected_path,
    files_under,
    router_settings,
    running_router,
    storescu,
)

pytestmark = pytest.mark.dcmtk


def _command(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a quick system command (mount, chattr), never raising on failure."""
    return subprocess.run(list(args), check=False, capture_output=True, text=True)


def _send_with_status(port: int, called: str, path: Path) -> int:
    """Send one file with pynetdicom and return the DIMSE status the router answered."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


class TestStoring:
    async def test_a_series_lands_at_its_path_byte_identical_and_completes_once(
        self, tmp_path: Path, series_50: list[Path]
    ) -> None:
        root = tmp_path / "mri"
        settings = router_settings(tmp_path, {"MRI": {"path": str(root)}})
        async with running_router(settings) as router:
            result = await storescu(router.port, "MRI", series_50[0].parent)
            assert result.returncode == 0, result.stderr
            [event] = await router.wait_completions(1)
            await asyncio.sleep(1.5)  # nothing more comes
            assert len(router.completions()) == 1
            assert router.metric("pacsflow_router_instances_total", route="MRI") == 50
        for source in series_50:
            target = expected_path(root, source)
            assert dataset_bytes(target) == dataset_bytes(source)
            assert (
                read_part10(target).transfer_syntax_uid == read_part10(source).transfer_syntax_uid
            )
        assert len(files_under(root)) == 50
        payload = event.payload
        ds = pydicom.dcmread(series_50[0], stop_before_pixels=True)
        assert (payload.route, payload.study_instance_uid) == ("MRI", ds.StudyInstanceUID)
        assert (payload.files_received, payload.files_new, payload.completion) == (50, 50, 1)
        assert payload.study_description == "synthetic"
        assert payload.patient_id == "PFTEST"
        assert Path(payload.storage_path) == root / "PFTEST" / "20240102_101010"
        assert payload.first_received <= payload.last_received

    @pytest.mark.parametrize(
        ("option", "names"),
        [
            ("-xy", ["SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_dcmtk_+eb+cr.dcm"]),  # JPEG baseline
            ("-xr", ["SC_rgb_rle.dcm"]),  # RLE
            ("-xs", ["SC_rgb_jpeg_gdcm.dcm"]),  # JPEG lossless
            ("", ["MR_small_implicit.dcm", "rtplan.dcm", "test-SR.dcm"]),
        ],
    )
    async def test_compressed_and_other_syntaxes_are_stored_as_received(
        self, tmp_path: Path, pydicom_test_files: Path, option: str, names: list[str]
    ) -> None:
        root = tmp_path / "route"
        settings = router_settings(tmp_path, {"ANY": {"path": str(root)}})
        sources = [pydicom_test_files / name for name in names]
        async with running_router(settings) as router:
            result = await storescu(
                router.port, "ANY", *sources, options=[option] if option else []
            )
            assert result.returncode == 0, result.stderr
        for source in sources:
            target = expected_path(root, source)
            assert (
                read_part10(target).transfer_syntax_uid == read_part10(source).transfer_syntax_uid
            )
            assert dataset_bytes(target) == dataset_bytes(source)

    async def test_c_echo_is_answered(self, tmp_path: Path) -> None:
        settings = router_settings(tmp_path, {"MRI": {"path": str(tmp_path / "mri")}})
        async with running_router(settings) as router:
            process = await asyncio.create_subprocess_exec(
                require_tool("echoscu"), "-aec", "MRI", "127.0.0.1", str(router.port),
                env=DCMTK_ENV, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await process.communicate()
            assert process.returncode == 0, err.decode()

    @pytest.mark.filterwarnings("ignore:.*(exceeds the maximum length|Invalid value for VR)")
    async def test_hostile_headers_stay_under_the_route(self, tmp_path: Path) -> None:
        source = write_ct_series(tmp_path / "hostile", 6)
        hostile = [
            ("PatientID", "../../x"),
            ("PatientID", "CON"),
            ("PatientID", ""),
            ("PatientID", "P" * 200),
            ("PatientID", "a\x00b/../../c"),
            ("StudyDate", "../../../etc"),
        ]
        for path, (keyword, value) in zip(source, hostile, strict=True):
            ds = pydicom.dcmread(path)
            setattr(ds, keyword, value)
            ds.save_as(path)
        root = tmp_path / "deep" / "route"
        settings = router_settings(tmp_path, {"MRI": {"path": str(root)}})
        async with running_router(settings) as router:
            result = await storescu(router.port, "MRI", *source)
            assert result.returncode == 0, result.stderr
        stored = [p for p in (tmp_path / "deep").rglob("*") if p.is_file()]
        assert len(stored) == 6
        for path in stored:
            assert path.resolve().is_relative_to(root.resolve())
            assert len(path.relative_to(root).parts) == 4
        names = {p.relative_to(root).parts[0] for p in stored}
        assert all(not name.startswith(".") and "/" not in name for name in names)
        assert any(name.startswith("_CON") for name in names)
        assert "~empty" in names

    async def test_the_same_instance_twice_is_one_file(
        self, tmp_path: Path, series_50: list[Path]
    ) -> None:
        root = tmp_path / "mri"
        settings = router_settings(tmp_path, {"MRI": {"path": str(root)}})
        async with running_router(settings) as router:
            for _ in range(2):
                result = await storescu(router.port, "MRI", *series_50[:10])
                assert result.returncode == 0, result.stderr
            [event] = await router.wait_completions(1)
        assert len(files_under(root)) == 10
        assert event.payload.files_received == 10


class TestRejecting:
    async def test_an_unknown_called_ae_is_rejected_and_the_log_says_why(
        self, tmp_path: Path, series_50: list[Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        settings = router_settings(tmp_path, {"MRI": {"path": str(tmp_path / "mri")}})
        caplog.set_level(logging.WARNING, logger="pacsflow_router")
        async with running_router(settings) as router:
            result = await storescu(router.port, "NOSUCHROUTE", series_50[0])
            assert result.returncode != 0
            assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
            await asyncio.sleep(0.3)
            assert (
                router.metric(
                    "pacsflow_router_associations_total",
                    outcome="rejected",
                    reason="called-ae-unknown",
                )
                == 1
            )
        assert any(
            "called-ae-unknown" in r.getMessage() and "NOSUCHROUTE" in r.getMessage()
            for r in caplog.records
        )
        assert not (tmp_path / "mri").exists()

    async def test_a_calling_ae_not_allowed_is_rejected(
        self, tmp_path: Path, series_50: list[Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        root = tmp_path / "mri"
        routes = {"MRI": {"path": str(root), "allowed_calling_aes": ["SCANNER1"]}}
        settings = router_settings(tmp_path, routes)
        caplog.set_level(logging.WARNING, logger="pacsflow_router")
        async with running_router(settings) as router:
            refused = await storescu(router.port, "MRI", series_50[0], calling="INTRUDER")
            allowed = await storescu(router.port, "MRI", series_50[0], calling="SCANNER1")
            await asyncio.sleep(0.3)
            assert (
                router.metric(
                    "pacsflow_router_associations_total",
                    outcome="rejected",
                    reason="calling-ae-not-allowed",
                )
                == 1
            )
        assert refused.returncode != 0
        assert allowed.returncode == 0, allowed.stderr
        assert any(
            "calling-ae-not-allowed" in r.getMessage() and "INTRUDER" in r.getMessage()
            for r in caplog.records
        )
        assert len(files_under(root)) == 1

    async def test_an_address_not_allowed_is_rejected(
        self, tmp_path: Path, series_50: list[Path]
    ) -> None:
        settings = router_settings(
            tmp_path, {"MRI": {"path": str(tmp_path / "mri")}}, allowed_addresses=["10.0.0.0/8"]
        )
        async with running_router(settings) as router:
            result = await storescu(router.port, "MRI", series_50[0])
            await asyncio.sleep(0.3)
            assert (
                router.metric(
                    "pacsflow_router_associations_total",
                    outcome="rejected",
                    reason="address-not-allowed",
                )
                == 1
            )
        assert result.returncode != 0


class TestFailures:
    async def test_a_full_disk_is_answered_a700_and_the_router_goes_on(
        self, tmp_path: Path, series_50: list[Path]
    ) -> None:
        small = tmp_path / "small-disk"
        small.mkdir()
        mounted = _command("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small))
        if mounted.returncode != 0:
            pytest.fail(f"this test mounts a 64 kB tmpfs (needs root): {mounted.stderr}")
        try:
            routes = {
                "FULL": {"path": str(small / "route")},
                "MRI": {"path": str(tmp_path / "mri")},
            }
            settings = router_settings(tmp_path, routes)
            async with running_router(settings) as router:
                statuses = [
                    await asyncio.to_thread(_send_with_status, router.port, "FULL", path)
                    for path in series_50[:12]
                ]
                assert statuses[0] == 0x0000
                assert 0xA700 in statuses
                result = await storescu(router.port, "MRI", *series_50[:5])
                assert result.returncode == 0, result.stderr
                await asyncio.sleep(0.3)
                assert (
                    router.metric(
                        "pacsflow_router_store_failures_total", route="FULL", reason="disk-full"
                    )
                    >= 1
                )
            assert len(files_under(tmp_path / "mri")) == 5
            assert not [p for p in (small / "route").rglob(".*.part")]
        finally:
            _command("umount", str(small))

    async def test_a_permission_error_is_answered_with_a_failure(
        self, tmp_path: Path, series_50: list[Path]
    ) -> None:
        root = tmp_path / "locked"
        root.mkdir()
        # root ignores file modes; an immutable folder refuses even root.
        locked = _command("chattr", "+i", str(root))
        if locked.returncode != 0:
            root.chmod(0o555)
        try:
            settings = router_settings(tmp_path, {"LOCKED": {"path": str(root)}})
            async with running_router(settings) as router:
                status = await asyncio.to_thread(
                    _send_with_status, router.port, "LOCKED", series_50[0]
                )
                await asyncio.sleep(0.3)
                assert (
                    router.metric(
                        "pacsflow_router_store_failures_total", route="LOCKED", reason="permission"
                    )
                    == 1
                )
            assert 0xC000 <= status <= 0xCFFF
        finally:
            _command("chattr", "-i", str(root))
            root.chmod(0o755)


class TestForwarding:
    async def test_a_forward_route_announces_every_file_to_the_uploader(
        self, tmp_path: Path, series_50: list[Path]
    ) -> None:
        root = tmp_path / "fwd"
        settings = router_settings(
            tmp_path, {"FWD": {"path": str(root), "forward": ["pacs"]}}, forward_batch_size=20
        )
        async with running_router(settings) as router:
            result = await storescu(router.port, "FWD", series_50[0].parent)
            assert result.returncode == 0, result.stderr
            await router.wait_completions(1)
            events = router.file_ready()
        files = [f for event in events for f in event.payload.files]
        assert {e.payload.destinations == ["pacs"] for e in events} == {True}
        assert all(len(e.payload.files) <= 20 for e in events)
        assert sorted(Path(f.path) for f in files) == sorted(
            expected_path(root, s) for s in series_50
        )
        first = files[0]
        assert first.size == len(dataset_bytes(Path(first.path)))
        assert first.transfer_syntax_uid == "1.2.840.10008.1.2.1"


async def test_metrics_count_associations_instances_and_bytes(
    tmp_path: Path, series_50: list[Path]
) -> None:
    settings = router_settings(tmp_path, {"MRI": {"path": str(tmp_path / "mri")}})
    async with running_router(settings) as router:
        result = await storescu(router.port, "MRI", *series_50[:20])
        assert result.returncode == 0
        await router.wait_completions(1)
        total = sum(len(dataset_bytes(p)) for p in series_50[:20])
        assert router.metric("pacsflow_router_received_bytes_total", route="MRI") == total
        assert (
            router.metric("pacsflow_router_associations_total", outcome="accepted", reason="") == 1
        )
        assert (
            router.metric("pacsflow_router_associations_total", outcome="released", reason="") == 1
        )
        assert router.metric("pacsflow_router_store_seconds_count", route="MRI") == 20
        assert (
            router.metric(
                "pacsflow_router_studies_completed_total", route="MRI", completion="first"
            )
            == 1
        )
        # The sweep that published the completion sets the gauge when it ends.
        async with asyncio.timeout(5):
            while router.metric("pacsflow_router_studies_open") != 0:
                await asyncio.sleep(0.02)
        assert router.metric("pacsflow_router_studies_open") == 0
