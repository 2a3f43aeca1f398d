"""No patient names in logs above DEBUG, no secrets anywhere in output.

The services run as processes on images whose PatientName is distinctive (Latin and Korean),
through the whole path: watcher (valid, invalid and duplicate files), uploader, router-scp
(receiving, study completion) and notifier (mails). At INFO no log line carries a name.

Secrets (bus and database passwords, the SMTP password, a webhook token) given through the
environment and the secrets folder never appear in ``config check``, ``config show``,
``status`` or the logs of services that fail to reach the servers those secrets are for.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.dicom.synthetic import write_ct_series
from tests.peers import free_port
from tests.reliability.support import ServiceProcess, pacsflow_command, wait_until
from tests.router.support import files_under

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(300)]

NAMES = ("Gildong^Hong", "홍길동", "Younghee^Kim")
SECRETS = ("Bus-S3cret-7f1", "Db-S3cret-9a2", "Smtp-S3cret-4c3", "Hook-T0ken-8d4")


def _named_series(folder: Path, name: str, count: int) -> list[Path]:
    paths = write_ct_series(folder, count, rows=8, columns=8)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName = name
        # Descriptions carry names in practice; the router and notifier pass them on.
        ds.StudyDescription = f"CT {name}"
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.save_as(path)
    return paths


def _config(folder: Path, level: str, router_port: int) -> Path:
    path = folder / "pacsflow.yaml"
    path.write_text(f"""
logging: {{level: {level}, format: json}}
state: {{backend: sqlite, path: {folder}/state.db}}
bus: {{backend: embedded}}
dicom: {{ae_title: PFPHI, connect_timeout: 3, acse_timeout: 10, dimse_timeout: 10}}
nodes:
  router: {{ae_title: PHI, host: 127.0.0.1, port: {router_port}}}
watcher:
  import_folders: [{folder}/inbox]
  archive_folder: {folder}/archive
  quarantine_folder: {folder}/quarantine
  debounce_seconds: 0.3
  archive_interval_seconds: 0.5
uploader:
  destinations: [router]
  processes: 0
router:
  host: 127.0.0.1
  port: {router_port}
  routes: {{PHI: {{path: {folder}/storage, emails: [ward@example.org]}}}}
  study_quiet_seconds: 1
  sweep_seconds: 0.2
notifier:
  mail_folder: {folder}/mail
""")
    return path


def _all_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.glob("*.log"))


async def _run_pipeline(folder: Path, level: str) -> str:
    """Images with the names through every service; the logs, and the files' own names."""
    port = free_port()
    config = _config(folder, level, port)
    staging = folder / "staging"
    # Names in the headers (folder names are the operator's choice, not checked here).
    _named_series(staging / "#1001-Anonymous" / "a", NAMES[0], 5)
    _named_series(staging / "#1002-Anonymous" / "b", NAMES[1], 5)
    bad = staging / "#1003-Anonymous" / "c"
    good = _named_series(bad, NAMES[2], 3)
    (bad / "cut.dcm").write_bytes(good[0].read_bytes()[:400])  # invalid, name in its bytes
    shutil.copy(good[1], bad / "again.dcm")  # the same instance twice
    services = tuple(ServiceProcess(config, name).start()
                     for name in ("router-scp", "notifier", "uploader", "watcher"))  # fmt: skip
    try:
        await wait_until(lambda: all(s.ready() for s in services), 60, "services ready",
                         alive=services)  # fmt: skip
        shutil.move(staging, folder / "inbox")
        await wait_until(lambda: len(files_under(folder / "storage")) >= 13, 60,
                         "every instance at the router", alive=services)  # fmt: skip
        await wait_until(lambda: len(list((folder / "mail").glob("*"))) >= 3, 60,
                         "study-complete mails", alive=services)  # fmt: skip
        for service in services:
            assert service.stop() == 0, service.tail()
    finally:
        for service in services:
            service.stop()
    return _all_text(folder)


async def test_no_patient_names_in_logs_at_info(tmp_path: Path) -> None:
    logs = await _run_pipeline(tmp_path, "INFO")
    assert "invalid file" in logs and "study" in logs  # the run did log its work
    mails = "".join(p.read_text(errors="replace") for p in (tmp_path / "mail").glob("*"))
    assert any(f"CT {name}" in mails for name in NAMES)  # the names went all the way
    leaked = [name for name in NAMES if name in logs or name.replace("^", " ") in logs]
    assert not leaked, f"patient names in INFO logs: {leaked}"


