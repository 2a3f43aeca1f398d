"""Transport: TCP_NODELAY on both sides, and DICOM TLS with real certificates."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsflow.config import Node, TlsSettings
from pacsflow.dicom import (
    AssociationInfo,
    NetworkOptions,
    ReceivedInstance,
    StoreSCP,
    client_ssl_context,
    echo,
    send_files,
    server_ssl_context,
)
from pacsflow.dicom.association import gate_of, open_association
from pacsflow.errors import AssociationRejected, ConfigError
from tests.conftest import require_tool
from tests.dicom.synthetic import write_ct_series

pytestmark = pytest.mark.dcmtk


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def _certificate_authority(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    return key, cert


def _signed(folder: Path, name: str, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, request, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    extensions = folder / f"{name}.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(request), "-subj", f"/CN={name}", cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions), cwd=folder,
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    folder = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _certificate_authority(folder, "pacsflow-test-ca")
    server_key, server_cert = _signed(folder, "router", ca_key, ca_cert)
    client_key, client_cert = _signed(folder, "uploader", ca_key, ca_cert)
    _other_key, other_ca = _certificate_authority(folder, "unrelated-ca")
    return Certificates(ca_cert, server_cert, server_key, client_cert, client_key, other_ca)


class Recorder:
    def __init__(self) -> None:
        self.associations: list[AssociationInfo] = []
        self.instances: list[ReceivedInstance] = []

    def accept(self, info: AssociationInfo) -> None:
        self.associations.append(info)

    def store(self, instance: ReceivedInstance) -> int:
        self.instances.append(instance)
        return 0


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def tls_scp(certificates: Certificates, recorder: Recorder) -> Iterator[StoreSCP]:
    server_tls = TlsSettings(
        enabled=True,
        ca_file=certificates.ca,
        cert_file=certificates.server_cert,
        key_file=certificates.server_key,
        require_client_cert=True,
    )
    options = NetworkOptions(ae_title="ROUTER", tls=server_tls, acse_timeout=10)
    with StoreSCP(
        recorder.store, ae_title="ROUTER", host="127.0.0.1", options=options, accept=recorder.accept
    ) as scp:
        yield scp


def _client_options(certificates: Certificates, with_certificate: bool = True) -> NetworkOptions:
    # The local side's certificate; the node says whether to use TLS and which CA to trust.
    local = TlsSettings(
        cert_file=certificates.client_cert if with_certificate else None,
        key_file=certificates.client_key if with_certificate else None,
    )
    return NetworkOptions(ae_title="UPLOADER", tls=local, acse_timeout=10, dimse_timeout=10)


def _tls_node(port: int, ca: Path) -> Node:
    return Node(
        ae_title="ROUTER", host="127.0.0.1", port=port, tls=TlsSettings(enabled=True, ca_file=ca)
    )


class TestTls:
    def test_store_and_echo_over_tls_with_client_certificates(
        self, tls_scp: StoreSCP, recorder: Recorder, certificates: Certificates, tmp_path: Path
    ) -> None:
        node = _tls_node(tls_scp.port, certificates.ca)
        options = _client_options(certificates)
        assert echo(node, options) > 0
        series = write_ct_series(tmp_path / "series", 5)
        results = list(send_files(node, series, options))
        assert all(result.ok for result in results)
        assert len(recorder.instances) == 5
        assert all(info.tls for info in recorder.associations)

    def test_client_without_certificate_is_refused(
        self, tls_scp: StoreSCP, recorder: Recorder, certificates: Certificates
    ) -> None:
        node = _tls_node(tls_scp.port, certificates.ca)
        with pytest.raises(AssociationRejected):
            echo(node, _client_options(certificates, with_certificate=False))
        assert recorder.associations == []

    def test_client_that_does_not_trust_the_server_refuses_it(
        self, tls_scp: StoreSCP, recorder: Recorder, certificates: Certificates
    ) -> None:
        node = _tls_node(tls_scp.port, certificates.other_ca)
        with pytest.raises(AssociationRejected):
            echo(node, _client_options(certificates))
        assert recorder.associations == []

    def test_plain_tcp_client_gets_no_association(
        self, tls_scp: StoreSCP, recorder: Recorder, certificates: Certificates
    ) -> None:
        plain = Node(ae_title="ROUTER", host="127.0.0.1", port=tls_scp.port)
        with pytest.raises(AssociationRejected):
            echo(plain, NetworkOptions(acse_timeout=3))
        assert recorder.associations == []

    def test_dcmtk_storescu_sends_over_tls(
        self,
        tls_scp: StoreSCP,
        recorder: Recorder,
        certificates: Certificates,
        tmp_path: Path,
        dcmtk_env: dict[str, str],
    ) -> None:
        (path,) = write_ct_series(tmp_path / "one", 1)
        result = subprocess.run(
            [
                require_tool("storescu"), "+tls", str(certificates.client_key),
                str(certificates.client_cert), "+cf", str(certificates.ca), "-aec", "ROUTER",
                "127.0.0.1", str(tls_scp.port), str(path),
            ],
            env=dcmtk_env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert len(recorder.instances) == 1


class TestTlsConfiguration:
    def test_server_needs_a_certificate(self) -> None:
        with pytest.raises(ConfigError, match="cert_file"):
            server_ssl_context(TlsSettings(enabled=True))

    def test_client_certificates_need_a_ca(self, certificates: Certificates) -> None:
        settings = TlsSettings(
            enabled=True, cert_file=certificates.server_cert, key_file=certificates.server_key
        )
        with pytest.raises(ConfigError, match="ca_file"):
            server_ssl_context(settings)

    def test_missing_file_names_the_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="absent.pem"):
            client_ssl_context(TlsSettings(enabled=True, ca_file=tmp_path / "absent.pem"))

    def test_key_that_does_not_match_is_a_config_error(self, certificates: Certificates) -> None:
        settings = TlsSettings(cert_file=certificates.server_cert, key_file=certificates.client_key)
        with pytest.raises(ConfigError, match="cannot load"):
            client_ssl_context(settings)

    def test_contexts_require_tls_1_2(self, certificates: Certificates) -> None:
        import ssl

        context = client_ssl_context(TlsSettings(ca_file=certificates.ca))
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname


def test_tcp_nodelay_is_set_on_both_ends_and_the_gate_installed(recorder: Recorder) -> None:
    with StoreSCP(recorder.store, ae_title="PFSCP", host="127.0.0.1") as scp:
        node = Node(ae_title="PFSCP", host="127.0.0.1", port=scp.port)
        assoc = open_association(node, [build_context(Verification)], NetworkOptions())
        try:
            requestor_socket = assoc.dul.socket.socket  # type: ignore[union-attr]
            # The server's side of the same connection (pynetdicom keeps it per association).
            (acceptor,) = scp._server.active_associations  # type: ignore[union-attr]
            acceptor_socket = acceptor.dul.socket.socket
            for sock in (requestor_socket, acceptor_socket):
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert gate_of(assoc) is not None
            assert gate_of(acceptor) is not None
        finally:
            assoc.release()
