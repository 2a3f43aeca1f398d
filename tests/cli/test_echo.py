"""``pacsflow echo``: what failed is said plainly, and the exit code tells a script which kind."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import embedded_config, pacsflow
from tests.peers import OrthancProcess


class _CheckingOrthanc(OrthancProcess):
    """Orthanc that rejects associations calling another AE title than its own."""

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "DicomCheckCalledAet": True}


@pytest.mark.orthanc
def test_a_wrong_called_ae_title_is_named(tmp_path: Path) -> None:
    with _CheckingOrthanc(tmp_path / "orthanc") as pacs:
        port = pacs.dicom_port
        right = pacsflow("echo", f"{pacs.ae_title}@127.0.0.1:{port}", "--json")
        wrong = pacsflow("echo", f"NOTORTHANC@127.0.0.1:{port}")
    assert right.returncode == 0, right.stdout + right.stderr
    [result] = json.loads(right.stdout)
    assert result["outcome"] == "ok" and result["round_trip_ms"] > 0
    assert wrong.returncode == 1
    assert "AE title rejected" in wrong.stdout and "'NOTORTHANC'" in wrong.stdout
    assert wrong.stderr.count("\n") == 1


def test_a_port_that_accepts_but_never_answers_is_reported_as_no_answer(tmp_path: Path) -> None:
    config = embedded_config(tmp_path, extra="dicom: {connect_timeout: 2, acse_timeout: 1}\n")
    # Listening without ever accepting: the kernel completes the TCP handshake, nothing
    # answers the association request (a hung PACS, or the wrong service on that port).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        result = pacsflow("-c", str(config), "echo", f"SILENT@127.0.0.1:{port}", "--json")
    assert result.returncode == 3
    [answer] = json.loads(result.stdout)
    assert answer["outcome"] == "no-answer"
    assert "accepted the connection but closed it or did not answer within 1 s" in \
        answer["message"]
    assert "1 of 1 failed" in result.stderr


def test_a_node_name_that_is_not_configured(tmp_path: Path) -> None:
    config = embedded_config(tmp_path)
    result = pacsflow("-c", str(config), "echo", "nosuchpacs")
    assert result.returncode == 2
    assert result.stderr == "pacsflow: no node named 'nosuchpacs' (known: router)\n"


def test_a_host_that_does_not_answer_is_reported_as_timeout(tmp_path: Path) -> None:
    config = embedded_config(tmp_path, extra="dicom: {connect_timeout: 1, acse_timeout: 1}\n")
    # A listener whose backlog is full: the kernel drops further connection attempts, as a
    # firewall that drops packets (or a host that is down) does.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = socket.create_connection(("127.0.0.1", port), timeout=2)
        try:
            result = pacsflow("-c", str(config), "echo", f"FIREWALLED@127.0.0.1:{port}")
        finally:
            waiting.close()
    assert result.returncode == 3
    assert f"timeout: 127.0.0.1:{port} did not answer within 1 s" in result.stdout
