"""The ``pacsflow`` command as an administrator runs it: processes, signals, health, exit codes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pacsflow.cli import build_parser
from pacsflow.config import SERVICES
from tests.peers import StoreSCPProcess, free_port


def write_config(tmp_path: Path) -> tuple[Path, int]:
    http_port = free_port()
    data = tmp_path / "data"
    text = f"""
http: {{host: 127.0.0.1, port: {http_port}}}
logging: {{format: json, level: INFO}}
state: {{backend: sqlite, path: {data}/pacsflow.db}}
nodes:
  router: {{ae_title: PACSFLOW, host: 127.0.0.1, port: {free_port()}}}
watcher:
  import_folders: [{data}/inbox]
  archive_folder: {data}/archive
  quarantine_folder: {data}/quarantine
router:
  port: {free_port()}
  routes:
    PACSFLOW: {{path: {data}/storage}}
notifier:
  mail_folder: {data}/mail
"""
    path = tmp_path / "pacsflow.yaml"
    path.write_text(text)
    return path, http_port


def pacsflow(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pacsflow", *args], capture_output=True,
                          text=True, timeout=timeout)


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def wait_ready(port: int, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited early with {process.returncode}")
        try:
            if get(port, "/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("never became ready")


class TestRunningServices:
    @pytest.mark.parametrize("command", [["run"], ["watcher"], ["notifier"]])
    def test_starts_serves_metrics_and_stops_on_sigterm(self, tmp_path: Path,
                                                        command: list[str]) -> None:
        config, http_port = write_config(tmp_path)
        # Logs to a file: an unread pipe fills up and blocks the process.
        log_path = tmp_path / "pacsflow.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "pacsflow", "-c", str(config),
                                        *command], stderr=log, text=True)
        try:
            wait_ready(http_port, process)
            status, metrics = get(http_port, "/metrics")
            assert status == 200
            names = list(SERVICES) if command == ["run"] else command
            for name in names:
                assert f'pacsflow_service_up{{service="{name}"}} 1.0' in metrics
            assert get(http_port, "/healthz") == (200, "ok\n")
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr = log_path.read_text()
        lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
        assert any(line["message"] == "stopped" for line in lines)
        assert not [line for line in lines if line["level"] == "ERROR"], stderr

    def test_unknown_service(self) -> None:
        result = pacsflow("run", "teleporter")
        assert result.returncode == 2 and "unknown service" in result.stderr


class TestStateCommands:
    def test_db_upgrade_then_status(self, tmp_path: Path) -> None:
        config, _ = write_config(tmp_path)
        first = pacsflow("-c", str(config), "db", "upgrade")
        assert first.returncode == 0, first.stderr
        assert "applied" in first.stdout
        again = pacsflow("-c", str(config), "db", "upgrade")
        assert again.returncode == 0 and "up to date" in again.stdout
        assert pacsflow("-c", str(config), "db", "status").returncode == 0

    def test_status_json_when_nothing_runs(self, tmp_path: Path) -> None:
        config, _ = write_config(tmp_path)
        assert pacsflow("-c", str(config), "db", "upgrade").returncode == 0
        result = pacsflow("-c", str(config), "status", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["process"]["reachable"] is False
        assert report["ledger"]["ready"] == 0
        assert set(report["dead_letters"]) == set(SERVICES)

    def test_ledger_export_is_csv(self, tmp_path: Path) -> None:
        config, _ = write_config(tmp_path)
        assert pacsflow("-c", str(config), "db", "upgrade").returncode == 0
        result = pacsflow("-c", str(config), "ledger", "export", "--status", "invalid")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0].startswith("id,status,path")

    def test_bad_since(self, tmp_path: Path) -> None:
        config, _ = write_config(tmp_path)
        result = pacsflow("-c", str(config), "ledger", "list", "--since", "yesterdayish")
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "--since" in result.stderr


@pytest.mark.dcmtk
class TestEcho:
    def test_echo_a_storescp_and_a_closed_port(self, tmp_path: Path) -> None:
        with StoreSCPProcess(tmp_path / "in") as scp:
            node = scp.node
            ok = pacsflow("echo", f"{node.ae_title}@127.0.0.1:{node.port}", "--count", "2")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.count("success in") == 2
        port = free_port()
        closed = pacsflow("echo", f"NOBODY@127.0.0.1:{port}")
        assert closed.returncode == 3
        assert f"connection refused: nothing listens on 127.0.0.1:{port}" in closed.stdout
        assert closed.stderr.count("\n") == 1 and "1 of 1 failed" in closed.stderr


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


class TestEveryCommand:
    def test_every_command_has_help(self, capsys: pytest.CaptureFixture[str]) -> None:
        commands = _commands(build_parser())
        assert ("config", "init") in commands and ("ledger",) in commands
        for command in commands:
            with pytest.raises(SystemExit) as exited:
                build_parser().parse_args([*command, "--help"])
            assert exited.value.code == 0, command
            assert capsys.readouterr().out.startswith("usage: pacsflow"), command

    def test_a_usage_error_is_one_line_and_exit_2(self) -> None:
        result = pacsflow("ledger", "list", "--status", "lost")
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1
        assert result.stderr.startswith("pacsflow: ledger: argument --status: invalid choice")

    def test_an_unreachable_state_store_is_exit_3(self, tmp_path: Path) -> None:
        config = tmp_path / "pacsflow.yaml"
        config.write_text(f"state: {{backend: postgres, dsn: 'postgresql://nobody@127.0.0.1:"
                          f"{free_port()}/none'}}\n")
        result = pacsflow("-c", str(config), "ledger", "list")
        assert result.returncode == 3
        assert result.stderr.count("\n") == 1 and result.stderr.startswith(
            "pacsflow: state store: cannot connect to PostgreSQL")