@pytest.mark.postgres
async def test_secrets_are_never_printed(tmp_path: Path, pg_dsn: str) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "pacsflow_notifier__smtp__password").write_text(SECRETS[2])
    closed = free_port()
    config = tmp_path / "pacsflow.yaml"
    config.write_text(f"""
logging: {{level: DEBUG, format: json}}
state: {{backend: postgres}}
bus: {{backend: rabbitmq, publish_timeout: 2}}
notifier:
  smtp: {{host: 127.0.0.1, port: {closed}, username: pacsflow}}
  webhooks:
    chat: {{url: 'https://hooks.example.org/services/{SECRETS[3]}'}}
""")
    # The database accepts the password (trust authentication), so the services get as far
    # as the bus, whose password is wrong and whose port is closed.
    reachable_dsn = pg_dsn.replace("postgresql://postgres@", f"postgresql://postgres:{SECRETS[1]}@")
    unreachable = {
        "PACSFLOW_SECRETS_DIR": str(secrets_dir),
        "PACSFLOW_BUS__URL": f"amqp://pacsflow:{SECRETS[0]}@127.0.0.1:{closed}/",
        "PACSFLOW_STATE__DSN": f"postgresql://pacsflow:{SECRETS[1]}@127.0.0.1:{closed}/pacsflow",
    }
    half_reachable = {**unreachable, "PACSFLOW_STATE__DSN": reachable_dsn}
    outputs = []
    for env in (unreachable, half_reachable):
        commands = [("status", "--json"), ("db", "upgrade"), ("dead-letters", "list")]
        if env is unreachable:
            commands += [("config", "check", str(config)), ("config", "show"), ("db", "status")]
        for args in commands:
            result = pacsflow_command(config, *args, env=env)
            outputs.append(f"$ pacsflow {' '.join(args)} -> {result.returncode}\n"
                           f"{result.stdout}{result.stderr}")  # fmt: skip
        # Services that cannot reach a server a secret is for: they log why and exit.
        for service in ("notifier", "watcher"):
            runner = ServiceProcess(config, service, name=f"{service}-{len(outputs)}",
                                    env=env).start()  # fmt: skip
            assert runner.process is not None
            try:
                runner.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                runner.stop()
            outputs.append(f"$ pacsflow {service}\n{runner.tail(1_000_000)}")
    text = "\n".join(outputs)
    assert "cannot connect to PostgreSQL" in text and "RabbitMQ" in text  # both were tried
    leaked = [secret for secret in SECRETS if secret in text]
    assert not leaked, f"secrets printed: {leaked}\n{text[-3000:]}"


async def test_names_in_import_folder_names_are_masked_at_info(tmp_path: Path) -> None:
    """'#1004-GildongHong' names the patient: the watcher writes it into the headers, and no
    INFO line shows it, though the paths of its files are logged (invalid, duplicate)."""
    port = free_port()
    config = _config(tmp_path, "INFO", port)
    config.write_text(config.read_text().replace(
        "watcher:\n", "watcher:\n  rename_pattern: '^#([0-9]+)-([#^A-Za-z0-9]+)$'\n"))
    staging = tmp_path / "staging" / "#1004-GildongHong"
    good = _named_series(staging / "a", "Anonymous", 4)
    (staging / "a" / "cut.dcm").write_bytes(good[0].read_bytes()[:400])
    services = tuple(ServiceProcess(config, name).start()
                     for name in ("router-scp", "uploader", "watcher"))  # fmt: skip
    try:
        await wait_until(lambda: all(s.ready() for s in services), 60, "services ready",
                         alive=services)  # fmt: skip
        (tmp_path / "inbox").mkdir(exist_ok=True)
        shutil.move(staging, tmp_path / "inbox" / staging.name)
        await wait_until(lambda: len(files_under(tmp_path / "storage")) >= 4, 60,
                         "every instance at the router", alive=services)  # fmt: skip
        for service in services:
            assert service.stop() == 0, service.tail()
    finally:
        for service in services:
            service.stop()
    stored = [pydicom.dcmread(p, stop_before_pixels=True) for p in files_under(tmp_path / "storage")]
    assert {str(ds.PatientName) for ds in stored} == {"GildongHong"}  # the name went through
    logs = _all_text(tmp_path)
    assert "#1004-***" in logs and "cut.dcm" in logs  # its paths were logged, masked
    assert "GildongHong" not in logs
