"""The engine over TLS (PS3.15 B.1): DCMTK into its SCP, its SCU into its SCP and pynetdicom's."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsflow.config import Node, TlsSettings
from pacsflow.dicom import NetworkOptions, read_part10
from pacsflow.dicom.engine import AsyncStoreServer
from pacsflow.dicom.engine.scu import AsyncStoreSession, echo
from pacsflow.dicom.transport import server_ssl_context
from pacsflow.errors import AssociationRejected
from tests.conftest import require_tool
from tests.dicom.engine.conftest import RecordingHandler, digest_of_data_set, make_server
from tests.dicom.synthetic import write_ct_series
from tests.dicom.test_transport import (  # noqa: F401 (fixtures)
    Certificates,
    Recorder,
    certificates,
    recorder,
    tls_scp,
)


@pytest.fixture(params=["asyncio", "lean"])
def tls_engine_scp(
    handler: RecordingHandler, certificates: Certificates, request: pytest.FixtureRequest
) -> Iterator[AsyncStoreServer]:
    server = make_server(handler, request.param)
    server.ssl_context = server_ssl_context(
        TlsSettings(
            enabled=True, ca_file=certificates.ca, cert_file=certificates.server_cert,
            key_file=certificates.server_key, require_client_cert=True,
        )
    )  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop(1)
        server.listener.close()


def _client(certificates: Certificates) -> NetworkOptions:
    local = TlsSettings(cert_file=certificates.client_cert, key_file=certificates.client_key)
    return NetworkOptions(ae_title="PFTEST", tls=local, acse_timeout=10, dimse_timeout=10)


def _node(ae_title: str, port: int, ca: Path) -> Node:
    return Node(
        ae_title=ae_title, host="127.0.0.1", port=port, tls=TlsSettings(enabled=True, ca_file=ca)
    )


def test_storescu_sends_over_tls(
    tls_engine_scp: AsyncStoreServer,
    handler: RecordingHandler,
    certificates: Certificates,
    tmp_path: Path,
    dcmtk_env: dict[str, str],
) -> None:
    paths = write_ct_series(tmp_path / "series", 3, rows=256, columns=256)
    result = subprocess.run(
        [require_tool("storescu"), "+tls", str(certificates.client_key),
         str(certificates.client_cert), "+cf", str(certificates.ca), "-aec", "ENGINE", "+sd",
         "127.0.0.1", str(tls_engine_scp.port), str(tmp_path / "series")],
        env=dcmtk_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert handler.stored == {read_part10(p).sop_instance_uid: digest_of_data_set(p) for p in paths}


async def test_the_engine_scu_sends_over_tls(
    tls_engine_scp: AsyncStoreServer,
    handler: RecordingHandler,
    certificates: Certificates,
    tmp_path: Path,
) -> None:
    files = [read_part10(p) for p in write_ct_series(tmp_path / "s", 4, rows=300, columns=300)]
    node = _node("ENGINE", tls_engine_scp.port, certificates.ca)
    assert await echo(node, _client(certificates)) >= 0
    async with AsyncStoreSession.for_files(node, _client(certificates), files) as session:
        results = [await session.send(file) for file in files]
    assert [r.category for r in results] == ["success"] * 4
    assert handler.stored == {f.sop_instance_uid: digest_of_data_set(f.path) for f in files}


async def test_an_untrusted_server_gets_no_association(
    tls_engine_scp: AsyncStoreServer, certificates: Certificates
) -> None:
    node = _node("ENGINE", tls_engine_scp.port, certificates.other_ca)
    with pytest.raises(AssociationRejected):
        await echo(node, _client(certificates))


async def test_the_engine_scu_sends_to_pynetdicom_over_tls(
    tls_scp: object, recorder: Recorder, certificates: Certificates, tmp_path: Path
) -> None:
    files = [read_part10(p) for p in write_ct_series(tmp_path / "s", 3)]
    node = _node("ROUTER", tls_scp.port, certificates.ca)  # type: ignore[attr-defined]
    async with AsyncStoreSession.for_files(node, _client(certificates), files) as session:
        results = [await session.send(file) for file in files]
    assert [r.category for r in results] == ["success"] * 3
    assert len(recorder.instances) == 3
    assert all(info.tls for info in recorder.associations)
