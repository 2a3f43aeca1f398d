"""``pacsflow config init``: driven through its questions on a pseudo-terminal, and from files."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pexpect
import pytest
import yaml
from pacsflow.config import load_settings

from tests.cli.support import pacsflow
from tests.peers import StoreSCPProcess, free_port

pytestmark = pytest.mark.dcmtk

PASSWORD = "s3cret-Pw-7781"


def _spawn(args: list[str], transcript: Path) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "pacsflow", *args], encoding="utf-8",
                          timeout=60, env={**os.environ, "TERM": "dumb"}, dimensions=(50, 200))
    child.logfile_read = open(transcript, "w")  # noqa: SIM115 - closed with the child
    return child


def _answer(child: pexpect.spawn, prompt: str, reply: str) -> None:
    child.expect_exact(prompt)
    child.sendline(reply)


def test_interactive_setup_tests_each_node_and_writes_a_valid_file(tmp_path: Path) -> None:
    output = tmp_path / "site" / "pacsflow.yaml"
    closed_port = free_port()
    transcript = tmp_path / "transcript.txt"
    with StoreSCPProcess(tmp_path / "scp") as scp:
        child = _spawn(["config", "init", "-o", str(output), "--timeout", "3"], transcript)
        try:
            _answer(child, "pacsflow's AE title", "PFTEST")
            _answer(child, "port on which pacsflow receives images", "99999")
            child.expect_exact("a port is a number from 1 to 65535")
            _answer(child, "port on which pacsflow receives images", "11199")  # asked again
            _answer(child, "Is there a local PACS", "y")
            _answer(child, "local PACS: name", "research")
            _answer(child, "local PACS: AE title", scp.ae_title)
            _answer(child, "local PACS: host name or address", "127.0.0.1")
            _answer(child, "local PACS: port", str(scp.port))
            child.expect(r"C-ECHO research: ok: success in [0-9.]+ ms")
            _answer(child, "Add a remote PACS", "y")
            _answer(child, "remote PACS: name", "main")
            _answer(child, "remote PACS: AE title", "MAINPACS")
            _answer(child, "remote PACS: host name or address", "127.0.0.1")
            _answer(child, "remote PACS: port", str(closed_port))
            child.expect_exact(f"C-ECHO main: UNREACHABLE: connection refused: nothing listens "
                               f"on 127.0.0.1:{closed_port}")
            _answer(child, "keep it anyway, change it, or drop it?", "")  # keep (the default)
            _answer(child, "Add another remote PACS", "n")
            for prompt in ("import folder", "archive folder", "storage folder",
                           "quarantine folder"):
                _answer(child, prompt, "")
            _answer(child, "send imported files to", "research, nowhere")
            child.expect_exact("unknown node(s) nowhere")
            _answer(child, "send imported files to", "research")
            _answer(child, "Keep research up to date with main (sync)?", "y")
            _answer(child, "SMTP server", "smtp.example.org")
            _answer(child, "security (none/starttls/tls)", "starttls")
            _answer(child, "SMTP port [587]", "")
            _answer(child, "user name", "pacsflow")
            _answer(child, "password (not shown)", PASSWORD)
            _answer(child, "sender address", "pacsflow@example.org")
            _answer(child, "who is told about failures", "pacs-admin@example.org")
            child.expect(pexpect.EOF)
        finally:
            child.close()
    said = transcript.read_text()
    assert child.exitstatus == 3, said
    assert f"main: unreachable: connection refused: nothing listens on 127.0.0.1:{closed_port}" \
        in said
    assert PASSWORD not in said

    check = pacsflow("config", "check", str(output))
    assert check.returncode == 0, check.stderr
    settings = load_settings(output)
    assert settings.dicom.ae_title == "PFTEST"
    assert str(settings.nodes["research"]) == f"{scp.ae_title}@127.0.0.1:{scp.port}"
    assert str(settings.nodes["main"]) == f"MAINPACS@127.0.0.1:{closed_port}"
    assert settings.router.port == 11199
    # pacsflow's own router takes several C-STOREs in flight; other nodes one at a time.
    assert settings.nodes["router"].operations_window == 8
    assert settings.nodes["research"].operations_window == 1
    assert settings.uploader.destinations == ["research"]
    assert (settings.sync.remote, settings.sync.local) == ("main", "research")
    assert settings.notifier.smtp.starttls and settings.notifier.smtp.port == 587
    assert settings.notifier.recipients["file-failed"] == ["pacs-admin@example.org"]
    assert settings.watcher.import_folders == [output.parent / "data" / "inbox"]
    assert (output.parent / "data" / "inbox").is_dir()
    # The password is in a file of its own, readable by its owner only; never in the YAML.
    text = output.read_text()
    assert PASSWORD not in text and text.startswith("# pacsflow configuration")
    secret = settings.notifier.smtp.password_file
    assert secret is not None and secret.read_text() == PASSWORD
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600


def test_non_interactive_from_an_answers_file(tmp_path: Path) -> None:
    closed_port = free_port()
    answers = tmp_path / "answers.yaml"
    answers.write_text(yaml.safe_dump({
        "ae_title": "PFBATCH",
        "remotes": [{"name": "main", "ae_title": "MAIN", "host": "127.0.0.1",
                     "port": closed_port}],
        "import_folder": str(tmp_path / "in"),
        "recipients": ["it@example.org"],
    }))
    output = tmp_path / "pacsflow.yaml"
    with StoreSCPProcess(tmp_path / "scp") as scp:
        result = pacsflow("config", "init", "--non-interactive", "--answers", str(answers),
                          "--local", f"research=STORESCP@127.0.0.1:{scp.port}",
                          "-o", str(output), "--timeout", "3")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "C-ECHO research: ok: success in" in result.stdout
    assert "C-ECHO main: UNREACHABLE: connection refused" in result.stdout
    assert result.stderr.count("\n") == 1 and "main unreachable" in result.stderr
    assert pacsflow("config", "check", str(output)).returncode == 0
    settings = load_settings(output)
    assert set(settings.nodes) == {"router", "research", "main"}
    assert settings.notifier.smtp.host is None

    again = pacsflow("config", "init", "--non-interactive", "-o", str(output))
    assert again.returncode == 2 and "exists" in again.stderr


def test_unknown_answer_keys_are_named(tmp_path: Path) -> None:
    answers = tmp_path / "answers.yaml"
    answers.write_text("ae_tilte: X\n")
    result = pacsflow("config", "init", "--non-interactive", "--answers", str(answers),
                      "-o", str(tmp_path / "out.yaml"))
    assert result.returncode == 2
    assert "unknown key(s) ae_tilte" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.yaml").exists()


def test_without_a_terminal_it_asks_for_non_interactive(tmp_path: Path) -> None:
    result = pacsflow("config", "init", "-o", str(tmp_path / "out.yaml"))
    assert result.returncode == 2 and "--non-interactive" in result.stderr


def test_the_documented_answers_file_gives_a_valid_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = Path(__file__).parents[2] / "config" / "init-answers.example.yaml"
    answers = yaml.safe_load(example.read_text())
    # The example's folders are for a server; the same answers with folders of the test's own.
    for key in ("import_folder", "archive_folder", "storage_folder", "quarantine_folder",
                "data_folder"):
        answers[key] = str(tmp_path / key)
    local_copy = tmp_path / "answers.yaml"
    local_copy.write_text(yaml.safe_dump(answers))
    output = tmp_path / "pacsflow.yaml"
    environment = {"PACSFLOW_NOTIFIER__SMTP__PASSWORD": PASSWORD}
    result = pacsflow("config", "init", "--non-interactive", "--no-echo", "--answers",
                      str(local_copy), "-o", str(output), env=environment)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv("PACSFLOW_NOTIFIER__SMTP__PASSWORD", PASSWORD)
    settings = load_settings(output)
    assert settings.nodes["main"].ae_title == "MAIN_PACS"
    assert (settings.sync.remote, settings.sync.local) == ("main", "research")
    assert settings.state.path == tmp_path / "data_folder" / "pacsflow.db"
    # From the environment at run time too: no password file to conflict with it.
    assert settings.notifier.smtp.password_file is None
    assert settings.notifier.smtp.password is not None
    assert settings.notifier.smtp.password.get_secret_value() == PASSWORD
    assert "PACSFLOW_NOTIFIER__SMTP__PASSWORD" in result.stdout
    assert PASSWORD not in output.read_text() + result.stdout
