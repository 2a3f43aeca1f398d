"""Configuration: YAML plus environment, and errors that name the file and the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pacsflow.config import Node, load_settings, parse_node
from pacsflow.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config" / "pacsflow.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacsflow.yaml"
    path.write_text(text)
    return path


class TestLoadSettings:
    def test_defaults_are_the_embedded_deployment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("PACSFLOW_BUS__BACKEND", raising=False)
        settings = load_settings()
        assert settings.bus.backend == "embedded"
        assert settings.state.backend == "sqlite"
        assert settings.uploader.destinations == ["router"]
        assert settings.nodes["router"].port == settings.router.port
        # The built-in router takes several C-STOREs in flight (asynchronous operations).
        assert settings.nodes["router"].operations_window == 8
        assert settings.router.operations_window >= 8

    def test_example_file_is_valid(self) -> None:
        settings = load_settings(EXAMPLE)
        assert settings.router.routes["PACSFLOW"].path == Path("data/storage")

    def test_environment_overrides_the_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = write(tmp_path, "bus:\n  backend: embedded\n  prefetch: 4\n")
        monkeypatch.setenv("PACSFLOW_BUS__BACKEND", "rabbitmq")
        settings = load_settings(path)
        assert settings.bus.backend == "rabbitmq"
        assert settings.bus.prefetch == 4  # the rest of the section still comes from the file

    def test_unknown_key_is_named_with_the_file(self, tmp_path: Path) -> None:
        path = write(tmp_path, "bus:\n  backend: embedded\n  prefech: 4\n")
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        assert str(path) in str(err.value)
        assert "bus.prefech: unknown key" in str(err.value)

    @pytest.mark.parametrize(
        ("text", "key"),
        [
            ("http:\n  port: 70000\n", "http.port"),
            ("bus:\n  prefetch: many\n", "bus.prefetch"),
            ("nodes:\n  p:\n    ae_title: SEVENTEEN_CHARS_X\n    host: h\n    port: 104\n",
             "nodes.p.ae_title"),
            ("nodes:\n  p:\n    ae_title: A\\B\n    host: h\n    port: 104\n", "nodes.p.ae_title"),
            ("nodes:\n  p:\n    ae_title: PACS\n    host: h\n    port: 0\n", "nodes.p.port"),
            ("state:\n  backend: mysql\n", "state.backend"),
        ],
    )
    def test_bad_values_name_their_key(self, tmp_path: Path, text: str, key: str) -> None:
        with pytest.raises(ConfigError, match=rf"(?m)^  {key}: "):
            load_settings(write(tmp_path, text))

    @pytest.mark.parametrize(("text", "key"), [
        ("sync:\n  remote: nowhere\n", "sync.remote"),
        ("router:\n  routes:\n    MRI: {path: /x, forward: [nowhere]}\n",
         "router.routes.MRI.forward"),
    ])
    def test_other_node_names_must_be_known(self, tmp_path: Path, text: str, key: str) -> None:
        with pytest.raises(ConfigError, match=f"{key} names 'nowhere', which is not in nodes"):
            load_settings(write(tmp_path, text))

    def test_a_node_can_be_given_as_an_address(self, tmp_path: Path) -> None:
        settings = load_settings(write(tmp_path, "sync:\n  remote: PACS@10.0.0.5:104\n"))
        assert settings.node(settings.sync.remote or "").port == 104

    def test_destination_must_be_a_known_node(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="not in nodes"):
            load_settings(write(tmp_path, "uploader:\n  destinations: [nowhere]\n"))

    def test_not_a_mapping(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="mapping"):
            load_settings(write(tmp_path, "- a\n- b\n"))

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot read"):
            load_settings(tmp_path / "absent.yaml")

    def test_secret_is_not_printed(self, tmp_path: Path) -> None:
        settings = load_settings(write(tmp_path, "bus:\n  url: amqp://u:hunter2@h/\n"))
        assert "hunter2" not in repr(settings)
        assert settings.bus.url.get_secret_value() == "amqp://u:hunter2@h/"

    def test_secret_comes_from_the_secrets_folder(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / "pacsflow_notifier__smtp__password").write_text("s3cret")
        monkeypatch.setenv("PACSFLOW_SECRETS_DIR", str(secrets))
        password = load_settings().notifier.smtp.password
        assert password is not None and password.get_secret_value() == "s3cret"


class TestNodes:
    def test_parse_node(self) -> None:
        assert parse_node("STORESCP@127.0.0.1:11112") == Node(
            ae_title="STORESCP", host="127.0.0.1", port=11112
        )

    @pytest.mark.parametrize("text", ["STORESCP", "A@h", "WAYTOOLONGAETITLE1@h:104", "A@h:0"])
    def test_bad_node(self, text: str) -> None:
        with pytest.raises(ConfigError):
            parse_node(text)


class TestConfigCheckCommand:
    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pacsflow", "config", "check", *args],
            capture_output=True, text=True, timeout=60,
        )

    def test_good_file(self) -> None:
        result = self.run(str(EXAMPLE))
        assert result.returncode == 0, result.stderr
        assert "ok" in result.stdout

    def test_broken_file_names_the_key_and_exits_non_zero(self, tmp_path: Path) -> None:
        path = write(tmp_path, "router:\n  port: -1\n  rutes: {}\n")
        result = self.run(str(path))
        assert result.returncode == 2
        assert str(path) in result.stderr
        assert "router.port" in result.stderr
        assert "router.rutes: unknown key" in result.stderr
