"""DICOM TLS with a test certificate authority, both sides, through the service processes.

SCP side: the router-scp process requires client certificates signed by its CA. DCMTK
``storescu`` with such a certificate stores; with a certificate of another CA, or without
TLS, it is refused and nothing is stored. SCU side: the watcher and uploader send to DCMTK
``storescp`` over TLS; ``storescp`` refuses the uploader when its certificate comes from a CA
it does not trust, and the files wait (they are neither lost nor archived).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port, wait_for_port
from tests.reliability.support import ServiceProcess, log_records, wait_until
from tests.router.support import files_under

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(300)]

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Identity
    client: Identity
    stranger: Identity  # a client certificate from a CA nobody trusts


def _identity(ca: trustme.CA, folder: Path, name: str) -> Identity:
    issued = ca.issue_cert("127.0.0.1", "localhost", common_name=name)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return Identity(cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    return Pki(folder / "ca.pem", _identity(ca, folder, "server"), _identity(ca, folder, "client"),
               _identity(other, folder, "stranger"))  # fmt: skip


def storescu_tls(port: int, identity: Identity | None, ca: Path, *files: Path) -> int:
    tls = ["+tls", str(identity.key), str(identity.cert), "+cf", str(ca)] if identity else []
    result = subprocess.run(
        [require_tool("storescu"), *tls, "-aet", "MODALITY", "-aec", "SECURE", "-to", "10",
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=60,
    )  # fmt: skip
    return result.returncode


def _router_config(folder: Path, pki: Pki, port: int) -> Path:
    config = folder / "pacsflow.yaml"
    config.write_text(f"""
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {folder}/state.db}}
bus: {{backend: embedded, declare_services: [notifier]}}
dicom:
  tls: {{enabled: true, cert_file: {pki.server.cert}, key_file: {pki.server.key},
         ca_file: {pki.ca}, require_client_cert: true}}
router:
  host: 127.0.0.1
  port: {port}
  routes: {{SECURE: {{path: {folder}/storage}}}}
  request_timeout_seconds: 5
""")
    return config


async def test_router_accepts_trusted_client_certificates_only(tmp_path: Path, pki: Pki) -> None:
    files = write_ct_series(tmp_path / "series", 5, rows=8, columns=8)
    port = free_port()
    router = ServiceProcess(_router_config(tmp_path, pki, port), "router-scp").start()
    try:
        await wait_until(router.ready, 30, "the router ready", alive=(router,))
        assert storescu_tls(port, pki.stranger, pki.ca, *files) != 0
        assert storescu_tls(port, None, pki.ca, *files) != 0
        assert not files_under(tmp_path / "storage")
        assert storescu_tls(port, pki.client, pki.ca, *files) == 0
        assert len(files_under(tmp_path / "storage")) == len(files)
        router.check()
        assert router.stop() == 0, router.tail()
    finally:
        router.stop()


async def test_router_logs_and_counts_a_refused_client_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    files = write_ct_series(tmp_path / "series", 1, rows=8, columns=8)
    port = free_port()
    router = ServiceProcess(_router_config(tmp_path, pki, port), "router-scp").start()
    try:
        await wait_until(router.ready, 30, "the router ready", alive=(router,))
        assert storescu_tls(port, pki.stranger, pki.ca, *files) != 0
        # Counted with the router's next flush of its metrics.
        await wait_until(lambda: router.metric_sum("pacsflow_router_associations_total",
                                                   outcome="rejected", reason="tls-handshake") >= 1,
                         10, "the refused handshake counted", alive=(router,))  # fmt: skip
        assert router.stop() == 0, router.tail()
    finally:
        router.stop()
    logged = [r for r in log_records(router.log) if r.get("level") in ("WARNING", "ERROR")]
    assert any("TLS handshake with 127.0.0.1" in str(r.get("message")) for r in logged), logged


class TlsStorescp:
    """DCMTK storescp over TLS, requiring a client certificate signed by ``ca``."""

    def __init__(self, folder: Path, identity: Identity, ca: Path) -> None:
        self.folder, self.identity, self.ca = folder, identity, ca
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TlsStorescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder.parent / "storescp.log", "ab") as log:
            self.process = subprocess.Popen(
                [require_tool("storescp"), "+tls", str(self.identity.key), str(self.identity.cert),
                 "+cf", str(self.ca), "-rc", "-aet", "TLSPACS", "-od", str(self.folder),
                 "+uf", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV,
            )  # fmt: skip
        wait_for_port(self.port, self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=10)

    def count(self) -> int:
        return len(list(self.folder.iterdir()))


def _uploader_config(folder: Path, pacs: TlsStorescp, client: Identity, ca: Path) -> Path:
    path = folder / "pacsflow.yaml"
    path.write_text(f"""
logging: {{level: INFO, format: json}}
state: {{backend: sqlite, path: {folder}/state.db}}
bus: {{backend: embedded, declare_services: [watcher, uploader]}}
dicom: {{ae_title: PFTLS, connect_timeout: 3, acse_timeout: 10, dimse_timeout: 10,
        tls: {{cert_file: {client.cert}, key_file: {client.key}}}}}
nodes:
  pacs: {{ae_title: TLSPACS, host: 127.0.0.1, port: {pacs.port},
          tls: {{enabled: true, ca_file: {ca}}}}}
watcher:
  import_folders: [{folder}/inbox]
  archive_folder: {folder}/archive
  quarantine_folder: {folder}/quarantine
  debounce_seconds: 0.3
  archive_interval_seconds: 0.5
uploader:
  destinations: [pacs]
  associations: 1
  processes: 0
  retry_initial_seconds: 0.2
  retry_max_seconds: 1
""")
    return path


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-client", "untrusted-client"])
async def test_uploader_sends_over_tls_and_is_refused_with_an_untrusted_certificate(
    tmp_path: Path, pki: Pki, trusted: bool
) -> None:
    write_ct_series(tmp_path / "inbox" / "#1-Tls" / "series", 10, rows=8, columns=8)
    client = pki.client if trusted else pki.stranger
    with TlsStorescp(tmp_path / "pacs", pki.server, pki.ca) as pacs:
        config = _uploader_config(tmp_path, pacs, client, pki.ca)
        services = (ServiceProcess(config, "uploader").start(),
                    ServiceProcess(config, "watcher").start())  # fmt: skip
        try:
            if trusted:
                await wait_until(lambda: not any((tmp_path / "inbox").rglob("*.dcm")), 60,
                                 "every file sent and archived", alive=services)  # fmt: skip
                assert pacs.count() == 10
            else:
                # Refused at the handshake: a warning, the files wait for a retry.
                await wait_until(
                    lambda: any(r.get("level") == "WARNING"
                                and "no association with TLSPACS" in str(r.get("message"))
                                for r in log_records(services[0].log)),
                    60, "the refusal logged by the uploader", alive=services)  # fmt: skip
                refusal = next(str(r.get("message")) for r in log_records(services[0].log)
                               if "no association with TLSPACS" in str(r.get("message")))
                # It says what failed: the TLS handshake (not a misread error number).
                assert "tls" in refusal.lower() and "exec format" not in refusal, refusal
                assert pacs.count() == 0
                assert len(list((tmp_path / "inbox").rglob("*.dcm"))) == 10  # kept, not lost
            for service in services:
                assert service.stop() == 0, service.tail()
        finally:
            for service in services:
                service.stop()
    shutil.rmtree(tmp_path / "pacs", ignore_errors=True)
