"""Routes files (YAML, JSON, the older shapes), the association policy, and reloading."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

import pydicom
import pytest
from pacsflow.dicom.scp import AssociationInfo
from pacsflow.errors import ConfigError
from pacsflow_router.routes import ActiveRoute, RouteTable, load_routes_file
from pacsflow_router.scp import Rejection
from pynetdicom import AE

from tests.router.support import expected_path, router_settings, running_router, storescu


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    # A new modification time even within the file system's time resolution.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    return path


class TestRoutesFile:
    def test_yaml_with_every_field(self, tmp_path: Path) -> None:
        path = _write(
            tmp_path / "routes.yaml",
            """
routes:
  MRI:
    path: /data/mri
    emails: [a@example.org]
    forward: [pacs]
    allowed_calling_aes: [SCANNER1]
    allowed_addresses: [10.0.0.0/8]
""",
        )
        routes = load_routes_file(path, nodes={"pacs"})
        assert routes["MRI"].path == Path("/data/mri")
        assert routes["MRI"].forward == ["pacs"]
        assert routes["MRI"].allowed_addresses == ["10.0.0.0/8"]

    def test_the_older_json_shapes(self, tmp_path: Path) -> None:
        seed = {
            "MRI": {"path": "/data/mri", "email": ["a@example.org", "b@example.org"]},
            "CT": "/data/ct",
            "PET": ["/data/pet", "c@example.org; d@example.org"],
        }
        routes = load_routes_file(_write(tmp_path / "routes.json", json.dumps(seed)))
        assert routes["MRI"].emails == ["a@example.org", "b@example.org"]
        assert routes["CT"].path == Path("/data/ct") and routes["CT"].emails == []
        assert routes["PET"].emails == ["c@example.org", "d@example.org"]

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("MRI: {path: /x, colour: red}", "MRI.colour: unknown key"),
            ("MRI: {emails: [a@b]}", "MRI.path"),
            ("THIS_TITLE_IS_TOO_LONG: /x", "longer than 16"),
            ("- just a list", "mapping of called AE title"),
            ("MRI: {path: /x, forward: [nowhere]}", "'nowhere', which is not in nodes"),
            ("MRI: {path: /x, allowed_addresses: [300.1.1.1]}", "not an IP address"),
            ("{unbalanced", "neither JSON nor YAML"),
        ],
    )
    def test_errors_name_the_file_and_key(self, tmp_path: Path, text: str, message: str) -> None:
        path = _write(tmp_path / "routes.yaml", text)
        with pytest.raises(ConfigError) as raised:
            load_routes_file(path, nodes={"pacs"})
        assert str(path) in str(raised.value)
        assert message in str(raised.value)


def _info(
    calling: str = "SCANNER1", called: str = "MRI", host: str = "10.1.2.3"
) -> AssociationInfo:
    return AssociationInfo(
        calling_ae=calling, called_ae=called, peer_host=host, peer_port=1, tls=False
    )


class TestPolicy:
    def test_who_may_send_where(self) -> None:
        from pacsflow.config import Route

        table = RouteTable(
            {
                "MRI": Route(path=Path("/m"), allowed_calling_aes=["SCANNER1"]),
                "CT": Route(path=Path("/c"), allowed_addresses=["10.1.0.0/16"]),
            },
            allowed_addresses=["10.0.0.0/8", "::1"],
        )
        assert isinstance(table.resolve(_info()), ActiveRoute)
        assert table.resolve(_info(called="NOPE")) == Rejection.called_ae_unknown()
        assert table.resolve(_info(calling="OTHER")) == Rejection.calling_ae_not_allowed()
        assert table.resolve(_info(host="192.168.1.1")) == Rejection.address_not_allowed()
        assert isinstance(table.resolve(_info(called="CT", calling="ANY")), ActiveRoute)
        assert table.resolve(_info(called="CT", host="10.2.0.1")) == Rejection.address_not_allowed()
        assert isinstance(table.resolve(_info(called="CT", host="::ffff:10.1.0.9")), ActiveRoute)


def _open_association(port: int, called: str) -> object:
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    return assoc


class TestReloading:
    async def test_changes_apply_without_dropping_open_associations(
        self, tmp_path: Path, series_50: list[Path], caplog: pytest.LogCaptureFixture
    ) -> None:
        routes_file = _write(tmp_path / "routes.yaml", f"OLD: {tmp_path / 'old'}\n")
        settings = router_settings(tmp_path, {}, routes_file=str(routes_file))
        caplog.set_level(logging.INFO, logger="pacsflow_router")
        async with running_router(settings) as router:
            held = await asyncio.to_thread(_open_association, router.port, "OLD")
            assert (await storescu(router.port, "NEW", series_50[0])).returncode != 0

            _write(routes_file, f"NEW: {tmp_path / 'new'}\n")
            await asyncio.sleep(0.5)
            assert (await storescu(router.port, "NEW", series_50[0])).returncode == 0
            assert (await storescu(router.port, "OLD", series_50[1])).returncode != 0
            # The association accepted before the reload still stores where it was routed.
            status = await asyncio.to_thread(held.send_c_store, pydicom.dcmread(series_50[2]))  # type: ignore[attr-defined]
            assert status.Status == 0x0000
            held.release()  # type: ignore[attr-defined]

            _write(routes_file, "NEW: {path: [broken\n")
            await asyncio.sleep(0.5)
            assert router.metric("pacsflow_router_route_reloads_total", result="error") == 1
            assert (await storescu(router.port, "NEW", series_50[3])).returncode == 0
            assert router.metric("pacsflow_router_route_reloads_total", result="ok") == 1
        assert expected_path(tmp_path / "new", series_50[0]).is_file()
        assert expected_path(tmp_path / "old", series_50[2]).is_file()
        assert any("routes not reloaded" in r.getMessage() for r in caplog.records)

    async def test_sighup_reloads(self, tmp_path: Path, series_50: list[Path]) -> None:
        routes_file = _write(tmp_path / "routes.yaml", f"OLD: {tmp_path / 'old'}\n")
        # A long poll interval: only the signal can make it reload in time.
        settings = router_settings(
            tmp_path, {}, routes_file=str(routes_file), routes_poll_seconds=60
        )
        async with running_router(settings) as router:
            _write(routes_file, f"NEW: {tmp_path / 'new'}\n")
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert (await storescu(router.port, "NEW", series_50[0])).returncode == 0
            assert router.metric("pacsflow_router_route_reloads_total", result="ok") == 1
